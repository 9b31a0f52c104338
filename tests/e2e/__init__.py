"""Whole-platform runs. A task in them that nobody challenges has short windows: devices bid
within about a second of the notice, on a busy machine too, so fifteen seconds of bidding are
margin enough, and a dispute window only delays the settlement when no model is disputed
(tests/e2e/test_lying_aggregator.py keeps a long one)."""

BIDDING_WINDOW_S = DISPUTE_WINDOW_S = 15

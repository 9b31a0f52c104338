"""Tests of the FlexMarket contract and its Python client, on a real local chain."""

"""The FlexMarket contract's Python face: client, errors, events, build and local chain."""

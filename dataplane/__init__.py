"""The data plane: model blobs moved between nodes on signed requests, never through the chain.

``protocol`` (headers, routes, errors), ``signing`` (signed requests), ``client`` (fetch and
check a blob), ``access`` (who may fetch what, from the chain), ``server`` (a node's server).
"""

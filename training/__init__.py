"""Federated-learning engine: task spec, models, data, training, aggregation and the model store."""

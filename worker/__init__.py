"""The node side of FLEX: its key, its data-plane server and client, join and Celery tasks."""

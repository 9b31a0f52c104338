"""FLEX's Django project: settings, URLs, ASGI entry point and the Celery app."""

from flexsite.celery import app as celery_app

__all__ = ("celery_app",)

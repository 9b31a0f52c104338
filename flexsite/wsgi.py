"""WSGI entry point for FLEX's web server: every HTTP request (pages, API, admin) through
Django under gunicorn. Live task pages' WebSockets are served by flexsite.asgi beside it."""

import os

from django.conf import settings
from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flexsite.settings")
application = get_wsgi_application()

if settings.DEBUG:
    # The local platform has no separate static server: Django serves CSS/JS itself, as
    # runserver does. Production serves STATIC_ROOT (collectstatic) from its web server.
    from django.contrib.staticfiles.handlers import StaticFilesHandler

    application = StaticFilesHandler(application)

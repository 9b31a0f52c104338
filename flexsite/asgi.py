"""ASGI entry point for FLEX's web server."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flexsite.settings")
application = get_asgi_application()

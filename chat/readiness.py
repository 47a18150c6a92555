"""Readiness of this process to answer customers: the checks behind ``/readyz`` (``chat.health_views``).

``readiness_checks()`` runs every check and returns ``{name: CheckResult}`` for

- ``database``: a ``SELECT 1`` on the default database;
- ``redis``: a ``PING`` to ``REDIS_URL`` (the Channels layer and the Celery broker);
- ``model``: the GGUF file(s) of the model version the engine would serve (the active
  ``ModelVersion``, or ``LLM_MODEL_PATH`` when none is active yet) exist, are readable and start with
  the GGUF magic and a known format version; ``loaded`` tells whether this process's engine already
  serves that pair (information, not a condition: the engine loads it on the first answer); with a
  model server (``LLM_SERVER_URL``) instead: the server answers and serves the active version's name;
- ``embedding``: the sentence-embedding model is loaded (loading it on the first call, ~2 s), and its
  vectors have ``EMBEDDING_DIM`` dimensions.

``readiness_state_log(results)`` logs this process's changes of readiness, once each: a WARNING
line with the failing checks and why when it becomes unready (or the set of failing checks changes),
an INFO line when it is ready again; probes that find the same state log nothing (load balancers
probe every few seconds, and ``/readyz``'s 503 is not logged by Django either:
``chat.service_unavailable``).

Checks only read: nothing is written (unlike ``chat.services.model_version_active``, which creates
the default version).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from django.conf import settings
from django.db import connection

from chat.model_artifacts import model_file_problem
from chat.model_files import gguf_file_problem

logger = logging.getLogger(__name__)

REDIS_TIMEOUT_S = 2.0


class NotReady(Exception):
    """A check failed; the message says why (shown in ``/readyz``)."""


@dataclass(frozen=True)
class CheckResult:
    """One check: ``ok``, the ``error`` when not ok, and ``details`` (JSON-serialisable) when ok."""

    ok: bool
    error: str = ""
    details: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        return {"ok": self.ok, "error": self.error} if not self.ok else {"ok": True, **self.details}


def database_check() -> dict:
    """``SELECT 1`` on the default database; raises ``DatabaseError`` when it is unreachable."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        cursor.fetchone()
    return {"vendor": connection.vendor}


def redis_check() -> dict:
    """``PING`` to ``REDIS_URL`` with a ``REDIS_TIMEOUT_S`` connect/read timeout; raises redis-py's
    ``ConnectionError``/``TimeoutError`` when it does not answer."""
    import redis

    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=REDIS_TIMEOUT_S,
                                  socket_timeout=REDIS_TIMEOUT_S)
    try:
        client.ping()
    finally:
        client.close()
    return {}


def gguf_file_check(path: str) -> None:
    """Raise ``NotReady`` with ``chat.model_files.gguf_file_problem``'s reason unless ``path`` is a
    readable file with a GGUF header llama.cpp reads."""
    problem = gguf_file_problem(path)
    if problem:
        raise NotReady(problem)


def model_check() -> dict:
    """The GGUF files of the active model version (or ``LLM_MODEL_PATH`` when none is active) pass
    ``gguf_file_check`` (a file of the artifact storage: this host's cached copy when it has one, else
    the storage has the object; ``chat.model_artifacts.model_file_problem``). Returns ``{"version", "base_model_path", "adapter_path", "loaded"}``
    (``version`` is ``None`` for the not-yet-registered default). Raises ``NotReady`` or
    ``DatabaseError``."""
    from chat.engine import ModelKey, get_engine
    from chat.models import ModelVersion

    active = ModelVersion.objects.filter(is_active=True).first()
    if settings.LLM_SERVER_URL:
        return _server_model_check(active)
    if active is None:
        gguf_file_check(settings.LLM_MODEL_PATH)
        return {"version": None, "base_model_path": settings.LLM_MODEL_PATH, "adapter_path": "",
                "loaded": get_engine().current_key == ModelKey(settings.LLM_MODEL_PATH)}
    for path, sha256 in ((active.base_model_path, active.base_model_sha256), (active.adapter_path, active.adapter_sha256)):
        problem = path and model_file_problem(path, sha256)
        if problem:
            raise NotReady(problem)
    current = get_engine().current_key
    loaded = current is not None and (
        current == ModelKey(active.base_model_path, active.adapter_path)
        or (bool(current.base_sha256) and (current.base_sha256, current.adapter_sha256)
            == (active.base_model_sha256, active.adapter_sha256)))
    return {"version": active.name, "base_model_path": active.base_model_path,
            "adapter_path": active.adapter_path, "loaded": loaded}


def _server_model_check(active) -> dict:
    """With a model server (``LLM_SERVER_URL``): it answers ``GET /models`` and serves the active
    version's name, or, while no version is active, some model. Returns ``{"version", "server",
    "served"}``; raises ``NotReady``, with the server's reason when it gives one (the bundled model
    server names the file and what is wrong with it)."""
    from chat.engine import EngineError
    from chat.model_client import model_client

    try:
        served, unavailable = model_client().model_listing()
    except EngineError as error:
        raise NotReady(str(error)) from error
    if active is not None and active.name not in served:
        reason = unavailable.get(active.name)
        raise NotReady(f"the model server does not serve the active version {active.name!r}"
                       + (f": {reason}" if reason else f" (it serves: {', '.join(served[:10]) or 'nothing'})"))
    if active is None and not served:
        reason = unavailable.get("")
        raise NotReady("the model server serves no model" + (f": {reason}" if reason else ""))
    return {"version": active.name if active else None, "server": settings.LLM_SERVER_URL, "served": served[:10]}


def embedding_check() -> dict:
    """The process's embedding model (``knowledge.embedding.get_embedding_model``: the active
    embedding version's, loaded now if it is not yet) embeds a word into the version's dimension
    (``EMBEDDING_DIM`` for the settings' model). Raises whatever loading raises, or ``NotReady`` on a
    wrong dimension."""
    from knowledge.embedding import active_embedding, encoder_for

    active = active_embedding()
    vectors = encoder_for(active).encode(["ready"])
    if vectors.shape != (1, active.dimension):
        raise NotReady(f"embedding model made vectors of shape {vectors.shape}, expected (1, {active.dimension})")
    return {"model": active.model_id}


CHECKS: dict[str, Callable[[], dict]] = {
    "database": database_check,
    "redis": redis_check,
    "model": model_check,
    "embedding": embedding_check,
}


def readiness_checks() -> dict[str, CheckResult]:
    """Run every check of ``CHECKS`` (all of them, even after a failure) and return their results by
    name. A check that raises fails with the exception's message (logged by ``readiness_state_log``,
    on a change only)."""
    results = {}
    for name, check in CHECKS.items():
        try:
            results[name] = CheckResult(ok=True, details=check())
        except Exception as error:  # any failure of a dependency is "not ready", never a 500
            results[name] = CheckResult(ok=False, error=str(error) or type(error).__name__)
    return results


# The names of the checks that failed at the last ``readiness_state_log`` of this process; ``None``
# before the first one.
_last_failing: frozenset[str] | None = None
_state_lock = threading.Lock()


def readiness_state_log(results: dict[str, CheckResult]) -> None:
    """Log a change of this process's readiness since the last call: WARNING ``"not ready: <name>:
    <error>; ..."`` when checks fail and the failing ones are not the same as last time, INFO ``"ready
    again"`` when none fails after some did. The same state again (however its error texts vary, e.g.
    a timeout's duration) logs nothing; neither does being ready from the start."""
    global _last_failing
    failing = frozenset(name for name, result in results.items() if not result.ok)
    with _state_lock:
        previous, _last_failing = _last_failing, failing
    if failing == (previous or frozenset()):
        return
    if failing:
        logger.warning("not ready: %s", "; ".join(f"{name}: {results[name].error}" for name in results
                                                   if name in failing))
    else:
        logger.info("ready again (%s pass)", ", ".join(results))

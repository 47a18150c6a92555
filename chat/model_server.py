"""The model server: one process per host owns the GGUF models and serves every web process, worker
and evaluation over an OpenAI-compatible chat-completions API (``manage.py serve_model``, Procfile
``model``).

Endpoints (JSON; errors are ``{"error": {"message", "type"}}`` as OpenAI's, never a bare 500):

- ``POST /v1/chat/completions``: ``{"model", "messages": [{"role", "content"}], "stream",
  "max_tokens" (or "max_completion_tokens"), "temperature", "repeat_penalty" (llama.cpp's name; vLLM's
  "repetition_penalty" is read too), "seed", "ignore_eos" (as llama-server's and vLLM's: generate
  exactly ``max_tokens``, for benchmarks)}``. ``model`` names a model version of the registry
  (``chat.models.ModelVersion.name``; empty: the active one); its files are checked against their
  recorded SHA-256 before they are loaded. With ``stream`` true the answer is server-sent events of
  ``chat.completion.chunk`` objects (one per text piece, a last one with ``finish_reason`` and
  ``usage``, then ``data: [DONE]``), and a ``: keep-alive`` comment every ``KEEPALIVE_S`` while
  nothing else is sent; otherwise one ``chat.completion``. Status 400 bad request, 404 unknown
  model, 409 a file that no longer matches its SHA-256, 429 with ``Retry-After`` (seconds) when the
  bounded queue is full, 503 when the model cannot be loaded. A client that disconnects cancels its
  sequence (its KV cache is freed at once).
- ``GET /v1/models``: the registry's versions this server can serve (``{"data": [{"id", ...}]}``,
  the active one first: their files exist with a GGUF header), and beside them, as an extension
  OpenAI clients ignore, ``"unavailable": [{"id", "error"}]``: the versions it cannot serve and why
  (``"id": ""`` for the default ``LLM_MODEL_PATH`` while no version is active), which the web
  processes' ``/readyz`` shows.
- ``GET /health``: ``{"status": "ok", "loaded": [{"model", "pending", "queued"}]}`` (``pending``:
  requests waiting or generating on that version, ``queued``: those waiting).

Several versions can be loaded at once (``MODEL_SERVER_MAX_MODELS``, least recently used retired
first): the active one for customers and, say, a candidate under evaluation. A version that is
activated is loaded on its first request; answers in flight on the previous one finish there, and
that model is freed when it is retired (``chat.engine.Engine`` semantics). Each loaded version is a
continuous-batching engine (``chat.batching``) of ``MODEL_SERVER_SLOTS`` sequences.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import threading
import time
import uuid
from collections import OrderedDict
from functools import partial
from pathlib import Path
from typing import Callable

import anyio
from django.conf import settings
from django.db import close_old_connections
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from chat.engine import Engine, EngineBusy, EngineError, ModelKey

logger = logging.getLogger(__name__)

KEEPALIVE_S = 1.0
MAX_MESSAGES = 64
MAX_BODY_BYTES = 1 << 20
MAX_CONTENT_CHARS = 32_000
ROLES = {"system", "user", "assistant"}


class UnknownModel(LookupError):
    """No model version of that name."""


class ModelFileChanged(RuntimeError):
    """A version's file no longer has the SHA-256 recorded when it was registered."""


class BadRequest(ValueError):
    """The request body is not a valid chat completion request (the message says why)."""


def registry_key(name: str) -> ModelKey:
    """The (base, adapter) files of model version ``name`` (empty: the active version) as local paths,
    after checking that each file still has its recorded SHA-256. A file of the artifact storage is
    copied into this host's ``MODEL_CACHE_DIR`` first (once; ``chat.services.model_key``). Raises
    ``UnknownModel``, ``ModelFileChanged`` (also for a missing file; a digest mismatch is recorded on
    the version, ``chat.services.model_version_refuse``)."""
    from chat.engine import EngineError, ModelFilesMismatch
    from chat.models import ModelVersion
    from chat.services import file_sha256, model_key, model_version_active, model_version_refuse

    close_old_connections()
    try:
        if name:
            version = ModelVersion.objects.filter(name=name).first()
            if version is None:
                raise UnknownModel(f"no model version named {name!r}")
        else:
            try:
                version = model_version_active()
            except FileNotFoundError as error:
                raise UnknownModel(str(error)) from error
        try:
            key = model_key(version)
        except ModelFilesMismatch as error:
            model_version_refuse(version, str(error))
            raise ModelFileChanged(f"{version.name}: {error}") from None
        except EngineError as error:
            raise ModelFileChanged(f"{version.name}: {error}") from None
    finally:
        close_old_connections()
    for path, recorded in ((key.base_model_path, key.base_sha256), (key.adapter_path, key.adapter_sha256)):
        if not path:
            continue
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            raise ModelFileChanged(f"{version.name}: {path} is missing") from None
        if recorded and actual != recorded:
            raise ModelFileChanged(f"{version.name}: {path} has SHA-256 {actual[:12]}..., registered {recorded[:12]}...")
    return ModelKey(key.base_model_path, key.adapter_path)


class ModelPool:
    """The engines of the versions this server has loaded, at most ``max_models`` (least recently
    used first out: its queued and running answers finish, then it is freed).

    ``make_engine()`` returns a new, empty ``Engine`` (default: continuous batching with
    ``MODEL_SERVER_SLOTS`` sequences). Thread-safe; loading blocks the calling thread.
    """

    def __init__(self, *, make_engine: Callable[[], Engine] | None = None, max_models: int | None = None):
        self.make_engine = make_engine or default_engine
        self.max_models = max(1, max_models or settings.MODEL_SERVER_MAX_MODELS)
        self.engines: OrderedDict[ModelKey, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[ModelKey, threading.Lock] = {}

    def engine_for(self, key: ModelKey) -> Engine:
        """The engine serving ``key``, loaded now if needed (one load per key at a time; requests for
        versions already loaded are not held up by it). Raises ``EngineError``."""
        with self._lock:
            engine = self.engines.get(key)
            if engine is not None:
                self.engines.move_to_end(key)
                return engine
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                engine = self.engines.get(key)
            if engine is not None:
                return engine
            engine = self.make_engine()
            engine.ensure(key)  # raises EngineError; nothing changes then
            with self._lock:
                self.engines[key] = engine
                retired = []
                while len(self.engines) > self.max_models:
                    retired.append(self.engines.popitem(last=False)[1])
            for oldest in retired:
                oldest.shutdown(timeout_s=0)  # retire: what it holds still finishes, then it is freed
            return engine

    def loaded(self) -> list[ModelKey]:
        """Keys of the loaded versions, most recently used last."""
        with self._lock:
            return list(self.engines)

    def items(self) -> list[tuple[ModelKey, Engine]]:
        """``(key, engine)`` of the loaded versions, most recently used last."""
        with self._lock:
            return list(self.engines.items())

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Retire every engine and wait up to ``timeout_s`` each."""
        with self._lock:
            engines, self.engines = list(self.engines.values()), OrderedDict()
        for engine in engines:
            engine.shutdown(timeout_s=timeout_s)


def default_engine() -> Engine:
    """A continuous-batching engine of ``MODEL_SERVER_SLOTS`` sequences and ``LLM_QUEUE_SIZE`` waiting."""
    from chat.batching import BatchedModel, load_batch_model

    return Engine(load_model=partial(load_batch_model, slots=settings.MODEL_SERVER_SLOTS), start=BatchedModel)


def _error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _number(body: dict, names: tuple[str, ...], kind, default, low, high):
    for name in names:
        if body.get(name) is not None:
            value = body[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
                raise BadRequest(f"{name} must be a number")
            if not low <= value <= high:
                raise BadRequest(f"{name} must be between {low} and {high}")
            return kind(value)
    return default


def parse_request(body) -> dict:
    """Check a chat completion request; returns ``{"model", "messages", "stream", "options"}``.
    Raises ``BadRequest`` with the reason."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or len(messages) > MAX_MESSAGES:
        raise BadRequest(f"messages must be a list of 1 to {MAX_MESSAGES} messages")
    cleaned = []
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise BadRequest("each message needs a role (system, user or assistant) and a string content")
        if len(message["content"]) > MAX_CONTENT_CHARS:
            raise BadRequest(f"a message's content is limited to {MAX_CONTENT_CHARS} characters")
        cleaned.append({"role": message["role"], "content": message["content"]})
    model = body.get("model") or ""
    if not isinstance(model, str):
        raise BadRequest("model must be a string")
    options = {
        "max_tokens": _number(body, ("max_tokens", "max_completion_tokens"), int, settings.LLM_MAX_TOKENS, 1, 4096),
        "temperature": _number(body, ("temperature",), float, settings.LLM_TEMPERATURE, 0.0, 2.0),
        "repeat_penalty": _number(body, ("repeat_penalty", "repetition_penalty"), float, 1.0, 0.01, 10.0),
        "seed": _number(body, ("seed",), int, 0, 0, 2**31 - 1),
    }
    if body.get("ignore_eos"):
        options["ignore_eos"] = True
    return {"model": model, "messages": cleaned, "stream": bool(body.get("stream")), "options": options}


def create_app(pool: ModelPool | None = None, *, resolve: Callable[[str], ModelKey] = registry_key) -> Starlette:
    """The model server's ASGI app over ``pool`` (default a new ``ModelPool``); ``resolve(name)``
    maps a request's ``model`` to the files to serve (default ``registry_key``)."""
    pool = pool or ModelPool()
    # Each streaming answer waits for its next piece on a worker thread; allow many at once.
    limiter = anyio.CapacityLimiter(512)

    async def completions(request: Request):
        try:
            parsed = parse_request(json.loads(await request.body()))
        except (ValueError, UnicodeDecodeError) as error:  # BadRequest and JSONDecodeError
            message = str(error) if isinstance(error, BadRequest) else "the body is not valid JSON"
            return _error(400, message, "invalid_request_error")
        try:
            key = await run_in_threadpool(resolve, parsed["model"])
        except UnknownModel as error:
            return _error(404, str(error), "model_not_found")
        except ModelFileChanged as error:
            return _error(409, str(error), "model_file_changed")
        for attempt in range(2):
            try:
                engine = await run_in_threadpool(pool.engine_for, key)
                generation = engine.submit(parsed["messages"], **parsed["options"])
                break
            except EngineBusy as busy:
                return _error(429, str(busy), "server_busy", headers={"Retry-After": str(math.ceil(busy.retry_after_s))})
            except EngineError as error:
                if attempt == 0 and "no model loaded" in str(error):
                    continue  # the pool retired that engine a moment ago; load it again
                logger.error("cannot serve %s: %s", key, error)
                return _error(503, str(error), "model_unavailable")
        name = parsed["model"] or "active"
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            data = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}
            return f"data: {json.dumps(data)}\n\n"

        def usage() -> dict:
            stats = generation.stats
            return {"completion_tokens": stats.tokens,
                    "timings": {"queued_ms": round(stats.queued_ms, 1),
                                "first_token_ms": None if stats.first_token_ms is None else round(stats.first_token_ms, 1),
                                "decode_ms": round(stats.decode_ms, 1)}}

        def finish_reason() -> str:
            return "length" if generation.stats.finish_reason == "length" else "stop"

        if not parsed["stream"]:
            try:
                pieces = []
                while (piece := await anyio.to_thread.run_sync(generation.poll, KEEPALIVE_S,
                                                               abandon_on_cancel=True, limiter=limiter)) != "":
                    if piece:
                        pieces.append(piece)
            except EngineError as error:
                return _error(500, str(error), "server_error")
            finally:
                generation.cancel()
            return JSONResponse({
                "id": completion_id, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                             "finish_reason": finish_reason()}],
                "usage": usage(),
            })

        async def next_piece(ready: asyncio.Event) -> str | None:
            # Woken by the model thread (Generation.set_listener), not a worker thread blocked per
            # stream: with many streams, one thread hop per event competed with the scheduler.
            ready.clear()
            piece = generation.poll_joined(0)
            if piece is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), KEEPALIVE_S)
                piece = generation.poll_joined(0)
            return piece

        async def events():
            loop = asyncio.get_running_loop()
            ready = asyncio.Event()

            def wake() -> None:
                with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                    loop.call_soon_threadsafe(ready.set)

            generation.set_listener(wake)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    piece = await next_piece(ready)
                    if piece is None:
                        yield ": keep-alive\n\n"
                    elif piece == "":
                        break
                    else:
                        yield chunk({"content": piece})
                yield chunk({}, finish_reason(), usage=usage())
                yield "data: [DONE]\n\n"
            except EngineError as error:  # mid-stream failure: an error event, as llama-server sends
                yield f"data: {json.dumps({'error': {'message': str(error), 'type': 'server_error'}})}\n\n"
            finally:
                generation.set_listener(None)
                logger.debug("stream %s ended (%s)", completion_id, generation.stats.finish_reason or "client gone")
                generation.cancel()  # client gone (task cancelled) or done: free the sequence now

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def models(request: Request):
        def listed() -> dict:
            from chat.model_artifacts import model_file_problem
            from chat.model_files import gguf_file_problem
            from chat.models import ModelVersion

            close_old_connections()
            try:
                versions = list(ModelVersion.objects.order_by("-is_active", "name"))
            finally:
                close_old_connections()
            data, unavailable = [], []
            for v in versions:
                problem = next(filter(None, (model_file_problem(p, sha) for p, sha in (
                    (v.base_model_path, v.base_model_sha256), (v.adapter_path, v.adapter_sha256)) if p)), None)
                if problem:
                    unavailable.append({"id": v.name, "error": problem})
                else:
                    data.append({"id": v.name, "object": "model", "owned_by": "supportbot", "active": v.is_active,
                                 "adapter": bool(v.adapter_path)})
            if not any(v.is_active for v in versions):
                problem = gguf_file_problem(settings.LLM_MODEL_PATH)
                if problem:  # the default version cannot be registered: say why under the name ""
                    unavailable.append({"id": "", "error": f"no active model version, and LLM_MODEL_PATH: {problem}"})
            return {"object": "list", "data": data, "unavailable": unavailable}

        return JSONResponse(await run_in_threadpool(listed))

    async def health(request: Request):
        return JSONResponse({"status": "ok", "loaded": [
            {"model": str(key), "pending": engine.pending(), "queued": engine.queued()} for key, engine in pool.items()]})

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(pool.shutdown, 30)

    app = Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], lifespan=lifespan, max_body_size=MAX_BODY_BYTES)
    app.state.pool = pool
    return app

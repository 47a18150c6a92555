"""The model client: how the answer pipeline, the evaluation and the benchmarks ask a model for a
streamed chat completion, wherever the model runs.

``model_client()`` is the process's client, chosen by ``LLM_SERVER_URL``:

- empty (the default): ``LocalModelClient``, the model in this process (``chat.engine``);
- the bundled model server (``manage.py serve_model``, Procfile ``model``) or any other server
  speaking OpenAI's chat-completions API (llama.cpp's ``llama-server``, vLLM): ``HttpModelClient``.
  ``model`` in each request is the model version's ``name``, which the bundled server resolves in
  the registry and a remote server must serve under that name (README "Model server").

Both return a ``chat.engine.Generation`` (iterate it for text pieces; ``stats``; ``cancel()``) and map
failures onto the same exceptions, hence the same customer events: ``EngineBusy`` (HTTP 429/503,
``Retry-After``) becomes ``chat.busy``, ``EngineError`` (unreachable server, timeout, any other
error status, an error in the stream) ``chat.error``. Cancelling a remote generation closes its
HTTP stream, and the server frees the sequence.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Iterator, Protocol, Sequence

from django.conf import settings

from chat import engine as engine_module
from chat.engine import EngineBusy, EngineError, Generation, ModelKey

logger = logging.getLogger(__name__)


class ServedVersion(Protocol):
    """What a client needs of a model version (``chat.models.ModelVersion`` has it)."""

    name: str
    base_model_path: str
    adapter_path: str
    base_model_sha256: str
    adapter_sha256: str


class ModelClient(Protocol):
    """Streams chat completions from some model."""

    def submit(self, messages: Sequence[dict], *, version: ServedVersion, max_tokens: int | None = None,
               temperature: float | None = None, cancel: threading.Event | None = None) -> Generation:
        """Start a completion of ``messages`` (``[{"role", "content"}]``) by ``version``; defaults
        ``LLM_MAX_TOKENS``, ``LLM_TEMPERATURE``, ``LLM_REPEAT_PENALTY``. Raises ``EngineBusy`` or
        ``EngineError`` before anything is generated; later failures are raised by the iteration."""


class LocalModelClient:
    """The model in this process: ``engine`` (default the process engine, ``chat.engine.get_engine``),
    switched to the version's (base, adapter) pair before each submit unless ``switch`` is false
    (an evaluation's dedicated engine already serves its version)."""

    def __init__(self, engine: engine_module.Engine | None = None, *, switch: bool = True):
        self._engine = engine
        self.switch = switch

    @property
    def engine(self) -> engine_module.Engine:
        return self._engine or engine_module.get_engine()

    def submit(self, messages, *, version, max_tokens=None, temperature=None, cancel=None) -> Generation:
        engine = self.engine
        if self.switch:
            from chat.services.model_versions import model_key  # files of the artifact storage: this host's copies

            engine.ensure(model_key(version))
        return engine.submit(messages, max_tokens=max_tokens, temperature=temperature, cancel=cancel)


class HttpModelClient:
    """An OpenAI-compatible chat-completions server at ``base_url`` (``.../v1``), streamed over SSE.

    ``api_key`` is sent as a bearer token when set; ``timeout_s`` bounds the wait for the response's
    headers and then between two stream events (the bundled server sends a keep-alive comment every
    second, so only a stalled server times out); ``connect_timeout_s`` the TCP connect;
    ``retry_after_s`` is the busy delay when a 429/503 carries no ``Retry-After``. One connection pool
    per client, shared by threads (httpx2).
    """

    def __init__(self, base_url: str, *, api_key: str = "", timeout_s: float = 60.0, connect_timeout_s: float = 5.0,
                 retry_after_s: float = 2.0):
        import httpx2

        self.base_url = base_url.rstrip("/")
        self.retry_after_default_s = retry_after_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx2.Client(
            base_url=self.base_url, headers=headers,
            timeout=httpx2.Timeout(timeout_s, connect=connect_timeout_s),
            limits=httpx2.Limits(max_connections=256, max_keepalive_connections=64),
        )

    def submit(self, messages, *, version, max_tokens=None, temperature=None, cancel=None,
               ignore_eos: bool = False) -> Generation:
        """See ``ModelClient.submit``; ``ignore_eos`` asks for exactly ``max_tokens`` (benchmarks; llama-server,
        vLLM and the bundled server read it)."""
        import httpx2

        penalty = settings.LLM_REPEAT_PENALTY
        body = {
            "model": version.name,
            "messages": list(messages),
            "stream": True,
            "stream_options": {"include_usage": True},  # the token count (a chunk may hold several)
            "max_tokens": max_tokens if max_tokens is not None else settings.LLM_MAX_TOKENS,
            "temperature": temperature if temperature is not None else settings.LLM_TEMPERATURE,
            "repeat_penalty": penalty,  # llama.cpp's name
            "repetition_penalty": penalty,  # vLLM's name
        }
        if ignore_eos:
            body["ignore_eos"] = True
        generation = StreamedGeneration(messages=list(messages), options=body, external_cancel=cancel)
        generation.stats.model_key = ModelKey(version.base_model_path, version.adapter_path)
        try:
            request = self.http.build_request("POST", "/chat/completions", json=body)
            response = self.http.send(request, stream=True)
        except httpx2.TimeoutException as error:
            raise EngineError(f"the model server did not answer in time ({self.base_url})") from error
        except httpx2.HTTPError as error:
            raise EngineError(f"the model server is unreachable ({self.base_url}): {error}") from error
        if response.status_code != 200:
            try:
                response.read()
                detail = response.json().get("error", {})
                message = detail.get("message") if isinstance(detail, dict) else str(detail)
            except Exception:  # not JSON: keep the status only
                message = ""
            finally:
                response.close()
            if response.status_code in (429, 503):
                raise EngineBusy(self._retry_after(response))
            raise EngineError(f"the model server refused the request ({response.status_code}): {message or response.reason_phrase}")
        generation.response = response
        return generation

    def _retry_after(self, response) -> float:
        try:
            return max(1.0, float(response.headers.get("Retry-After", "")))
        except ValueError:  # absent, or an HTTP date: use the default
            return self.retry_after_default_s

    def models(self) -> list[str]:
        """Names of the models the server serves (``GET /models``). Raises ``EngineError``."""
        return self.model_listing()[0]

    def model_listing(self) -> tuple[list[str], dict[str, str]]:
        """``GET /models``: the names of the models the server serves, and ``{name: reason}`` of those
        it cannot serve (the bundled model server's ``unavailable`` list, ``""`` naming the default
        model when no version is active; other servers send none). Raises ``EngineError``."""
        import httpx2

        try:
            response = self.http.get("/models")
            response.raise_for_status()
            body = response.json()
            served = [m["id"] for m in body.get("data", [])]
            unavailable = {str(u["id"]): str(u["error"]) for u in body.get("unavailable", [])}
            return served, unavailable
        except (httpx2.HTTPError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise EngineError(f"could not list the models of {self.base_url}: {error}") from error

    def close(self) -> None:
        self.http.close()


class StreamedGeneration(Generation):
    """A ``Generation`` read from an SSE response (``response``) in the iterating thread.

    Each ``chat.completion.chunk`` with text is one piece; ``finish_reason`` and stats as the local
    engine's (``tokens``: the final chunk's ``usage.completion_tokens`` when the server sends it, as
    the bundled one and llama-server do, since a chunk may carry several tokens; else the pieces). Cancel is seen between
    events (the bundled server's keep-alives make that at least once a second) and closes the
    stream. An ``{"error"}`` event, a broken stream or a timeout raise ``EngineError``.
    """

    response = None
    _reading = False

    def __iter__(self) -> Iterator[str]:
        import httpx2

        self._reading = True
        stats = self.stats
        first = last = None
        try:
            if self.cancelled():  # cancelled before anything was read (the stream may be closed already)
                stats.finish_reason = "cancelled"
                return
            for line in self.response.iter_lines():
                if self.cancelled():
                    stats.finish_reason = "cancelled"
                    return
                if not line.startswith("data:"):
                    continue  # blank separators, ": keep-alive" comments, event names
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    event = json.loads(data)
                except ValueError:
                    raise EngineError("the model server sent a malformed event") from None
                if "error" in event:
                    error = event["error"]
                    stats.finish_reason = "error"
                    raise EngineError(f"the model failed: {error.get('message') if isinstance(error, dict) else error}")
                choices = event.get("choices") or [{}]
                text = (choices[0].get("delta") or {}).get("content")
                if text:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                        stats.first_token_ms = (first - self.submitted_at) * 1000
                    stats.tokens += 1
                    yield text
                if choices[0].get("finish_reason"):
                    stats.finish_reason = choices[0]["finish_reason"]
                usage = event.get("usage")
                if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
                    stats.tokens = usage["completion_tokens"]  # a chunk may carry several tokens
            if not stats.finish_reason:
                stats.finish_reason = "cancelled" if self.cancelled() else "stop"
        except httpx2.TimeoutException as error:
            stats.finish_reason = "error"
            raise EngineError("the model server stopped sending (timeout)") from error
        except (httpx2.HTTPError, httpx2.StreamError) as error:
            stats.finish_reason = "error"
            raise EngineError(f"the model server's stream broke: {error}") from error
        finally:
            if first is not None and last is not None:
                stats.decode_ms = (last - first) * 1000
            self.cancel_event.set()
            self.response.close()  # on cancel this tells the server to free the sequence

    def cancel(self) -> None:
        """Stop reading; the stream is closed by the reading thread at the next event (at most a
        keep-alive interval later with the bundled server); a stream nobody reads is closed now."""
        self.cancel_event.set()
        if not self._reading and self.response is not None:
            self.response.close()

    close = cancel


_client: ModelClient | None = None
_client_lock = threading.Lock()


def model_client() -> ModelClient:
    """The process's model client (see the module docstring); created on first use."""
    global _client
    with _client_lock:
        if _client is None:
            if settings.LLM_SERVER_URL:
                _client = HttpModelClient(settings.LLM_SERVER_URL, api_key=settings.LLM_SERVER_API_KEY,
                                          timeout_s=settings.LLM_SERVER_TIMEOUT_S)
            else:
                _client = LocalModelClient()
        return _client


def set_model_client(client: ModelClient | None) -> ModelClient | None:
    """Replace the process's model client (tests, benchmarks); returns the previous one."""
    global _client
    with _client_lock:
        previous, _client = _client, client
        return previous

"""The model engine: a local GGUF model (plus optional LoRA adapter) served by llama-cpp-python.

One ``LoadedModel`` per (base GGUF, adapter GGUF) pair owns a ``llama_cpp.Llama`` and a dedicated
generation thread that takes requests from a bounded queue, one at a time (a llama.cpp context is
not re-entrant). ``Engine`` holds the current ``LoadedModel``; ``Engine.ensure`` switches to another
pair while running: new requests go to the new model, requests already queued on or generating with
the old one finish there, then the old model is freed. When the current model's queue is full,
``Engine.submit`` raises ``EngineBusy`` instead of waiting.

Prompts are formatted with the model's own chat template (the GGUF's ``tokenizer.chat_template``,
applied by ``Llama.create_chat_completion``), and tokens are streamed (``stream=True``).

``get_engine()`` is the process-wide engine; tests replace its model loader with a fake
(``Engine(load_model=...)`` and ``set_engine``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

from django.conf import settings

from chat.model_files import file_sha256

logger = logging.getLogger(__name__)

_IDLE_POLL_S = 0.2


class EngineError(Exception):
    """Generation failed (the model raised, or could not be loaded)."""


class EngineBusy(EngineError):
    """The current model's request queue is full; retry after ``retry_after_s`` seconds."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"the model is busy; retry in {retry_after_s:.1f} s")
        self.retry_after_s = retry_after_s


class ModelFilesMismatch(EngineError):
    """A model file's SHA-256 is not the digest recorded for it: the (base, adapter) pair is refused
    and not loaded (``Engine.ensure`` keeps serving what it served)."""


class ChatModel(Protocol):
    """What the engine needs of a loaded model (``llama_cpp.Llama`` has it; fakes in tests too)."""

    def create_chat_completion(self, messages: list[dict], **kwargs) -> Iterator[dict]: ...


@dataclass(frozen=True)
class ModelKey:
    """Identity of a loadable model: base GGUF path plus LoRA adapter GGUF path (``""`` for none).

    ``base_sha256``/``adapter_sha256``: the hex SHA-256 digests the files must have (recorded at
    registration, ``chat.models.ModelVersion``); ``""`` skips the check. They are not part of the
    identity (equality and hash compare the paths only)."""

    base_model_path: str
    adapter_path: str = ""
    base_sha256: str = field(default="", compare=False)
    adapter_sha256: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.base_model_path + (f" + {self.adapter_path}" if self.adapter_path else "")


@dataclass
class GenerationStats:
    """Timings of one generation, in milliseconds (``time.perf_counter`` based).

    ``queued_ms``: submit until the model thread picked it up; ``first_token_ms``: submit until the
    first token (queue wait + prompt evaluation + first decode step); ``decode_ms``: first token to
    last token; ``tokens``: streamed completion tokens (one per stream chunk with text);
    ``finish_reason``: ``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``.
    """

    queued_ms: float = 0.0
    first_token_ms: float | None = None
    decode_ms: float = 0.0
    tokens: int = 0
    finish_reason: str = ""
    model_key: ModelKey | None = None

    @property
    def tokens_per_s(self) -> float:
        """Decode rate: tokens after the first over the time since the first (0.0 for < 2 tokens)."""
        if self.tokens < 2 or self.decode_ms <= 0:
            return 0.0
        return (self.tokens - 1) / (self.decode_ms / 1000)


_DONE = object()


@dataclass
class Generation:
    """A submitted request; iterate it for the streamed text pieces (``str``), in order.

    Iteration ends when the model stops (end of turn, ``max_tokens``, or cancel); ``stats`` is then
    complete. Raises ``EngineError`` from iteration if the model failed. ``cancel()`` (or setting the
    caller's ``cancel`` event passed to ``submit``, which the engine only reads) stops generation at
    the next token; ``close()`` cancels and is called when the iterator is closed early.
    """

    messages: list[dict]
    options: dict
    external_cancel: threading.Event | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    stats: GenerationStats = field(default_factory=GenerationStats)
    submitted_at: float = field(default_factory=time.perf_counter)
    _events: "queue.SimpleQueue" = field(default_factory=queue.SimpleQueue)
    _ended: bool = False
    _held: object = None  # an end or error read ahead by poll_joined, returned by the next poll
    _listener: Callable[[], None] | None = None

    def put(self, item) -> None:
        """Queue ``item`` for the reader (a text piece, the end marker or an exception) and call the
        listener. Called by the model thread only."""
        self._events.put(item)
        listener = self._listener
        if listener is not None:
            listener()

    def set_listener(self, listener: Callable[[], None] | None) -> None:
        """Have ``listener()`` called from the model thread after each item is queued (a text piece,
        the end, an error), and once now when items are already waiting; ``None`` removes it. It must
        not block or raise: an event loop's reader passes ``loop.call_soon_threadsafe(event.set)``
        and then reads with ``poll(0)`` instead of a thread blocked in ``poll`` per stream."""
        self._listener = listener
        if listener is not None and (self._held is not None or not self._events.empty()):
            listener()

    def cancel(self) -> None:
        """Ask the model thread to stop this generation (no effect once it has finished)."""
        self.cancel_event.set()

    def cancelled(self) -> bool:
        """Whether this generation or the caller's event asked to stop."""
        return self.cancel_event.is_set() or (self.external_cancel is not None and self.external_cancel.is_set())

    def poll(self, timeout_s: float) -> str | None:
        """The next text piece, waiting at most ``timeout_s`` (0: not at all): ``None`` when none came in time, ``""``
        once the generation has ended (and on every call after). Raises ``EngineError`` if the model
        failed. For callers that must do something while waiting (the model server's keep-alives)."""
        if self._ended:
            return ""
        if self._held is not None:
            item, self._held = self._held, None
        else:
            try:
                item = self._events.get(timeout=timeout_s) if timeout_s > 0 else self._events.get_nowait()
            except queue.Empty:
                return None
        if item is _DONE:
            self._ended = True
            return ""
        if isinstance(item, BaseException):
            self._ended = True
            raise EngineError(str(item)) from item
        return item

    def poll_joined(self, timeout_s: float) -> str | None:
        """As ``poll``, but the text pieces already queued behind the first one come joined with it
        (the end or an error after them is kept for the next call). A reader that falls behind the
        model (the model server's event loop with many streams) then sends one event for several
        tokens instead of one each."""
        first = self.poll(timeout_s)
        if not first:
            return first
        pieces = [first]
        while True:
            try:
                item = self._events.get_nowait()
            except queue.Empty:
                break
            if item is _DONE or isinstance(item, BaseException):
                self._held = item
                break
            pieces.append(item)
        return "".join(pieces)

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                item = self._events.get()
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise EngineError(str(item)) from item
                yield item
        finally:
            # Reached on normal end too; harmless then. On early close it stops the model thread.
            self.cancel_event.set()

    close = cancel


def model_files_verify(key: ModelKey) -> None:
    """Check ``key``'s files against its recorded digests (``chat.model_files.file_sha256``, cached per
    path, size and mtime, so only a new or changed file is read). A file without a recorded digest is
    not checked.

    Raises ``EngineError`` when a file is missing and ``ModelFilesMismatch`` (with both digests) when
    a file's SHA-256 differs from the recorded one.
    """
    for path, expected in ((key.base_model_path, key.base_sha256), (key.adapter_path, key.adapter_sha256)):
        if not path or not expected:
            continue
        try:
            actual = file_sha256(path)
        except FileNotFoundError:
            raise EngineError(f"model file not found: {path}") from None
        if actual != expected:
            raise ModelFilesMismatch(f"{path} has sha256 {actual}, but {expected} was recorded for it")


def model_files_check(key: ModelKey) -> None:
    """Raise ``EngineError`` with ``chat.model_files.gguf_file_problem``'s reason (``"model file not
    found: <path>"``, ``"not a GGUF file: <path>"``, ...) when ``key``'s base or adapter file cannot be
    a GGUF llama.cpp loads; llama.cpp's own error for such a file says only "Failed to load model"."""
    from chat.model_files import gguf_file_problem

    for path in filter(None, (key.base_model_path, key.adapter_path)):
        problem = gguf_file_problem(path)
        if problem:
            raise EngineError(problem)


def load_llama(key: ModelKey, *, n_threads: int | None = None) -> ChatModel:
    """Load ``key`` with llama-cpp-python: context and GPU layers from settings, ``n_threads``
    (default ``LLM_THREADS``) for decoding and prompt evaluation; the base weights in the serving
    weight type (``chat.weight_types.serving_model_path``, ``LLM_WEIGHT_TYPE``).

    Raises ``EngineError`` when a file is missing or llama.cpp cannot load it.
    """
    import llama_cpp

    from chat.llama_buffers import llama_loading
    from chat.weight_types import serving_model_path

    model_files_check(key)
    try:
        base_path = serving_model_path(key.base_model_path, key.base_sha256)
        with llama_loading():
            return llama_cpp.Llama(
                model_path=base_path,
                lora_path=key.adapter_path or None,
                n_ctx=settings.LLM_CONTEXT_TOKENS,
                n_threads=n_threads or settings.LLM_THREADS,
                n_threads_batch=n_threads or settings.LLM_THREADS,
                n_gpu_layers=settings.LLM_GPU_LAYERS,
                seed=0,
                verbose=False,
            )
    except Exception as error:  # llama-cpp raises ValueError/RuntimeError with the C error text
        raise EngineError(f"could not load {key}: {error}") from error


class LoadedModel:
    """One loaded (base, adapter) pair and its generation thread with a bounded request queue.

    ``queue_size`` bounds the requests *waiting* (the one generating is not counted). After
    ``retire()`` no request may be submitted; the thread finishes what is queued, frees the model
    (``close()`` when it has one) and exits.
    """

    def __init__(self, key: ModelKey, model: ChatModel, *, queue_size: int):
        self.key = key
        self.model = model
        self.requests: queue.Queue[Generation] = queue.Queue(maxsize=max(queue_size, 1))
        self.retired = threading.Event()
        self.finished = threading.Event()
        self.active: Generation | None = None
        self.recent_generation_s = 3.0  # moving average, used to suggest retry delays
        self.thread = threading.Thread(target=self._run, name=f"llm-{key.base_model_path[-40:]}", daemon=True)
        self.thread.start()

    def put(self, generation: Generation) -> None:
        """Queue ``generation``; raises ``EngineBusy`` when the queue is full."""
        try:
            self.requests.put_nowait(generation)
        except queue.Full:
            raise EngineBusy(self.retry_after_s()) from None

    def retry_after_s(self) -> float:
        """A suggested wait (s) before retrying: the average generation time, at least 1 s."""
        return round(max(1.0, self.recent_generation_s), 1)

    def pending(self) -> int:
        """Requests waiting plus the one generating."""
        return self.requests.qsize() + (self.active is not None)

    def _run(self) -> None:
        while True:
            try:
                generation = self.requests.get(timeout=_IDLE_POLL_S)
            except queue.Empty:
                if not self.retired.is_set():
                    continue
                # Retired: every submit happened before the flag was set, so one drain is complete.
                try:
                    generation = self.requests.get_nowait()
                except queue.Empty:
                    break
            self.active = generation
            try:
                self._generate(generation)
            finally:
                self.active = None
        self._free()

    def _generate(self, generation: Generation) -> None:
        stats = generation.stats
        stats.model_key = self.key
        picked_up = time.perf_counter()
        stats.queued_ms = (picked_up - generation.submitted_at) * 1000
        if generation.cancelled():
            stats.finish_reason = "cancelled"
            generation.put(_DONE)
            return
        first = last = None
        stream = None
        try:
            stream = self.model.create_chat_completion(generation.messages, stream=True, **generation.options)
            for chunk in stream:
                if generation.cancelled():
                    stats.finish_reason = "cancelled"
                    break
                choice = chunk["choices"][0]
                text = choice.get("delta", {}).get("content")
                if text:
                    last = time.perf_counter()
                    if first is None:
                        first = last
                        stats.first_token_ms = (first - generation.submitted_at) * 1000
                    stats.tokens += 1
                    generation.put(text)
                if choice.get("finish_reason"):
                    stats.finish_reason = choice["finish_reason"]
        except Exception as error:  # reported to the consumer; the thread keeps serving
            logger.exception("generation failed on %s", self.key)
            stats.finish_reason = "error"
            generation.put(error)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # stops llama-cpp's generator (and its sampling loop) when we broke out early
            if first is not None and last is not None:
                stats.decode_ms = (last - first) * 1000
            elapsed = time.perf_counter() - picked_up
            self.recent_generation_s = 0.8 * self.recent_generation_s + 0.2 * elapsed
            if stats.finish_reason != "error":
                generation.put(_DONE)

    def _free(self) -> None:
        close = getattr(self.model, "close", None)
        if close is not None:
            try:
                close()
            except Exception:  # freeing must not kill the process
                logger.exception("closing %s failed", self.key)
        self.model = None
        self.finished.set()
        logger.info("freed model %s", self.key)


class Engine:
    """The process's model server: one current ``LoadedModel``, swappable while running.

    ``load_model(key)`` loads a model (default ``load_llama``) and ``start(key, model, queue_size=)``
    wraps it in its serving thread (default ``LoadedModel``, one answer at a time;
    ``chat.batching.BatchedModel`` with ``chat.batching.load_batch_model`` decodes many together, see
    ``batched_engine``); ``queue_size`` defaults to ``settings.LLM_QUEUE_SIZE``.
    """

    def __init__(self, *, load_model: Callable[[ModelKey], object] = load_llama, queue_size: int | None = None,
                 start: Callable[..., "LoadedModel"] | None = None):
        self.load_model = load_model
        self.start = start or LoadedModel
        self.queue_size = queue_size
        self._current: LoadedModel | None = None
        self._lock = threading.Lock()  # guards _current and submit-vs-retire
        self._load_lock = threading.Lock()  # one load at a time
        self.retiring: list[LoadedModel] = []

    @property
    def current_key(self) -> ModelKey | None:
        """The (base, adapter) pair new requests go to, or ``None`` before the first load."""
        current = self._current
        return current.key if current else None

    def ensure(self, key: ModelKey) -> None:
        """Serve ``key``: load it unless it is already current, then swap it in.

        Requests already queued on or generating with the previous model finish there; that model is
        freed afterwards (by its own thread). Loading happens outside the submit lock, so chats keep
        being served by the old model while the new one loads. The files are checked against
        ``key``'s recorded digests first (``model_files_verify``). Raises ``ModelFilesMismatch`` when a
        digest differs and ``EngineError`` when loading fails (the previous model stays current in
        both cases).
        """
        if self.current_key == key:
            return
        with self._load_lock:
            if self.current_key == key:
                return
            model_files_verify(key)
            loaded = self.start(
                key, self.load_model(key),
                queue_size=self.queue_size if self.queue_size is not None else settings.LLM_QUEUE_SIZE,
            )
            with self._lock:
                previous, self._current = self._current, loaded
                if previous is not None:
                    previous.retired.set()
            if previous is not None:
                self.retiring = [m for m in self.retiring if not m.finished.is_set()] + [previous]
                logger.info("switched model %s -> %s", previous.key, key)

    def submit(
        self,
        messages: Sequence[dict],
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        cancel: threading.Event | None = None,
        **options,
    ) -> Generation:
        """Queue a chat completion of ``messages`` (``[{"role", "content"}]``) on the current model.

        Returns a ``Generation`` to iterate for text pieces. ``max_tokens``/``temperature`` default
        to ``LLM_MAX_TOKENS``/``LLM_TEMPERATURE``, ``repeat_penalty`` to ``LLM_REPEAT_PENALTY``; extra
        ``options`` go to ``create_chat_completion``.
        Raises ``EngineBusy`` when the queue is full and ``EngineError`` when no model is loaded.
        """
        generation = Generation(
            messages=list(messages),
            options={
                "max_tokens": max_tokens if max_tokens is not None else settings.LLM_MAX_TOKENS,
                "temperature": temperature if temperature is not None else settings.LLM_TEMPERATURE,
                "repeat_penalty": settings.LLM_REPEAT_PENALTY,
                **options,
            },
            external_cancel=cancel,
        )
        with self._lock:
            if self._current is None:
                raise EngineError("no model loaded (call ensure first)")
            self._current.put(generation)
        return generation

    def has_capacity(self) -> bool:
        """Whether a submit now would be queued (a hint: another thread may take the last slot)."""
        current = self._current
        return current is not None and not current.requests.full()

    def pending(self) -> int:
        """Requests waiting or generating on the current model (0 before the first load)."""
        current = self._current
        return current.pending() if current else 0

    def queued(self) -> int:
        """Requests waiting on the current model (not yet generating)."""
        current = self._current
        return current.requests.qsize() if current else 0

    def retry_after_s(self) -> float:
        """Suggested wait before retrying a busy request, in seconds."""
        current = self._current
        return current.retry_after_s() if current else 1.0

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Retire every model (queued requests still finish) and wait up to ``timeout_s`` for them."""
        with self._lock:
            models = [m for m in [self._current, *self.retiring] if m is not None]
            self._current = None
            self.retiring = []
            for model in models:
                model.retired.set()
        for model in models:
            model.thread.join(timeout_s)


def batched_engine(*, queue_size: int | None = None) -> Engine:
    """An engine whose models decode up to ``LLM_SLOTS`` conversations together (continuous
    batching, ``chat.batching``)."""
    from chat.batching import BatchedModel, load_batch_model

    return Engine(load_model=load_batch_model, start=BatchedModel, queue_size=queue_size)


def engine_from_settings(*, queue_size: int | None = None) -> Engine:
    """A new engine as configured: continuous batching when ``LLM_SLOTS`` > 1, else the serial one."""
    if settings.LLM_SLOTS > 1:
        return batched_engine(queue_size=queue_size)
    return Engine(queue_size=queue_size)


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine() -> Engine:
    """The process-wide engine (``engine_from_settings``; created on first use; models load on the
    first ``ensure``)."""
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = engine_from_settings()
        return _engine


def set_engine(engine: Engine | None) -> Engine | None:
    """Replace the process-wide engine (tests, benchmarks); returns the previous one."""
    global _engine
    with _engine_lock:
        previous, _engine = _engine, engine
        return previous

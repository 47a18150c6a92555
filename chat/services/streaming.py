"""The answer pipeline for asyncio code: ``answer_events`` runs ``answer_stream`` on a thread of a
bounded pool and hands its events to the caller's event loop (the websocket consumer's), which never
blocks. At most ``ANSWER_MAX_CONCURRENT`` pipelines run at once per process (``AnswerPipelines``);
a question past that bound gets ``chat.busy`` at once, like a full model queue.

Part of ``chat.services``; callers use ``chat.services.answer_events`` (looked up on the package at
call time, so tests can replace it there).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Callable

from django.conf import settings
from django.db import close_old_connections, connection

from chat.services.answers import AnswerEvent, answer_stream
from chat.services.conversations import BUSY_MESSAGE

logger = logging.getLogger(__name__)


class AnswerPipelines:
    """At most ``limit`` answer pipelines running at once (``limit`` >= 1), each on a thread of a
    ``ThreadPoolExecutor`` of ``limit`` threads (``answer-pipeline_<n>``, started as needed and
    reused), so a burst of questions holds at most ``limit`` threads and ``limit`` database
    connections in the process, however many sockets ask.

    A place is taken without waiting (a ``BoundedSemaphore`` acquired non-blocking, on the caller's
    thread: the event loop never blocks on it) and given back when the pipeline's work returns.
    """

    def __init__(self, limit: int):
        self.limit = max(int(limit), 1)
        self._places = threading.BoundedSemaphore(self.limit)
        self._executor = ThreadPoolExecutor(max_workers=self.limit, thread_name_prefix="answer-pipeline")
        self._lock = threading.Lock()
        self._running = 0
        self.recent_pipeline_s = 3.0  # moving average of a pipeline's duration (s), for retry delays

    @property
    def running(self) -> int:
        """Pipelines started and not yet ended (0..``limit``)."""
        return self._running

    def try_start(self, work: Callable[[], None], *, on_end: Callable[[], None] | None = None) -> bool:
        """Run ``work()`` on a pipeline thread if fewer than ``limit`` run; ``False`` (nothing started)
        when all places are taken. ``on_end()`` runs on that thread after ``work`` returns or raises
        and its place is free again, so whoever it tells may start another pipeline at once.

        Exceptions of ``work`` are logged, not raised (``work`` reports its own failures). Raises
        ``RuntimeError`` (the place given back) when the pool has been shut down."""
        if not self._places.acquire(blocking=False):
            return False
        with self._lock:
            self._running += 1

        def run() -> None:
            started = time.perf_counter()
            try:
                work()
            except Exception:
                logger.exception("answer pipeline thread failed")
            finally:
                self._end(time.perf_counter() - started)
                if on_end is not None:
                    on_end()

        try:
            self._executor.submit(run)
        except BaseException:
            self._end(None)
            raise
        return True

    def retry_after_s(self) -> float:
        """A suggested wait (s) before asking again when every place is taken: the average duration
        of a pipeline (each running one started before now, so one is likely to have ended by
        then), at least 1 s, to 0.1 s. Same rule as the engine's queue (``chat.engine.LoadedModel``)."""
        return round(max(1.0, self.recent_pipeline_s), 1)

    def shutdown(self) -> None:
        """Start no new pipeline; running ones finish, then their threads exit (not waited for)."""
        self._executor.shutdown(wait=False)

    def _end(self, duration_s: float | None) -> None:
        with self._lock:
            self._running -= 1
            if duration_s is not None:
                self.recent_pipeline_s = 0.8 * self.recent_pipeline_s + 0.2 * duration_s
        self._places.release()


_pipelines: AnswerPipelines | None = None
_pipelines_lock = threading.Lock()


def answer_pipelines() -> AnswerPipelines:
    """The process's ``AnswerPipelines``, bounded by ``ANSWER_MAX_CONCURRENT`` (read on each call;
    when the setting changes, as tests do, a pool with the new bound takes over and the old one's
    running pipelines finish on their threads, which then exit)."""
    global _pipelines
    limit = max(int(settings.ANSWER_MAX_CONCURRENT), 1)
    with _pipelines_lock:
        if _pipelines is None or _pipelines.limit != limit:
            if _pipelines is not None:
                _pipelines.shutdown()
            _pipelines = AnswerPipelines(limit)
        return _pipelines


async def answer_events(
    conversation_id, question: str, *, cancel: threading.Event | None = None
) -> AsyncIterator[AnswerEvent]:
    """``answer_stream`` for asyncio code (consumers): the same events, without blocking the loop.

    The pipeline (database and retrieval) runs on a thread of the process's bounded pool
    (``answer_pipelines``), which closes its database connection at the end; the model runs on the
    engine's thread (or the model server). When ``ANSWER_MAX_CONCURRENT`` pipelines already run in
    this process, yields only ``chat.busy`` ``{"retry_after_s", "message": BUSY_MESSAGE}`` at once:
    nothing is stored, so the client sends the same question again after ``retry_after_s`` seconds
    (as after the engine's ``chat.busy``). When the caller sets ``cancel``, stops iterating, or its
    task is cancelled, generation stops at the next token (the partial answer is stored, as with
    ``answer_stream``).
    """
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    stop = _EitherEvent(cancel)
    end = object()

    def deliver(item) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            stop.set()

    def run() -> None:
        close_old_connections()
        stream = answer_stream(conversation_id, question, cancel=stop)
        try:
            for event in stream:
                deliver(event)
        except Exception as error:  # reported as chat.error; the consumer stays usable
            logger.exception("answer pipeline failed")
            deliver(error)
        finally:
            stream.close()
            connection.close()

    pipelines = answer_pipelines()
    if not pipelines.try_start(run, on_end=lambda: deliver(end)):
        yield AnswerEvent("chat.busy", {"retry_after_s": pipelines.retry_after_s(), "message": BUSY_MESSAGE})
        return
    try:
        while True:
            item = await events.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                yield AnswerEvent("chat.error", {"message": "Something went wrong; please try again."})
                continue
            yield item
    finally:
        stop.set()  # our own flag: the caller's event is only read, never set


class _EitherEvent(threading.Event):
    """An event that also reads as set when the caller's ``other`` event is set (the engine polls
    ``is_set`` between tokens), so stopping one answer never sets the caller's event."""

    def __init__(self, other: threading.Event | None):
        super().__init__()
        self.other = other

    def is_set(self) -> bool:
        return super().is_set() or (self.other is not None and self.other.is_set())

"""The answer pipeline for asyncio code: ``answer_events`` runs ``answer_stream`` on a thread of its
own and hands its events to the caller's event loop (the websocket consumer's), which never blocks.
Part of ``chat.services``; callers use ``chat.services.answer_events`` (looked up on the package at
call time, so tests can replace it there).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import AsyncIterator

from django.db import close_old_connections, connection

from chat.services.answers import AnswerEvent, answer_stream

logger = logging.getLogger(__name__)


async def answer_events(
    conversation_id, question: str, *, cancel: threading.Event | None = None
) -> AsyncIterator[AnswerEvent]:
    """``answer_stream`` for asyncio code (consumers): the same events, without blocking the loop.

    The pipeline (database and retrieval) runs on a thread of its own that is closed with its
    database connection at the end; the model runs on the engine's thread. When the caller sets
    ``cancel``, stops iterating, or its task is cancelled, generation stops at the next token (the
    partial answer is stored, as with ``answer_stream``).
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
            deliver(end)

    worker = threading.Thread(target=run, name="answer-pipeline", daemon=True)
    worker.start()
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

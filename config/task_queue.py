"""Sending Celery tasks when the task queue (the Celery broker: ``settings.REDIS_URL``) may be down.

Every place that queues a task from a request or a service does it through
``task_enqueue_on_commit``: the task is sent once the current transaction commits (never from inside
it). When the broker cannot be reached (``QUEUE_ERRORS``: kombu gives up after its publish retries,
about 0.6 s for a refused connection), what the request stored stays stored, nothing raises (no 500),
one WARNING line is logged, and the caller's ``on_unsent`` callback records what has to happen
instead, so nothing is lost:

- ingestion (``knowledge.services.sources_enqueue``): the sources stay ``queued`` and are marked
  unsent; the periodic ``knowledge.send_unsent_sources`` sends them once the queue is back;
- a website's sync, a fine-tune run, an embedder run: the queued run is marked failed with
  ``unsent_reason(...)`` (nothing else was touched), so it does not block the next one; start it again.

``TaskQueueOutageMiddleware`` tells the person whose request it was: an admin or dashboard page gets
a warning message naming what was not started and what becomes of it. (No JSON endpoint queues a
task today; one that does should answer 503 with ``Retry-After`` when ``request_unsent`` says so.)
"""

from __future__ import annotations

import contextvars
import logging
from typing import Callable

from django.contrib import messages
from django.db import transaction
from kombu.exceptions import OperationalError

logger = logging.getLogger(__name__)

# What ``apply_async`` raises when the broker cannot be reached (kombu wraps redis-py's connection
# errors and timeouts in it once its publish retries are spent).
QUEUE_ERRORS: tuple[type[BaseException], ...] = (OperationalError,)

# The tasks of the current request that could not be sent: a list of ``later`` texts, or ``None``
# outside a request (workers, commands). A list, mutated in place, so an update made on another
# thread of the same request (asgiref runs sync code in a thread with a copy of the context) is seen.
_unsent: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("task_queue_unsent", default=None)


def unsent_reason(what: str) -> str:
    """The error recorded on a run whose task could not be sent (``what``: ``"sync"``, ``"run"``)."""
    return f"not started: the task queue was unreachable when this {what} was queued; start it again"


def task_send(task, args: tuple = (), kwargs: dict | None = None, *, on_unsent: Callable[[], None] | None = None,
              later: str = "") -> bool:
    """Send Celery task ``task`` (a task object) with ``args`` and ``kwargs`` now. Returns whether it
    was sent. When the broker is unreachable (``QUEUE_ERRORS``): logs one WARNING line (no traceback),
    calls ``on_unsent()`` (its own errors propagate), notes ``later`` (what becomes of the work, for
    the person who asked: ``TaskQueueOutageMiddleware``) and returns ``False``."""
    try:
        task.apply_async(args, kwargs or {})
        return True
    except QUEUE_ERRORS as error:
        logger.warning("task %s not sent, the task queue is unreachable (%s); %s", task.name,
                       f"{type(error).__name__}: {error}".replace("\n", " "), later or "nothing will run it")
        if on_unsent is not None:
            on_unsent()
        noted = _unsent.get()
        if noted is not None:
            noted.append(later)
        return False


def task_enqueue_on_commit(task, args: tuple = (), kwargs: dict | None = None, *,
                           on_unsent: Callable[[], None] | None = None, later: str = "") -> None:
    """``task_send(task, args, kwargs, on_unsent=..., later=...)`` once the current transaction
    commits (at once outside a transaction; never if it rolls back). ``on_unsent`` must record what
    keeps the work from being lost (it runs after the commit, outside the transaction);
    ``later`` (``"it will start when the queue is back"``) is what the person who asked is told."""
    transaction.on_commit(lambda: task_send(task, args, kwargs, on_unsent=on_unsent, later=later))


def request_unsent() -> list[str]:
    """The ``later`` texts of the tasks the current request could not send so far (empty outside
    ``TaskQueueOutageMiddleware``)."""
    return list(_unsent.get() or [])


class TaskQueueOutageMiddleware:
    """Tells the person whose request queued tasks that could not be sent: a warning message (shown
    on the next page, e.g. after the admin's redirect) listing what becomes of the work. Sits after
    ``MessageMiddleware`` in ``MIDDLEWARE``, so the message is stored with the response. Tasks sent
    when an outer transaction commits (the admin's change form is atomic) are still inside it."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        noted: list[str] = []
        token = _unsent.set(noted)
        try:
            response = self.get_response(request)
        finally:
            _unsent.reset(token)
        if noted and hasattr(request, "_messages"):
            outcomes = "; ".join(dict.fromkeys(text for text in noted if text))
            messages.warning(request, f"Saved, but the task queue is unreachable, so {len(noted)} task(s) did not "
                                      f"start now: {outcomes}.")
        return response

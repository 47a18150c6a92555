"""What the chat does while its Redis (``settings.REDIS_URL``) cannot be reached.

Redis carries the Channels layer (a conversation's events between web processes), the rate-limit
counters (``chat.rate_limits``) and the Celery broker. Without it, nothing answers 500 and nothing
logs a traceback per request; each refusal or skip logs one WARNING line, and everything works again
on the next request once Redis is back (redis-py reconnects; no restart of the web process):

- websockets (``RedisOutageConsumer``, the base of the customer's and the agents' consumers): a
  socket whose channel layer fails (``group_add`` in the handshake, or its channel's receive while
  open) is closed with ``CLOSE_UNAVAILABLE`` (4503) instead of a 500 handshake or a 1011 close; the
  customer's socket is accepted first and told ``chat.unavailable`` ``{"retry_after_s", "message"}``
  (``chat.consumers``), which the widget answers by reconnecting after that delay;
- HTTP: limits that protect customers' data fail closed with 503, ``Retry-After:
  RETRY_AFTER_S`` and ``{"error", "retry_after_s"}``; limits that protect capacity fail open (see
  ``chat.rate_limits``);
- notifications to agents' dashboards and customers' sockets are skipped (``chat.notifications``):
  the change itself is committed, and both pages re-read it when their socket reconnects.
"""

from __future__ import annotations

import logging

from channels.generic.websocket import AsyncJsonWebsocketConsumer
from limits.errors import StorageError
from redis.exceptions import RedisError

logger = logging.getLogger(__name__)

# Errors meaning Redis could not be reached or did not answer in time: redis-py's (connection refused,
# socket missing, connection closed by a restart, timeouts; the Channels layer's and the rate limiter's
# client both raise them) and the ``limits`` library's wrapper of them.
REDIS_ERRORS: tuple[type[BaseException], ...] = (RedisError, StorageError)
# Seconds a client is told to wait before trying again (``Retry-After``, ``retry_after_s``).
RETRY_AFTER_S = 5
# Close code of a websocket ended because Redis is unavailable (HTTP's 503 in the 4000-4999 range).
CLOSE_UNAVAILABLE = 4503


def redis_error_text(error: BaseException) -> str:
    """``"ConnectionError: Error 2 connecting to unix socket: ..."``: the exception in one line, for the
    WARNING line that replaces a traceback."""
    return f"{type(error).__name__}: {error}".replace("\n", " ")


class RedisOutageConsumer(AsyncJsonWebsocketConsumer):
    """A Channels JSON consumer whose Redis going away ends the socket cleanly.

    Channels runs a consumer as one loop over the client's frames and its channel-layer channel; an
    exception from either (``group_add`` in ``connect()``, the channel's receive when Redis stops)
    would leave the loop, and the ASGI server would log a traceback and answer the handshake with 500
    or close an open socket with 1011. Here a ``REDIS_ERRORS`` exception leaving the loop calls
    ``redis_lost(error)`` instead, after one WARNING line; other exceptions are left to the server.
    ``accepted`` and ``closed`` tell what the socket has been told so far."""

    accepted: bool = False
    closed: bool = False

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except REDIS_ERRORS as error:
            logger.warning("websocket %s ended: its Redis is unavailable (%s)", scope.get("path"),
                           redis_error_text(error))
            await self.redis_lost(error)

    async def accept(self, subprotocol=None, headers=None) -> None:
        await super().accept(subprotocol, headers)
        self.accepted = True

    async def close(self, code=None, reason=None) -> None:
        await super().close(code, reason)
        self.closed = True

    async def redis_lost(self, error: BaseException) -> None:
        """End the socket after its channel layer failed: close it with ``CLOSE_UNAVAILABLE`` (before
        acceptance that refuses the handshake; the ASGI server answers 403), unless it is closed
        already. Subclasses add what their client should be told."""
        if not self.closed:
            await self.close(code=CLOSE_UNAVAILABLE)

    async def group_discard_quietly(self, group: str) -> None:
        """Leave ``group`` on disconnect; without Redis there is nothing to leave (a restart without
        persistence emptied it, or the channel layer expires the membership after its
        ``group_expiry``), so ``REDIS_ERRORS`` are ignored."""
        try:
            await self.channel_layer.group_discard(group, self.channel_name)
        except REDIS_ERRORS:
            pass

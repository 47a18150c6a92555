"""The agent dashboard's websocket (``/ws/agent/``): pushes ``inbox.changed`` events to agents.

Frames out: ``{"type": "inbox.changed", "conversation_id": str, "kind": str}`` (see
``chat.notifications``). No frames in. Authenticated in ``connect()`` from the session cookie
(``AuthMiddlewareStack``): anonymous users are refused with close code 4401, logged-in users who are
not agents with 4403; the socket joins the ``agents`` group and is accepted last. While Redis (the
channel layer) is unavailable a handshake is refused and an open socket closed, with code 4503
(``chat.redis_outage``: one WARNING line, no traceback); the page reconnects with its back-off and
re-reads its lists once connected.
"""

from __future__ import annotations

from channels.db import database_sync_to_async

from chat.access import is_agent
from chat.notifications import AGENTS_CHANNEL_GROUP
from chat.redis_outage import RedisOutageConsumer

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FORBIDDEN = 4403


class AgentConsumer(RedisOutageConsumer):
    """One agent dashboard page (see the module docstring)."""

    joined = False

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        if not await database_sync_to_async(is_agent)(user):
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.channel_layer.group_add(AGENTS_CHANNEL_GROUP, self.channel_name)
        self.joined = True
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.group_discard_quietly(AGENTS_CHANNEL_GROUP)

    async def receive_json(self, content, **kwargs) -> None:
        """Agents send nothing over this socket; frames are ignored."""

    async def inbox_changed(self, event: dict) -> None:
        """Relay ``inbox.changed`` to the page."""
        await self.send_json(event)

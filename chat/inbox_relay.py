"""The customer's chat consumer, plus ``inbox.changed`` events for the agent dashboard.

``chat.services`` does not (yet) announce new conversations and messages to agents; until it calls
``chat.notifications.inbox_notify`` itself (see the dashboard report), this subclass of
``chat.consumers.ChatConsumer`` sends the event after each answer finishes (the customer's question
and the answer, or the question alone while an agent holds the conversation, are stored by then)
and after a handoff. Behaviour towards the customer is unchanged.
"""

from __future__ import annotations

import logging
import threading

from channels.layers import get_channel_layer

from chat.consumers import ChatConsumer
from chat.notifications import AGENTS_GROUP, inbox_event

logger = logging.getLogger(__name__)


class InboxNotifyingChatConsumer(ChatConsumer):
    """``ChatConsumer`` that also tells the agents' group when the conversation changed."""

    async def notify_agents(self, kind: str) -> None:
        """Send ``inbox.changed`` for this conversation to ``agents``; failures are logged, never raised."""
        layer = self.channel_layer or get_channel_layer()
        if layer is None or self.conversation is None:
            return
        try:
            await layer.group_send(AGENTS_GROUP, inbox_event(self.conversation.pk, kind))
        except Exception:
            logger.exception("could not notify agents about %s", self.conversation.pk)

    async def stream_answer(self, question: str, cancel: threading.Event) -> None:
        try:
            await super().stream_answer(question, cancel)
        finally:
            await self.notify_agents("message")

    async def on_handoff(self) -> None:
        await super().on_handoff()
        await self.notify_agents("status")

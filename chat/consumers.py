"""The customer's chat websocket (``/ws/chat/<conversation id>/``).

The handshake carries the conversation's token as a subprotocol, never in the URL
(``chat.conversation_access``): the client offers ``["supportbot.chat", "supportbot.token.<token>"]``
and the server accepts with ``supportbot.chat``.

Frames in (JSON text):

- ``{"type": "chat.message", "text": str}``: ask a question (1..``WIDGET_MESSAGE_MAX_CHARS`` characters
  after stripping). The answer streams back as the events of ``chat.services.answer_events``;
- ``{"type": "chat.handoff"}``: ask for a human (``chat.services.conversation_request_human``).

Frames out: ``{"type": event.type, **event.data}`` for each answer event (``chat.token``,
``chat.citations``, ``chat.done``, ``chat.busy``, ``chat.agent_active`` ``{"message_id", "status"}``
when no bot answer follows: an agent holds the conversation, or the message asked for a person and it
was handed over, ``chat.error``); ``chat.rate_limited``
``{"retry_after_s", "message"}`` for a question past the conversation's rate limit (nothing stored;
send it again after ``retry_after_s`` seconds); and whatever the conversation's
channel-layer group (``conversation.<id>``) relays: ``chat.agent_message`` and ``chat.status``
``{"status", "message"}`` (after a handoff asked from any tab, a takeover, a hand-back or a
resolve). A bad frame (not JSON, not an object, unknown type, empty, unstorable or too long text, a
question while an answer is streaming) gets ``chat.error`` ``{"message", "code"}`` and the socket stays open.

While Redis (the channel layer) is unavailable (``chat.redis_outage``), the socket cannot hear its
conversation's group, so it is not kept: a handshake is accepted, told ``chat.unavailable``
``{"retry_after_s": 5, "message"}`` and closed with code 4503 (``CLOSE_UNAVAILABLE``); an open socket
whose Redis goes away gets the same frame and close, its answer cancelled as on a disconnect. Nothing
a client sent on it is stored; the widget reconnects after ``retry_after_s`` (sooner never), and the
first handshake after Redis is back is kept. One WARNING line per socket, no traceback.

The consumer is a thin interface: it authenticates in ``connect()`` (the token must match the
conversation, else the handshake is closed with code 4403; a ``?token=`` in the URL closes it with
4400) and accepts last; the database is reached
through ``database_sync_to_async``; the answer runs as one task per socket, cancelled (its cancel
event set, then the task cancelled) when the socket closes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from contextlib import aclosing

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings

from chat import rate_limits, services, text_input
from chat.conversation_access import (
    ConversationAccessError,
    TokenInUrl,
    websocket_conversation,
    websocket_subprotocol,
)
from chat.models import Conversation
from chat.notifications import conversation_group
from chat.redis_outage import CLOSE_UNAVAILABLE, RETRY_AFTER_S, RedisOutageConsumer

logger = logging.getLogger(__name__)

CLOSE_FORBIDDEN = 4403
# A token in the handshake's URL (chat.conversation_access.TokenInUrl).
CLOSE_TOKEN_IN_URL = 4400
RATE_LIMITED_MESSAGE = "You're sending questions faster than we can answer; yours will go in a moment."
UNAVAILABLE_MESSAGE = "The chat is briefly unavailable; reconnecting in a moment."
# How long disconnect() lets a cancelled answer wind down (the service persists what it streamed)
# before cancelling its task outright, in seconds.
CANCEL_GRACE_S = 2.0


class ChatConsumer(RedisOutageConsumer):
    """One customer socket on one conversation (see the module docstring for the frames)."""

    conversation: Conversation | None = None
    group_name: str | None = None
    answer_task: asyncio.Task | None = None
    answer_cancel: threading.Event | None = None
    # True from a question until its answer stream ends.
    answering: bool = False
    # The question last answered with chat.busy (stored nowhere; the widget sends it again).
    busy_question: str | None = None

    async def connect(self) -> None:
        conversation_id = self.scope["url_route"]["kwargs"]["conversation_id"]
        try:
            self.conversation = await database_sync_to_async(websocket_conversation)(self.scope, conversation_id)
        except TokenInUrl:
            await self.close(code=CLOSE_TOKEN_IN_URL)
            return
        except ConversationAccessError:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        if self.channel_layer is not None:
            self.group_name = conversation_group(self.conversation.pk)
            await self.channel_layer.group_add(self.group_name, self.channel_name)
        await self.accept(subprotocol=websocket_subprotocol(self.scope))

    async def disconnect(self, code: int) -> None:
        await self.answer_stop()
        if self.group_name is not None and self.channel_layer is not None:
            await self.group_discard_quietly(self.group_name)

    async def redis_lost(self, error: BaseException) -> None:
        """The channel layer failed (``chat.redis_outage.RedisOutageConsumer``): cancel the answer as
        on a disconnect; then, unless the handshake was refused (4403, 4400) or the socket closed
        already, accept it if need be, send ``chat.unavailable`` ``{"retry_after_s", "message"}`` and
        close with ``CLOSE_UNAVAILABLE``. A handshake that failed before its token was checked is
        refused with that code instead (never accepted unauthenticated)."""
        await self.answer_stop()
        if self.closed:
            return
        if not self.accepted:
            if self.conversation is None:
                await self.close(code=CLOSE_UNAVAILABLE)
                return
            await self.accept(subprotocol=websocket_subprotocol(self.scope))
        await self.send_json({"type": "chat.unavailable", "retry_after_s": RETRY_AFTER_S,
                              "message": UNAVAILABLE_MESSAGE})
        await self.close(code=CLOSE_UNAVAILABLE)

    async def answer_stop(self) -> None:
        """Cancel the answer streaming on this socket, if any: set its cancel event, give it
        ``CANCEL_GRACE_S`` to persist what it streamed, then cancel its task."""
        if self.answer_cancel is not None:
            self.answer_cancel.set()
        task = self.answer_task
        if task is not None and not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=CANCEL_GRACE_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            except Exception:  # already logged by the task
                pass

    # --- frames from the browser ------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None, **kwargs) -> None:
        """Decode a frame; anything that is not a JSON object gets ``chat.error`` (never an exception,
        which would close the socket)."""
        if text_data is None:
            await self.send_error("frames must be JSON text", "invalid_frame")
            return
        # A frame can hold the longest message several times over once JSON-escaped, but no more.
        if len(text_data) > 8 * settings.WIDGET_MESSAGE_MAX_CHARS + 1024:
            await self.send_error(self._too_long_message(), "too_long")
            return
        try:
            content = json.loads(text_data)
        except ValueError:
            await self.send_error("frames must be valid JSON", "invalid_json")
            return
        if not isinstance(content, dict):
            await self.send_error("frames must be JSON objects with a type", "invalid_frame")
            return
        await self.receive_json(content)

    async def receive_json(self, content: dict, **kwargs) -> None:
        frame_type = content.get("type")
        if frame_type == "chat.message":
            await self.on_message(content.get("text"))
        elif frame_type == "chat.handoff":
            await self.on_handoff()
        else:
            await self.send_error("unknown frame type; expected chat.message or chat.handoff", "unknown_type")

    async def on_message(self, text) -> None:
        """Validate a question and start streaming its answer (one answer at a time per socket).
        Refused with ``chat.error``: no visible character (``empty``; zero-width spaces count as
        none), a NUL or lone surrogate (``invalid_characters``, which the database cannot store),
        too long, or an answer still streaming. Past ``RATE_LIMIT_QUESTIONS_PER_CONVERSATION``
        (``chat.rate_limits.question_check``) it gets ``chat.rate_limited`` ``{"retry_after_s",
        "message"}`` and nothing is stored; the same question sent again after ``chat.busy`` is not
        counted twice."""
        if not isinstance(text, str) or text_input.is_blank(text):
            await self.send_error("the message is empty", "empty")
            return
        if text_input.is_unstorable(text):
            await self.send_error(f"the message {text_input.UNSTORABLE_REASON}", "invalid_characters")
            return
        text = text.strip()
        if len(text) > settings.WIDGET_MESSAGE_MAX_CHARS:
            await self.send_error(self._too_long_message(), "too_long")
            return
        if self.answering:
            await self.send_error("please wait for the current answer to finish", "answer_in_progress")
            return
        if text != self.busy_question:  # a re-send after chat.busy (nothing was stored) is not counted again
            try:
                await sync_to_async(rate_limits.question_check, thread_sensitive=False)(self.conversation.pk)
            except rate_limits.RateLimited as limited:
                await self.send_json({"type": "chat.rate_limited", "retry_after_s": round(limited.retry_after_s, 1),
                                      "message": RATE_LIMITED_MESSAGE})
                return
        self.busy_question = None
        self.answering = True
        self.answer_cancel = threading.Event()
        self.answer_task = asyncio.create_task(self.stream_answer(text, self.answer_cancel))

    async def stream_answer(self, question: str, cancel: threading.Event) -> None:
        """Send each event of ``answer_events`` as a frame; an unexpected failure becomes ``chat.error``."""
        try:
            events = services.answer_events(self.conversation.pk, question, cancel=cancel)
            async with aclosing(events):
                async for event in events:
                    if cancel.is_set():
                        break
                    if event.type == "chat.busy":
                        self.busy_question = question
                    await self.send_json({"type": event.type, **event.data})
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("answering in conversation %s failed", self.conversation.pk)
            if not cancel.is_set():
                await self.send_error("something went wrong while answering; please try again", "internal")
        finally:
            self.answering = False

    async def on_handoff(self) -> None:
        """Ask for a human (``services.conversation_request_human``). The service publishes
        ``chat.status`` to the conversation's group, which relays it to this socket and to every other
        open tab of the conversation; without a channel layer the socket is answered directly."""
        self.conversation = await database_sync_to_async(services.conversation_request_human)(self.conversation)
        if self.group_name is None:
            await self.send_json({"type": "chat.status", "status": self.conversation.status})

    async def send_error(self, message: str, code: str) -> None:
        """Send ``{"type": "chat.error", "message": message, "code": code}``."""
        await self.send_json({"type": "chat.error", "message": message, "code": code})

    @staticmethod
    def _too_long_message() -> str:
        return f"the message is longer than {settings.WIDGET_MESSAGE_MAX_CHARS} characters"

    # --- messages from the conversation's group ---------------------------------------------------

    async def chat_agent_message(self, event: dict) -> None:
        """Relay an agent's message (``{"type": "chat.agent_message", ...}``) to the customer."""
        await self.send_json(event)

    async def chat_status(self, event: dict) -> None:
        """Relay a status change (``{"type": "chat.status", "status": str, ...}``) to the customer."""
        await self.send_json(event)

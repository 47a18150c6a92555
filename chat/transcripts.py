"""Reads for the widget: a conversation's transcript and the passages its answers cited.

Both shape data for the customer, so they leave out what only staff should see (retrieval traces,
model versions, timings) and only ever read the conversation they are given.
"""

from __future__ import annotations

from django.conf import settings

from chat.models import Conversation, Message
from chat.selectors import conversation_messages
from knowledge.models import Chunk, Source

# Roles shown to the customer: ``system`` messages are notes for staff.
CUSTOMER_VISIBLE_ROLES = (Message.Role.USER, Message.Role.ASSISTANT, Message.Role.AGENT)


def transcript_get(conversation: Conversation) -> dict:
    """The conversation as the widget shows it after a page reload.

    Returns ``{"id": str, "status": str, "messages": [{"id": int, "role": "user"|"assistant"|"agent",
    "text": str, "abstained": bool, "citations": [{"n": int, "chunk_id": int, "source_title": str}],
    "created_at": ISO 8601 str}]}``, messages oldest first.
    """
    messages = conversation_messages(conversation).filter(role__in=CUSTOMER_VISIBLE_ROLES)
    return {
        "id": str(conversation.pk),
        "status": conversation.status,
        "messages": [
            {
                "id": message.pk,
                "role": message.role,
                "text": message.text,
                "abstained": message.abstained,
                "citations": [
                    {"n": c.get("n"), "chunk_id": c.get("chunk_id"), "source_title": c.get("source_title", "")}
                    for c in message.citations or []
                ],
                "created_at": message.created_at.isoformat(),
            }
            for message in messages
        ],
    }


def _snap_start(text: str, index: int, floor: int) -> int:
    """Move ``index`` forward to the start of a word (never past ``floor``), so context starts cleanly."""
    if index <= 0:
        return 0
    space = text.find(" ", index, floor)
    newline = text.find("\n", index, floor)
    breaks = [b for b in (space, newline) if b != -1]
    return min(breaks) + 1 if breaks else index


def _snap_end(text: str, index: int, ceiling: int) -> int:
    """Move ``index`` back to the end of a word (never before ``ceiling``)."""
    if index >= len(text):
        return len(text)
    space = text.rfind(" ", ceiling, index)
    newline = text.rfind("\n", ceiling, index)
    cut = max(space, newline)
    return cut if cut != -1 else index


CHANGED_NOTICE = "This page has changed since this answer was written; the passage it cited is no longer on it."
REMOVED_NOTICE = "This page has been removed since this answer was written."


def cited_passage_get(conversation: Conversation, chunk_id: int, *, context_chars: int | None = None) -> dict | None:
    """The passage of chunk ``chunk_id`` as cited in ``conversation``, with surrounding source text.

    Only a chunk that an assistant message of this conversation cited is returned, so a token grants
    no access to the rest of the knowledge base. ``context_chars`` (default
    ``WIDGET_PASSAGE_CONTEXT_CHARS``) is the most source text shown on each side, in characters, cut at
    word boundaries.

    Returns ``{"status": "current"|"changed"|"removed", "notice": str, "title": str, "url": str,
    "before": str, "passage": str, "after": str}``; ``None`` only when this conversation never cited
    the chunk. ``url`` is the web page the source came from (``""`` for files, whose location is never
    shown).

    - ``current``: ``passage`` is exactly the cited chunk as the source holds it now
      (``source.text[chunk.start:chunk.end]``; a re-ingestion that kept the passage's text keeps its
      chunk id, at its new offsets) and ``before + passage + after`` is a contiguous slice of the text.
    - ``changed``: the source was re-ingested and the cited text is gone; ``notice`` says so,
      ``passage`` is ``""`` and ``after`` is the beginning of the current text (``2 * context_chars``
      at most), so the customer sees the page as it is now (and ``url`` links to it).
    - ``removed``: the source was deleted; ``title`` is the one recorded with the citation.
    """
    if context_chars is None:
        context_chars = settings.WIDGET_PASSAGE_CONTEXT_CHARS
    message = conversation.messages.filter(
        role=Message.Role.ASSISTANT, citations__contains=[{"chunk_id": chunk_id}]
    ).first()
    if message is None:
        return None
    chunk = Chunk.objects.select_related("source").defer("embedding", "search_vector").filter(pk=chunk_id).first()
    if chunk is None:
        return _cited_source_now(message, chunk_id, context_chars)
    # Never the URI: for files it is a path on the server.
    title, text, url = chunk.source.title or "Source", chunk.source.text, chunk.source.public_url
    view = {"status": "current", "notice": "", "title": title, "url": url}
    if text[chunk.start : chunk.end] != chunk.text:  # defensive: a chunk always mirrors its source's text
        return {**view, "before": "", "passage": chunk.text, "after": ""}
    before_start = _snap_start(text, max(0, chunk.start - context_chars), chunk.start)
    after_end = _snap_end(text, min(len(text), chunk.end + context_chars), chunk.end)
    return {
        **view,
        "before": text[before_start : chunk.start],
        "passage": chunk.text,
        "after": text[chunk.end : after_end],
    }


def _cited_source_now(message: Message, chunk_id: int, context_chars: int) -> dict:
    """The view of a citation whose chunk no longer exists: its source as it is now, or removed."""
    cited = next(c for c in message.citations if c.get("chunk_id") == chunk_id)
    source = Source.objects.filter(pk=cited.get("source_id")).only("title", "text", "uri", "kind").first()
    if source is None:
        return {"status": "removed", "notice": REMOVED_NOTICE, "title": cited.get("source_title") or "Source",
                "url": "", "before": "", "passage": "", "after": ""}
    text = source.text
    end = _snap_end(text, min(len(text), 2 * context_chars), 0)
    return {"status": "changed", "notice": CHANGED_NOTICE, "title": source.title or "Source",
            "url": source.public_url, "before": "", "passage": "", "after": text[:end].rstrip()}

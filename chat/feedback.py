"""Customer feedback writes: thumbs up/down (with an optional comment) on an answer, and the
end-of-conversation rating. The HTTP interface is ``chat.feedback_views``."""

from __future__ import annotations

from django.conf import settings

from chat.models import AnswerFeedback, Conversation, ConversationRating, Message
from chat.notifications import inbox_notify


class FeedbackError(ValueError):
    """Invalid feedback (unknown answer, bad value, rating out of range, comment too long)."""


def _comment_check(comment: str) -> None:
    """Raise ``FeedbackError`` when the (stripped) ``comment`` is longer than
    ``settings.FEEDBACK_COMMENT_MAX_CHARS`` characters, the limit the widget is also sent."""
    if len(comment) > settings.FEEDBACK_COMMENT_MAX_CHARS:
        raise FeedbackError(f"the comment is longer than {settings.FEEDBACK_COMMENT_MAX_CHARS} characters")


def answer_feedback_set(conversation: Conversation, message_id: int, *, value: str, comment: str = "") -> AnswerFeedback:
    """Record the customer's ``value`` (``"up"`` or ``"down"``) and ``comment`` (at most
    ``settings.FEEDBACK_COMMENT_MAX_CHARS`` characters after stripping) on assistant message
    ``message_id`` of ``conversation``; a second call replaces the first. Raises ``FeedbackError`` (nothing stored) when the message is
    not an assistant answer of this conversation or the value/comment is invalid. Notifies agents."""
    if value not in AnswerFeedback.Value.values:
        raise FeedbackError("value must be 'up' or 'down'")
    comment = (comment or "").strip()
    _comment_check(comment)
    message = Message.objects.filter(pk=message_id, conversation=conversation, role=Message.Role.ASSISTANT).first()
    if message is None:
        raise FeedbackError("no such answer in this conversation")
    feedback, _ = AnswerFeedback.objects.update_or_create(message=message, defaults={"value": value, "comment": comment})
    inbox_notify(conversation.pk, "feedback")
    return feedback


def conversation_rate(conversation: Conversation, *, rating: int, comment: str = "") -> ConversationRating:
    """Record the customer's end-of-conversation ``rating`` (an int 1..5) and ``comment``; rating again
    replaces it. Raises ``FeedbackError`` (nothing stored) for a rating out of range or a comment longer
    than ``settings.FEEDBACK_COMMENT_MAX_CHARS`` characters after stripping."""
    if isinstance(rating, bool) or not isinstance(rating, int) or not 1 <= rating <= 5:
        raise FeedbackError("rating must be a whole number from 1 to 5")
    comment = (comment or "").strip()
    _comment_check(comment)
    result, _ = ConversationRating.objects.update_or_create(
        conversation=conversation, defaults={"rating": rating, "comment": comment}
    )
    inbox_notify(conversation.pk, "feedback")
    return result

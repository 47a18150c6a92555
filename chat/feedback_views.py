"""The widget's feedback API (included under ``/api/`` by ``config.urls`` via ``chat.feedback_urls``).

Authorised like the rest of the widget API (``chat.views``): the conversation's secret token in the
``X-Conversation-Token`` header (``chat.conversation_access``; never in the URL); CORS for the
widget's allowed origins; no cookies.

| request | body (JSON) | response |
|---|---|---|
| ``POST /api/conversations/<id>/messages/<message id>/feedback/`` | ``{"value": "up"|"down", "comment"?: str}`` | 200 ``{"message_id", "value", "comment"}`` |
| ``POST /api/conversations/<id>/rating/`` | ``{"rating": 1..5, "comment"?: str}`` | 200 ``{"rating", "comment"}`` |

400 for a bad body (a comment holding a NUL or a lone surrogate included) or a token in the URL, 403
without the right token.
"""

from __future__ import annotations

import json
from django.http import HttpRequest, JsonResponse

from chat import feedback, text_input
from chat.models import Conversation
from chat.views import conversation_required, widget_api


def _body(request: HttpRequest) -> dict | None:
    try:
        body = json.loads(request.body or b"{}")
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _comment(body: dict) -> str | None:
    """The body's ``comment`` as text (``""`` when absent), or ``None`` when it holds characters the
    database cannot store (``chat.text_input``)."""
    comment = str(body.get("comment") or "")
    return None if text_input.is_unstorable(comment) else comment


_UNSTORABLE_COMMENT = f"the comment {text_input.UNSTORABLE_REASON}"


@widget_api("POST")
@conversation_required
def answer_feedback(request: HttpRequest, conversation: Conversation, message_id: int) -> JsonResponse:
    """Thumbs up/down on one answer (``chat.feedback.answer_feedback_set``)."""
    body = _body(request)
    if body is None:
        return JsonResponse({"error": "the body must be a JSON object"}, status=400)
    comment = _comment(body)
    if comment is None:
        return JsonResponse({"error": _UNSTORABLE_COMMENT}, status=400)
    try:
        result = feedback.answer_feedback_set(conversation, message_id, value=body.get("value"), comment=comment)
    except feedback.FeedbackError as error:
        return JsonResponse({"error": str(error)}, status=400)
    return JsonResponse({"message_id": result.message_id, "value": result.value, "comment": result.comment})


@widget_api("POST")
@conversation_required
def conversation_rating(request: HttpRequest, conversation: Conversation) -> JsonResponse:
    """The end-of-conversation rating (``chat.feedback.conversation_rate``)."""
    body = _body(request)
    if body is None:
        return JsonResponse({"error": "the body must be a JSON object"}, status=400)
    comment = _comment(body)
    if comment is None:
        return JsonResponse({"error": _UNSTORABLE_COMMENT}, status=400)
    try:
        result = feedback.conversation_rate(conversation, rating=body.get("rating"), comment=comment)
    except feedback.FeedbackError as error:
        return JsonResponse({"error": str(error)}, status=400)
    return JsonResponse({"rating": result.rating, "comment": result.comment})

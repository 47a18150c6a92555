"""The widget's feedback API (``chat.feedback_views``): comments the database cannot store are a 400
that stores nothing, not a 500 after the write failed."""

from __future__ import annotations

import json

import pytest

from chat.models import AnswerFeedback, ConversationRating, Message
from chat.services import conversation_start

pytestmark = pytest.mark.django_db

UNSTORABLE = {"error": "the comment contains characters that cannot be stored (NUL or an unpaired surrogate)"}
# Request bodies as the browser's JSON.stringify sends them: a NUL and a lone surrogate as \\u escapes.
BAD_COMMENTS = [pytest.param('"wrong \\u0000 answer"', id="nul"), pytest.param('"wrong \\ud83d answer"', id="lone-surrogate")]


@pytest.fixture
def answered():
    conversation = conversation_start()
    Message.objects.create(conversation=conversation, role=Message.Role.USER, text="How long do refunds take?")
    answer = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, text="Five days [1].")
    return conversation, answer


@pytest.mark.parametrize("comment", BAD_COMMENTS)
def test_answer_feedback_with_an_unstorable_comment_is_a_400_and_stores_nothing(client, answered, comment):
    conversation, answer = answered
    # given the answer already rated up
    AnswerFeedback.objects.create(message=answer, value="up", comment="")
    # when a thumbs-down arrives whose comment holds a NUL or a lone surrogate
    response = client.post(f"/api/conversations/{conversation.pk}/messages/{answer.pk}/feedback/",
                           data=f'{{"value": "down", "comment": {comment}}}', content_type="application/json",
                           HTTP_X_CONVERSATION_TOKEN=conversation.token)
    # then it is refused with the reason, and the earlier feedback is unchanged
    assert response.status_code == 400
    assert response.json() == UNSTORABLE
    assert list(AnswerFeedback.objects.values_list("message_id", "value", "comment")) == [(answer.pk, "up", "")]


@pytest.mark.parametrize("comment", BAD_COMMENTS)
def test_rating_with_an_unstorable_comment_is_a_400_and_stores_nothing(client, answered, comment):
    conversation, _ = answered
    # when a rating arrives whose comment holds a NUL or a lone surrogate
    response = client.post(f"/api/conversations/{conversation.pk}/rating/", data=f'{{"rating": 2, "comment": {comment}}}',
                           content_type="application/json", HTTP_X_CONVERSATION_TOKEN=conversation.token)
    # then it is refused with the reason and nothing is stored
    assert response.status_code == 400
    assert response.json() == UNSTORABLE
    assert ConversationRating.objects.count() == 0


def test_a_comment_with_other_control_characters_and_emoji_is_stored(client, answered):
    # given a comment with a tab, a paired surrogate (an emoji sent as \\ud83d\\ude00) and a zero-width space
    conversation, answer = answered
    response = client.post(f"/api/conversations/{conversation.pk}/messages/{answer.pk}/feedback/",
                           data='{"value": "down", "comment": "wrong\\tdays \\ud83d\\ude00\\u200b"}',
                           content_type="application/json", HTTP_X_CONVERSATION_TOKEN=conversation.token)
    # then it is stored as sent
    assert response.status_code == 200
    assert AnswerFeedback.objects.get().comment == "wrong\tdays \U0001F600\u200b"


def post_comment(client, conversation, answer, endpoint: str, comment: str):
    """POST ``comment`` with a thumb down on ``answer`` or with a rating of 2 on ``conversation``."""
    if endpoint == "feedback":
        path, body = f"/api/conversations/{conversation.pk}/messages/{answer.pk}/feedback/", {"value": "down"}
    else:
        path, body = f"/api/conversations/{conversation.pk}/rating/", {"rating": 2}
    return client.post(path, data=json.dumps({**body, "comment": comment}), content_type="application/json",
                       HTTP_X_CONVERSATION_TOKEN=conversation.token)


def stored_comments() -> list[str]:
    return [*AnswerFeedback.objects.values_list("comment", flat=True),
            *ConversationRating.objects.values_list("comment", flat=True)]


@pytest.mark.parametrize("endpoint", ["feedback", "rating"])
def test_a_comment_over_the_setting_is_a_400_with_the_limit_and_stores_nothing(client, settings, answered, endpoint):
    # given a deployment that raised the comment limit (the widget is sent the same number)
    settings.FEEDBACK_COMMENT_MAX_CHARS = 3000
    conversation, answer = answered
    # when a comment one character over it arrives
    response = post_comment(client, conversation, answer, endpoint, "x" * 3001)
    # then it is refused with the limit, and nothing is stored
    assert response.status_code == 400
    assert response.json() == {"error": "the comment is longer than 3000 characters"}
    assert stored_comments() == []


@pytest.mark.parametrize("endpoint", ["feedback", "rating"])
def test_a_comment_of_exactly_the_setting_after_stripping_is_stored(client, settings, answered, endpoint):
    # given a deployment that raised the comment limit past the former built-in 2000
    settings.FEEDBACK_COMMENT_MAX_CHARS = 3000
    conversation, answer = answered
    # when a comment of 3000 characters arrives, padded with spaces the server strips
    response = post_comment(client, conversation, answer, endpoint, "  " + "x" * 3000 + "\n")
    # then it is stored, stripped
    assert response.status_code == 200
    assert stored_comments() == ["x" * 3000]

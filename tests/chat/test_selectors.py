"""Chat reads: which customer question an answer replied to (``chat.selectors.answered_question``), the
one definition analytics, the dashboard's transcript and corrections share."""

from __future__ import annotations

import pytest

from chat.models import Conversation, Message
from chat.selectors import answered_question

pytestmark = pytest.mark.django_db


def test_an_answer_replied_to_the_latest_customer_question_before_it_in_transcript_order():
    # given: a greeting before any question; a question and its answer; two questions in a row then an
    # answer; and a question stored in the same instant as an answer but after it (a higher id)
    conversation = Conversation.objects.create()
    greeting = Message.objects.create(conversation=conversation, role="assistant", text="Hi!")
    q1 = Message.objects.create(conversation=conversation, role="user", text="Refunds?")
    a1 = Message.objects.create(conversation=conversation, role="assistant", text="Five days.")
    Message.objects.create(conversation=conversation, role="user", text="Kayaks?")
    q3 = Message.objects.create(conversation=conversation, role="user", text="Tents?")
    a2 = Message.objects.create(conversation=conversation, role="assistant", text="Yes.")
    Message.objects.create(conversation=conversation, role="user", text="Later?")  # auto_now_add: set below
    Message.objects.filter(conversation=conversation, text="Later?").update(created_at=a2.created_at)
    other = Conversation.objects.create()
    Message.objects.create(conversation=other, role="user", text="Another conversation's question")
    # when each answer's question is read, in one query
    answers = Message.objects.filter(role="assistant").annotate(question_id=answered_question())
    # then
    assert {a.pk: a.question_id for a in answers} == {greeting.pk: None, a1.pk: q1.pk, a2.pk: q3.pk}
    assert Message.objects.filter(pk=a2.pk).annotate(text_=answered_question("text")).get().text_ == "Tents?"

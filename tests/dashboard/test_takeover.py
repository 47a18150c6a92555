"""Takeover: exclusive between agents, the bot stays quiet, agent messages and status changes reach
the customer's socket through the real Redis channel layer, hand back and resolve."""

from __future__ import annotations

import threading

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import Client

from chat import agent_services
from chat.agent_services import TakeoverError
from chat.conversation_access import client_subprotocols
from chat.models import Conversation, Message
from chat.services import answer_stream
from config.asgi import application
from tests.dashboard.test_access import session_headers

pytestmark = pytest.mark.django_db


def test_take_sets_agent_status_and_a_second_agent_is_refused(conversation, agent, agent2):
    # given agent alice took the conversation
    taken = agent_services.conversation_take(conversation.pk, agent=agent)
    assert (taken.status, taken.assigned_agent_id) == ("agent", agent.pk)
    # when bob tries to take it too
    with pytest.raises(TakeoverError, match="another agent"):
        agent_services.conversation_take(conversation.pk, agent=agent2)
    # then alice still holds it and only one "joined" system message exists
    conversation.refresh_from_db()
    assert (conversation.status, conversation.assigned_agent_id) == ("agent", agent.pk)
    assert list(conversation.messages.filter(role="system").values_list("text", flat=True)) == ["alice joined the conversation."]


def test_taking_again_is_idempotent_for_the_holder(conversation, agent):
    agent_services.conversation_take(conversation.pk, agent=agent)
    agent_services.conversation_take(conversation.pk, agent=agent)
    assert conversation.messages.filter(role="system").count() == 1


def test_another_agent_can_neither_write_nor_hand_back(conversation, agent, agent2):
    agent_services.conversation_take(conversation.pk, agent=agent)
    with pytest.raises(TakeoverError):
        agent_services.agent_message_send(conversation.pk, agent=agent2, text="Hi, Bob here")
    with pytest.raises(TakeoverError):
        agent_services.conversation_hand_back(conversation.pk, agent=agent2)
    conversation.refresh_from_db()
    assert (conversation.status, conversation.assigned_agent_id) == ("agent", agent.pk)
    assert conversation.messages.filter(role="agent").count() == 0


def test_the_database_refuses_an_assigned_agent_unless_the_status_is_agent(conversation, agent):
    from django.db import IntegrityError, transaction

    with pytest.raises(IntegrityError), transaction.atomic():
        Conversation.objects.filter(pk=conversation.pk).update(assigned_agent=agent)
    conversation.refresh_from_db()
    assert (conversation.status, conversation.assigned_agent_id) == ("bot", None)


def test_the_bot_stays_quiet_while_an_agent_holds_the_conversation(conversation, agent):
    # given alice holds the conversation
    agent_services.conversation_take(conversation.pk, agent=agent)
    # when the customer asks a question through the answer pipeline
    events = list(answer_stream(conversation.pk, "Are you a person?"))
    # then the question is stored for the agent and no bot answer is produced
    assert [e.type for e in events] == ["chat.agent_active"]
    assert conversation.messages.order_by("-id").values_list("role", "text")[0] == ("user", "Are you a person?")
    assert conversation.messages.filter(role="assistant").count() == 2


def test_hand_back_and_resolve(conversation, agent, agent2):
    agent_services.conversation_take(conversation.pk, agent=agent)
    back = agent_services.conversation_hand_back(conversation.pk, agent=agent)
    assert (back.status, back.assigned_agent_id) == ("bot", None)
    # after hand-back another agent may take it
    assert agent_services.conversation_take(conversation.pk, agent=agent2).assigned_agent_id == agent2.pk
    resolved = agent_services.conversation_resolve(conversation.pk, agent=agent2)
    assert (resolved.status, resolved.assigned_agent_id) == ("resolved", None)
    with pytest.raises(TakeoverError, match="resolved"):
        agent_services.conversation_take(conversation.pk, agent=agent)
    assert list(conversation.messages.filter(role="system").values_list("text", flat=True)) == [
        "alice joined the conversation.", "alice handed the conversation back to the assistant.",
        "bob joined the conversation.", "bob resolved the conversation.",
    ]


@pytest.mark.django_db(transaction=True)
def test_two_agents_taking_at_the_same_moment_one_wins(conversation, agent, agent2):
    # given two agents on two database connections, released together
    barrier = threading.Barrier(2)
    outcomes: dict[str, str] = {}

    def take(user):
        try:
            barrier.wait(5)
            agent_services.conversation_take(conversation.pk, agent=user)
            outcomes[user.username] = "took"
        except TakeoverError:
            outcomes[user.username] = "refused"
        finally:
            connection.close()

    threads = [threading.Thread(target=take, args=(u,)) for u in (agent, agent2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    # then exactly one took it, and the database agrees
    assert sorted(outcomes.values()) == ["refused", "took"]
    winner = next(name for name, outcome in outcomes.items() if outcome == "took")
    conversation.refresh_from_db()
    assert conversation.assigned_agent.username == winner
    assert conversation.messages.filter(role="system").count() == 1


@pytest.mark.django_db(transaction=True)
def test_agent_message_reaches_the_customers_socket_and_the_inbox_is_told(conversation, agent):
    # given the customer's widget socket and the agent's dashboard socket are open
    customer = WebsocketCommunicator(
        application, f"/ws/chat/{conversation.pk}/", subprotocols=client_subprotocols(conversation.token),
        headers=[(b"origin", b"http://testserver"), (b"host", b"testserver")],
    )
    dashboard = WebsocketCommunicator(application, "/ws/agent/", headers=session_headers(agent))
    client = Client()
    client.force_login(agent)
    post = sync_to_async(client.post)

    async def scenario():
        assert (await customer.connect(timeout=5))[0]
        assert (await dashboard.connect(timeout=5))[0]
        try:
            # when the agent takes over and replies through the dashboard's HTTP views
            took = await post(f"/dashboard/conversations/{conversation.pk}/take/")
            sent = await post(f"/dashboard/conversations/{conversation.pk}/messages/",
                              {"text": "Hi, I'm Alice <b>from support</b>."})
            customer_frames = [await customer.receive_json_from(timeout=5) for _ in range(2)]
            dashboard_frames = [await dashboard.receive_json_from(timeout=5) for _ in range(2)]
            return took.status_code, sent.status_code, customer_frames, dashboard_frames
        finally:
            await customer.disconnect()
            await dashboard.disconnect()

    took, sent, customer_frames, dashboard_frames = async_to_sync(scenario)()
    assert (took, sent) == (302, 302)
    # then the customer sees that a person joined, then the agent's message (text as written)
    stored = Message.objects.get(conversation=conversation, role="agent")
    assert customer_frames == [
        {"type": "chat.status", "status": "agent", "message": "A support agent joined the conversation."},
        {"type": "chat.agent_message", "message_id": stored.pk, "text": "Hi, I'm Alice <b>from support</b>.",
         "created_at": stored.created_at.isoformat()},
    ]
    # and the agent dashboards were told about both changes
    assert dashboard_frames == [
        {"type": "inbox.changed", "conversation_id": str(conversation.pk), "kind": "status"},
        {"type": "inbox.changed", "conversation_id": str(conversation.pk), "kind": "message"},
    ]


@pytest.mark.django_db(transaction=True)
def test_a_customer_message_notifies_the_agents_group(conversation, agent):
    # given an agent holds the conversation and both sockets are open
    agent_services.conversation_take(conversation.pk, agent=agent)
    customer = WebsocketCommunicator(
        application, f"/ws/chat/{conversation.pk}/", subprotocols=client_subprotocols(conversation.token),
        headers=[(b"origin", b"http://testserver"), (b"host", b"testserver")],
    )
    dashboard = WebsocketCommunicator(application, "/ws/agent/", headers=session_headers(agent))

    async def scenario():
        assert (await customer.connect(timeout=5))[0]
        assert (await dashboard.connect(timeout=5))[0]
        try:
            # when the customer writes (the bot stays quiet: chat.agent_active)
            await customer.send_json_to({"type": "chat.message", "text": "Still there?"})
            answer = await customer.receive_json_from(timeout=10)
            # then the agents' dashboards get inbox.changed for this conversation
            event = await dashboard.receive_json_from(timeout=10)
            return answer, event
        finally:
            await customer.disconnect()
            await dashboard.disconnect()

    answer, event = async_to_sync(scenario)()
    assert answer["type"] == "chat.agent_active"
    assert event == {"type": "inbox.changed", "conversation_id": str(conversation.pk), "kind": "message"}
    assert conversation.messages.order_by("-id").values_list("role", "text")[0] == ("user", "Still there?")

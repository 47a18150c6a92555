"""The agents' live inbox hears about every conversation change from ``chat.services`` itself, whatever
the interface (widget HTTP API or websocket): a new conversation, a handoff, a customer question and
the bot's answer; a handoff also reaches every open widget tab of the conversation.

Real Postgres, the real Redis channel layer and ``config.asgi.application``; the answer below is a real
abstention (the real embedding model retrieves, nothing is close enough), so no language model runs.
Data is committed (``transaction=True``) because notifications are sent once the change commits.
Several test runs may share the Redis server, so frames are filtered to this test's conversations.
"""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chat import services
from chat.conversation_access import client_subprotocols
from chat.models import Conversation
from config.asgi import application
from tests.dashboard.test_access import session_headers

pytestmark = pytest.mark.django_db(transaction=True)

SAME_SITE = [(b"origin", b"http://testserver"), (b"host", b"testserver")]


def customer_socket(conversation: Conversation) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, f"/ws/chat/{conversation.pk}/", headers=SAME_SITE,
                                 subprotocols=client_subprotocols(conversation.token))


def agent_socket(agent) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, "/ws/agent/", headers=session_headers(agent))


async def frames_about(socket: WebsocketCommunicator, conversation_ids: set[str], *, count: int, timeout_s: float = 10) -> list[dict]:
    """The next ``count`` inbox frames about ``conversation_ids`` (frames of other test runs sharing
    the Redis server are skipped)."""
    frames: list[dict] = []
    while len(frames) < count:
        frame = await socket.receive_json_from(timeout=timeout_s)
        if frame.get("conversation_id") in conversation_ids:
            frames.append(frame)
    return frames


async def nothing_more_about(socket: WebsocketCommunicator, conversation_ids: set[str], *, wait_s: float = 1.0) -> list[dict]:
    """Inbox frames about ``conversation_ids`` arriving within ``wait_s`` seconds (expected: none)."""
    extra = []
    while not await socket.receive_nothing(timeout=wait_s):
        frame = await socket.receive_json_from()
        if frame.get("conversation_id") in conversation_ids:
            extra.append(frame)
    return extra


def test_a_conversation_started_over_http_wakes_no_inbox_until_its_first_message(agent):
    # given an agent's dashboard socket
    dashboard = agent_socket(agent)
    post = sync_to_async(Client().post)

    async def scenario():
        assert (await dashboard.connect(timeout=5))[0]
        try:
            # when the widget starts a conversation over the HTTP API
            response = await post("/api/conversations/", content_type="application/json",
                                  HTTP_ORIGIN="http://testserver")
            started = response.json()["id"]
            # then the agents are not told (the inbox lists no conversation without a message)
            quiet = await nothing_more_about(dashboard, {started})
            # and when its first message is stored, they are
            conversation = await sync_to_async(Conversation.objects.get)(pk=started)
            await sync_to_async(services.conversation_request_human)(conversation)
            return response.status_code, started, quiet, await frames_about(dashboard, {started}, count=1)
        finally:
            await dashboard.disconnect()

    status, started, quiet, frames = async_to_sync(scenario)()
    assert status == 201
    assert quiet == []
    assert frames == [{"type": "inbox.changed", "conversation_id": started, "kind": "status"}]


def test_an_http_handoff_reaches_the_agents_and_every_open_tab(agent):
    # given a conversation open in two widget tabs, and an agent's dashboard
    conversation = services.conversation_start()
    tab1, tab2, dashboard = customer_socket(conversation), customer_socket(conversation), agent_socket(agent)
    post = sync_to_async(Client().post)
    url = f"/api/conversations/{conversation.pk}/handoff/"

    async def scenario():
        for socket in (tab1, tab2, dashboard):
            assert (await socket.connect(timeout=5))[0]
        try:
            # when one tab asks for a human over HTTP (its socket was not open)
            response = await post(url, HTTP_X_CONVERSATION_TOKEN=conversation.token, HTTP_ORIGIN="http://testserver")
            tabs = [await tab1.receive_json_from(timeout=5), await tab2.receive_json_from(timeout=5)]
            inbox = await frames_about(dashboard, {str(conversation.pk)}, count=1)
            # and asks again
            again = await post(url, HTTP_X_CONVERSATION_TOKEN=conversation.token, HTTP_ORIGIN="http://testserver")
            tabs_again = [await tab1.receive_json_from(timeout=5), await tab2.receive_json_from(timeout=5)]
            inbox_again = await nothing_more_about(dashboard, {str(conversation.pk)})
            return response.json(), again.json(), tabs, inbox, tabs_again, inbox_again
        finally:
            for socket in (tab1, tab2, dashboard):
                await socket.disconnect()

    response, again, tabs, inbox, tabs_again, inbox_again = async_to_sync(scenario)()
    # then both tabs learn that the conversation needs a human, and the agents' inbox is told
    status = {"type": "chat.status", "status": "needs_human", "message": services.CUSTOMER_HANDOFF_MESSAGE}
    assert response == again == {"id": str(conversation.pk), "status": "needs_human"}
    assert tabs == [status, status]
    assert inbox == [{"type": "inbox.changed", "conversation_id": str(conversation.pk), "kind": "status"}]
    # and asking again re-announces the status to the tabs but changes nothing for the agents
    assert tabs_again == [status, status]
    assert inbox_again == []
    assert list(conversation.messages.values_list("role", "text")) == [("system", services.HANDOFF_MESSAGE)]


def test_a_handoff_frame_from_one_tab_reaches_each_tab_once():
    # given a conversation open in two widget tabs
    conversation = services.conversation_start()
    tab1, tab2 = customer_socket(conversation), customer_socket(conversation)

    async def scenario():
        for socket in (tab1, tab2):
            assert (await socket.connect(timeout=5))[0]
        try:
            # when the first tab sends "talk to a human" over its socket
            await tab1.send_json_to({"type": "chat.handoff"})
            frames = [await tab1.receive_json_from(timeout=5), await tab2.receive_json_from(timeout=5)]
            # then each tab gets the status exactly once
            return frames, await tab1.receive_nothing(timeout=0.5), await tab2.receive_nothing(timeout=0.1)
        finally:
            for socket in (tab1, tab2):
                await socket.disconnect()

    frames, tab1_quiet, tab2_quiet = async_to_sync(scenario)()
    status = {"type": "chat.status", "status": "needs_human", "message": services.CUSTOMER_HANDOFF_MESSAGE}
    assert frames == [status, status]
    assert (tab1_quiet, tab2_quiet) == (True, True)
    assert Conversation.objects.get(pk=conversation.pk).status == "needs_human"


def test_asking_for_a_human_while_an_agent_holds_the_conversation_tells_the_tab_an_agent_is_there(agent):
    # given an agent holds the conversation
    from chat.agent_services import conversation_take

    conversation = services.conversation_start()
    conversation_take(conversation.pk, agent=agent)
    tab = customer_socket(conversation)

    async def scenario():
        assert (await tab.connect(timeout=5))[0]
        try:
            # when a tab (that missed the takeover) asks for a human
            await tab.send_json_to({"type": "chat.handoff"})
            return await tab.receive_json_from(timeout=5)
        finally:
            await tab.disconnect()

    # then it learns that an agent is in the conversation, and nothing changes
    assert async_to_sync(scenario)() == {"type": "chat.status", "status": "agent", "message": services.AGENT_ACTIVE_MESSAGE}
    conversation.refresh_from_db()
    assert (conversation.status, conversation.assigned_agent_id) == ("agent", agent.pk)
    assert conversation.messages.filter(text=services.HANDOFF_MESSAGE).count() == 0


def test_a_question_and_the_bots_answer_each_reach_the_agents_inbox(agent, knowledge, embedding_model):
    # given a conversation on the scripted knowledge base (no chunk is near an unrelated question),
    # its widget socket and an agent's dashboard
    conversation = services.conversation_start()
    tab, dashboard = customer_socket(conversation), agent_socket(agent)

    async def scenario():
        for socket in (tab, dashboard):
            assert (await socket.connect(timeout=5))[0]
        try:
            # when the customer asks something the knowledge base cannot answer
            await tab.send_json_to({"type": "chat.message", "text": "Which football team won the 1954 World Cup?"})
            customer = []
            while not customer or customer[-1]["type"] != "chat.done":
                customer.append(await tab.receive_json_from(timeout=60))
            inbox = await frames_about(dashboard, {str(conversation.pk)}, count=2)
            return customer, inbox, await nothing_more_about(dashboard, {str(conversation.pk)}, wait_s=0.5)
        finally:
            for socket in (tab, dashboard):
                await socket.disconnect()

    customer, inbox, extra = async_to_sync(scenario)()
    # then the customer got the abstention, and the agents were told twice: the question, the answer
    assert [frame["type"] for frame in customer] == ["chat.token", "chat.citations", "chat.done"]
    assert customer[-1]["abstained"] is True
    changed = {"type": "inbox.changed", "conversation_id": str(conversation.pk), "kind": "message"}
    assert inbox == [changed, changed]
    assert extra == []
    question, answer = conversation.messages.order_by("id")
    assert (question.role, answer.role, answer.text) == ("user", "assistant", services.ABSTAIN_MESSAGE)
    # and the inbox orders the conversation by the answer's time
    assert Conversation.objects.get(pk=conversation.pk).updated_at == answer.created_at

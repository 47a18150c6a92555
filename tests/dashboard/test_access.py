"""Who may use the dashboard: every URL and the agent websocket, for anonymous users, logged-in
customers (no agent), agents (the "Agents" group) and staff."""

from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Group
from django.test import Client

from chat.models import Conversation
from config.asgi import application

pytestmark = pytest.mark.django_db


def dashboard_urls(conversation, message_id) -> list[tuple[str, str]]:
    """(method, path) of every dashboard URL."""
    cid = conversation.pk
    return [
        ("get", "/dashboard/"),
        ("get", "/dashboard/inbox/list/"),
        ("get", "/dashboard/analytics/"),
        ("get", f"/dashboard/conversations/{cid}/"),
        ("get", f"/dashboard/conversations/{cid}/transcript/"),
        ("post", f"/dashboard/conversations/{cid}/take/"),
        ("post", f"/dashboard/conversations/{cid}/hand-back/"),
        ("post", f"/dashboard/conversations/{cid}/resolve/"),
        ("post", f"/dashboard/conversations/{cid}/reviewed/"),
        ("post", f"/dashboard/conversations/{cid}/messages/"),
        ("get", "/dashboard/corrections/"),
        ("get", f"/dashboard/corrections/answers/{message_id}/"),
        ("post", f"/dashboard/corrections/answers/{message_id}/"),
        ("post", "/dashboard/corrections/1/review/"),
        ("get", "/dashboard/fine-tunes/"),
        ("post", "/dashboard/fine-tunes/start/"),
        ("post", "/dashboard/fine-tunes/versions/1/activate/"),
    ]


def last_answer_id(conversation) -> int:
    return conversation.messages.filter(role="assistant").order_by("-id").values_list("id", flat=True)[0]


def test_the_agents_group_is_created_by_the_migration():
    assert Group.objects.filter(name="Agents").count() == 1


def test_anonymous_users_are_redirected_to_login_on_every_url(conversation):
    # given an anonymous client
    client = Client()
    for method, path in dashboard_urls(conversation, last_answer_id(conversation)):
        # when it requests a dashboard URL
        response = getattr(client, method)(path)
        # then it is sent to the login page with ?next= pointing back
        assert response.status_code == 302, path
        assert response["Location"].startswith(settings.LOGIN_URL + "?next=/dashboard/"), path
    # and nothing changed
    conversation.refresh_from_db()
    assert conversation.status == "bot"
    assert conversation.messages.count() == 4


def test_logged_in_non_agents_get_403_on_every_url(conversation, customer_user):
    # given a logged-in user who is neither staff nor in the Agents group
    client = Client()
    client.force_login(customer_user)
    for method, path in dashboard_urls(conversation, last_answer_id(conversation)):
        # when they request a dashboard URL, then it is forbidden
        assert getattr(client, method)(path).status_code == 403, path
    conversation.refresh_from_db()
    assert (conversation.status, conversation.assigned_agent_id, conversation.reviewed_at) == ("bot", None, None)
    assert conversation.messages.count() == 4


@pytest.mark.parametrize("who", ["agent", "staff"])
def test_agents_and_staff_see_every_page(conversation, who, request):
    # given an agent (group member) or a staff member
    client = Client()
    client.force_login(request.getfixturevalue(who))
    for method, path in dashboard_urls(conversation, last_answer_id(conversation)):
        if method != "get":
            continue
        # when they open a dashboard page, then it renders
        assert client.get(path).status_code == 200, path


def test_an_agent_who_is_not_staff_signs_in_on_the_login_page_and_lands_on_the_inbox(agent):
    # given an agent (Agents group, not staff) who opens the dashboard anonymously
    client = Client(enforce_csrf_checks=True)
    redirect = client.get("/dashboard/")
    assert (redirect.status_code, redirect["Location"]) == (302, "/accounts/login/?next=/dashboard/")
    page = client.get(redirect["Location"])
    assert page.status_code == 200
    token = page.context["csrf_token"]
    # when they sign in with a wrong password, then they stay on the page, told why
    wrong = client.post("/accounts/login/", {"username": "alice", "password": "nope", "next": "/dashboard/",
                                             "csrfmiddlewaretoken": token})
    assert wrong.status_code == 200 and "Your username and password didn't match." in wrong.content.decode()
    # when they sign in with their password, then they land on the inbox
    signed_in = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice", "next": "/dashboard/",
                                                 "csrfmiddlewaretoken": token})
    assert (signed_in.status_code, signed_in["Location"]) == (302, "/dashboard/")
    assert client.get("/dashboard/").status_code == 200
    # and signing out ends the session
    inbox = client.get("/dashboard/")
    assert client.post("/accounts/logout/", {"csrfmiddlewaretoken": inbox.context["csrf_token"]}).status_code == 302
    assert client.get("/dashboard/").status_code == 302


# --- the agent websocket ------------------------------------------------------------------------


def session_headers(user=None) -> list[tuple[bytes, bytes]]:
    headers = [(b"origin", b"http://testserver"), (b"host", b"testserver")]
    if user is not None:
        client = Client()
        client.force_login(user)
        cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
        headers.append((b"cookie", cookie.encode()))
    return headers


async def handshake(headers) -> tuple[bool, int | None]:
    communicator = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    connected, code = await communicator.connect(timeout=5)
    await communicator.disconnect()
    return connected, code


@pytest.mark.django_db(transaction=True)
def test_agent_websocket_refuses_anonymous_and_non_agents_and_accepts_agents(customer_user, agent, staff):
    # given no session / a customer's session / an agent's / a staff member's
    # when each opens /ws/agent/
    # then anonymous is closed with 4401, the customer with 4403, agents and staff are accepted
    assert async_to_sync(handshake)(session_headers()) == (False, 4401)
    assert async_to_sync(handshake)(session_headers(customer_user)) == (False, 4403)
    assert async_to_sync(handshake)(session_headers(agent))[0] is True
    assert async_to_sync(handshake)(session_headers(staff))[0] is True


@pytest.mark.django_db(transaction=True)
def test_agent_websocket_refuses_other_origins(agent):
    # given an agent's session cookie sent from another site
    headers = [h for h in session_headers(agent) if h[0] != b"origin"] + [(b"origin", b"https://evil.example")]
    # when it opens /ws/agent/, then the handshake is refused
    connected, _ = async_to_sync(handshake)(headers)
    assert connected is False


def test_conversation_fixture_is_untouched_by_reads(conversation):
    assert Conversation.objects.get(pk=conversation.pk).status == "bot"

"""Takeover across two web processes sharing the real Redis channel layer, as when several web processes
run behind a load balancer: the customer's websocket is open on process A, the agent signs in, takes
the conversation over and replies on process B (the dashboard's HTTP pages), and the customer's socket
on A receives the status change and the agent's message.

Both processes are daphne serving ``config.asgi`` (``tests.live_server``) on the test database, with the
project's settings, so the same Redis. The customer's socket is a browser's (headless Chromium, a page
of A's origin); the agent's browser is a ``requests`` session with cookies and CSRF tokens. (No Python
websocket client fits here: ``websockets`` is not installed and autobahn's asyncio flavour refuses to
load next to daphne's Twisted one.)
"""

from __future__ import annotations

import asyncio
import re

import pytest
import requests
from django.db import connection

from chat import agent_services, services
from chat.conversation_access import client_subprotocols
from chat.models import Conversation, Message
from tests.browser.pages import CHROMIUM_ARGS
from tests.dashboard.conftest import make_agent
from tests.live_server import live_server

pytestmark = pytest.mark.django_db(transaction=True)  # the web processes read what the test commits

REPLY = "Hi, this is Alice from support <b>on process B</b>."
_CSRF = re.compile(r'name="csrfmiddlewaretoken" value="([^"]+)"')

# Run in the customer's page: open the conversation's socket, keep every frame in window.__frames, and
# resolve once it is open (the consumer joins the conversation's group before it accepts).
OPEN_SOCKET = """([url, protocols]) => new Promise((resolve, reject) => {
  window.__frames = [];
  const socket = new WebSocket(url, protocols);
  socket.addEventListener("message", (event) => window.__frames.push(JSON.parse(event.data)));
  socket.addEventListener("open", () => resolve(true));
  socket.addEventListener("close", (event) => reject(new Error(`closed with code ${event.code}`)));
})"""


def csrf_token(html: str) -> str:
    return _CSRF.search(html).group(1)


def agent_takes_over_and_replies(base: str, conversation_id, *, username: str, password: str, text: str) -> dict:
    """As an agent's browser on ``base``: sign in on the login page, open the conversation, take it
    over, send ``text``. Returns the status codes and the page each step landed on."""
    with requests.Session() as http:
        login = http.get(f"{base}/accounts/login/", timeout=30)
        signed_in = http.post(f"{base}/accounts/login/", timeout=30, data={
            "username": username, "password": password, "next": "/dashboard/", "csrfmiddlewaretoken": csrf_token(login.text)})
        page = http.get(f"{base}/dashboard/conversations/{conversation_id}/", timeout=30)
        token = csrf_token(page.text)
        took = http.post(f"{base}/dashboard/conversations/{conversation_id}/take/", timeout=30,
                         data={"csrfmiddlewaretoken": token}, allow_redirects=False)
        sent = http.post(f"{base}/dashboard/conversations/{conversation_id}/messages/", timeout=30,
                         data={"csrfmiddlewaretoken": token, "text": text}, allow_redirects=False)
        return {"signed in at": signed_in.url.removeprefix(base), "conversation page": page.status_code,
                "take": (took.status_code, took.headers.get("Location")),
                "send": (sent.status_code, sent.headers.get("Location"))}


def test_an_agent_on_process_b_takes_over_and_replies_to_a_customer_socket_on_process_a(chromium_path, tmp_path):
    # given agent alice and a conversation waiting for a human
    agent = make_agent("alice")
    conversation = services.conversation_start()
    services.conversation_request_human(conversation)
    database = connection.settings_dict["NAME"]
    page_path = f"/dashboard/conversations/{conversation.pk}/"

    async def scenario(a, b) -> tuple[dict, list[dict]]:
        from playwright.async_api import async_playwright

        async with async_playwright() as playwright:
            browser = await playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
            try:
                # and the customer's socket open on process A, from a page of A
                page = await browser.new_page()
                await page.goto(a.url + "/")
                socket_url = f"{a.url.replace('http', 'ws', 1)}/ws/chat/{conversation.pk}/"
                await page.evaluate(OPEN_SOCKET, [socket_url, client_subprotocols(conversation.token)])
                # when alice, on process B, takes the conversation over and replies
                steps = await asyncio.to_thread(agent_takes_over_and_replies, b.url, conversation.pk,
                                                username="alice", password="pw-alice", text=REPLY)
                # then process A relays both to the customer (and, a second later, nothing more)
                await page.wait_for_function("() => window.__frames.length >= 2", timeout=30_000)
                await asyncio.sleep(1)
                return steps, await page.evaluate("() => window.__frames")
            finally:
                await browser.close()

    with live_server(database, log_path=tmp_path / "a.log") as a, live_server(database, log_path=tmp_path / "b.log") as b:
        assert a.pid != b.pid and a.url != b.url
        steps, frames = asyncio.run(scenario(a, b))

    assert steps == {"signed in at": "/dashboard/", "conversation page": 200,
                     "take": (302, page_path), "send": (302, page_path)}
    reply = Message.objects.get(conversation=conversation, role="agent")
    assert frames == [
        {"type": "chat.status", "status": "agent", "message": agent_services.CUSTOMER_JOINED_MESSAGE},
        {"type": "chat.agent_message", "message_id": reply.pk, "text": REPLY, "created_at": reply.created_at.isoformat()},
    ]
    conversation = Conversation.objects.get(pk=conversation.pk)
    assert (conversation.status, conversation.assigned_agent_id) == ("agent", agent.pk)

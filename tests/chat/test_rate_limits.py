"""Rate limits (``chat.rate_limits``): conversations per client IP and per origin over HTTP (429 with
``Retry-After``), questions per conversation over the websocket (``chat.rate_limited``), counted in the
real (embedded) Redis, so another process sees the same counters.

The test settings lift every limit (``tests/settings.py``); each test sets the ones it checks and
starts from empty counters.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator

from chat import rate_limits
from chat.conversation_access import client_subprotocols
from chat.models import Conversation, Message, WidgetSite
from chat.services import AnswerEvent, conversation_start
from config.asgi import application
from tests.chat.test_consumer import SAME_SITE, SCRIPT, FakeAnswers, frames_of

ROOT = Path(__file__).resolve().parents[2]
SHOP = "https://shop.example.com"
OTHER_SHOP = "https://other-shop.example.com"


@pytest.fixture(autouse=True)
def empty_counters(settings):
    settings.RATE_LIMIT_CONVERSATIONS_PER_IP = ""
    settings.RATE_LIMIT_CONVERSATIONS_PER_ORIGIN = ""
    settings.RATE_LIMIT_QUESTIONS_PER_CONVERSATION = ""
    settings.RATE_LIMIT_IDENTITY_PER_IP = ""
    rate_limits.rate_limits_reset()
    yield
    rate_limits.rate_limits_reset()


def start(client, *, ip: str, origin: str | None = None):
    headers = {"REMOTE_ADDR": ip}
    if origin:
        headers["HTTP_ORIGIN"] = origin
    return client.post("/api/conversations/", **headers)


# --- conversations per client IP and per origin (HTTP) ---------------------------------------------


@pytest.mark.django_db
def test_conversations_past_the_per_ip_limit_get_429_with_retry_after(client, settings):
    # given a limit of 2 new conversations a minute per client IP
    settings.RATE_LIMIT_CONVERSATIONS_PER_IP = "2/minute"

    # when one IP starts three
    statuses = [start(client, ip="203.0.113.7").status_code for _ in range(2)]
    refused = start(client, ip="203.0.113.7")

    # then the third is refused with 429, a Retry-After within the minute and the delay in the body
    assert statuses == [201, 201]
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    body = refused.json()
    assert sorted(body) == ["error", "retry_after_s"]
    assert body["error"] == "Too many new conversations from here; please try again in a moment."
    assert 0 < body["retry_after_s"] <= 60
    # and nothing was created for it
    assert Conversation.objects.count() == 2
    # while another IP still starts one
    assert start(client, ip="198.51.100.4").status_code == 201


@pytest.mark.django_db
def test_conversations_past_the_per_origin_limit_get_429_whatever_the_ip(client, settings):
    # given two embedding sites and a limit of 2 new conversations a minute per site
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP, OTHER_SHOP]
    settings.RATE_LIMIT_CONVERSATIONS_PER_ORIGIN = "2/minute"

    # when visitors on three different IPs of one site start conversations
    statuses = [start(client, ip=f"203.0.113.{n}", origin=SHOP).status_code for n in (1, 2, 3)]

    # then the third is refused, with the CORS headers the widget needs to read it
    assert statuses == [201, 201, 429]
    refused = start(client, ip="203.0.113.4", origin=SHOP)
    assert refused["Access-Control-Allow-Origin"] == SHOP
    assert refused["Access-Control-Expose-Headers"] == "Retry-After"
    # and the other site is not affected
    assert start(client, ip="203.0.113.5", origin=OTHER_SHOP).status_code == 201
    assert Conversation.objects.count() == 3


@pytest.mark.django_db
def test_a_refused_request_does_not_use_up_the_other_limit(client, settings):
    # given a per-IP limit of 1 and a per-origin limit of 2
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP]
    settings.RATE_LIMIT_CONVERSATIONS_PER_IP = "1/minute"
    settings.RATE_LIMIT_CONVERSATIONS_PER_ORIGIN = "2/minute"

    # when one IP is refused twice after its first conversation
    assert [start(client, ip="203.0.113.9", origin=SHOP).status_code for _ in range(3)] == [201, 429, 429]

    # then the refusals did not count against the site: another visitor still gets the second slot
    assert start(client, ip="203.0.113.10", origin=SHOP).status_code == 201


@pytest.mark.django_db
def test_the_counters_are_shared_with_another_process(client, settings):
    # given an IP that used up its limit in this process
    settings.RATE_LIMIT_CONVERSATIONS_PER_IP = "1/minute"
    assert start(client, ip="203.0.113.77").status_code == 201

    # when another process (a second web process) checks the same IP against the same Redis
    script = (
        "import django; django.setup()\n"
        "from chat import rate_limits\n"
        "try:\n"
        "    rate_limits.conversation_start_check(client_ip='203.0.113.77', origin=None)\n"
        "    print('allowed')\n"
        "except rate_limits.RateLimited as limited:\n"
        "    print('refused', limited.kind)\n"
        "rate_limits.conversation_start_check(client_ip='203.0.113.78', origin=None)\n"
        "print('other ip allowed')\n"
    )
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "REDIS_URL": settings.REDIS_URL,
                   "RATE_LIMIT_CONVERSATIONS_PER_IP": "1/minute"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=environment, capture_output=True,
                            text=True, timeout=120)

    # then it is refused there too
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["refused conversations_per_ip", "other ip allowed"]


def test_a_malformed_limit_setting_stops_start_up():
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings",
                   "RATE_LIMIT_QUESTIONS_PER_CONVERSATION": "ten a minute"}
    result = subprocess.run([sys.executable, "-c", "import django; django.setup()"], cwd=ROOT, env=environment,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert ("ImproperlyConfigured: RATE_LIMIT_QUESTIONS_PER_CONVERSATION='ten a minute' is not a rate limit like "
            '"10/minute" or "5/minute;30/hour"') in result.stderr


# --- signed-in customers' endpoints per client IP (HTTP) ---------------------------------------------


@pytest.fixture
def shop_site(settings) -> WidgetSite:
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP]
    return WidgetSite.objects.create(origin=SHOP, collection="default")


def identity_of(site: WidgetSite, user_id: str) -> dict:
    """The body a host site sends for its signed-in ``user_id`` (HMAC-SHA256 computed here, as the site would)."""
    return {"user_id": user_id, "user_hash": hmac.new(site.identity_secret.encode(), user_id.encode(),
                                                      hashlib.sha256).hexdigest()}


def identity_post(client, path: str, body: dict, *, ip: str):
    return client.post(path, data=json.dumps(body), content_type="application/json", REMOTE_ADDR=ip, HTTP_ORIGIN=SHOP)


def verified_conversation(site: WidgetSite, user_id: str) -> Conversation:
    conversation = conversation_start(origin=site.origin, verified_user_id=user_id)
    Message.objects.create(conversation=conversation, role=Message.Role.USER, text="Where is my order?")
    return conversation


@pytest.mark.django_db
def test_listing_past_the_per_ip_identity_limit_gets_429_with_retry_after(client, settings, shop_site):
    # given a limit of 2 identity requests a minute per client IP, and customer 42's conversation
    settings.RATE_LIMIT_IDENTITY_PER_IP = "2/minute"
    verified_conversation(shop_site, "cust-42")
    body = identity_of(shop_site, "cust-42")

    # when one IP lists the customer's conversations three times
    statuses = [identity_post(client, "/api/conversations/verified/", body, ip="203.0.113.7").status_code
                for _ in range(2)]
    refused = identity_post(client, "/api/conversations/verified/", body, ip="203.0.113.7")

    # then the third is refused with 429, Retry-After within the minute, the delay in the body and
    # the CORS headers the widget needs to read them; nothing of the customer's is in it
    assert statuses == [200, 200]
    assert refused.status_code == 429
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert refused["Access-Control-Allow-Origin"] == SHOP
    assert refused["Access-Control-Expose-Headers"] == "Retry-After"
    assert sorted(refused.json()) == ["error", "retry_after_s"]
    assert refused.json()["error"] == "Too many requests from here; please try again in a moment."
    assert 0 < refused.json()["retry_after_s"] <= 60
    # while another IP still lists them
    assert identity_post(client, "/api/conversations/verified/", body, ip="198.51.100.4").status_code == 200


@pytest.mark.django_db
def test_resume_shares_the_identity_limit_and_a_refused_resume_gives_no_token(client, settings, shop_site):
    # given a limit of 2 a minute, and customer 42's conversation
    settings.RATE_LIMIT_IDENTITY_PER_IP = "2/minute"
    conversation = verified_conversation(shop_site, "cust-42")
    body = identity_of(shop_site, "cust-42")
    resume = f"/api/conversations/{conversation.pk}/resume/"

    # when one IP lists, resumes, then resumes again
    listed = identity_post(client, "/api/conversations/verified/", body, ip="203.0.113.8")
    resumed = identity_post(client, resume, body, ip="203.0.113.8")
    refused = identity_post(client, resume, body, ip="203.0.113.8")

    # then the list and the first resume counted against one limit, and the third request got no token
    assert (listed.status_code, resumed.status_code, refused.status_code) == (200, 200, 429)
    assert resumed.json()["token"] == conversation.token
    assert conversation.token not in refused.content.decode()
    assert refused.json()["error"] == "Too many requests from here; please try again in a moment."
    # and the conversation is unchanged
    assert Conversation.objects.get(pk=conversation.pk).token == conversation.token


@pytest.mark.django_db
def test_refused_identity_claims_count_so_hashes_cannot_be_tried_faster_than_the_limit(client, settings, shop_site):
    # given a limit of 3 a minute
    settings.RATE_LIMIT_IDENTITY_PER_IP = "3/minute"
    conversation = verified_conversation(shop_site, "cust-42")
    wrong = {"user_id": "cust-42", "user_hash": "0" * 64}

    # when one IP tries wrong hashes for the list and the resume endpoints, then the right one
    tried = [identity_post(client, path, wrong, ip="203.0.113.9").status_code
             for path in ("/api/conversations/verified/", f"/api/conversations/{conversation.pk}/resume/",
                          "/api/conversations/verified/")]
    right = identity_post(client, "/api/conversations/verified/", identity_of(shop_site, "cust-42"), ip="203.0.113.9")

    # then the wrong ones were refused (403) and used up the limit: even the right hash now waits
    assert tried == [403, 403, 403]
    assert right.status_code == 429


@pytest.mark.django_db
def test_the_identity_limit_is_separate_from_the_new_conversations_limit(client, settings, shop_site):
    # given both per-IP limits at 1 a minute
    settings.RATE_LIMIT_IDENTITY_PER_IP = "1/minute"
    settings.RATE_LIMIT_CONVERSATIONS_PER_IP = "1/minute"
    body = identity_of(shop_site, "cust-42")
    verified_conversation(shop_site, "cust-42")

    # when one IP lists its conversations and starts a new one
    listed = identity_post(client, "/api/conversations/verified/", body, ip="203.0.113.10")
    started = identity_post(client, "/api/conversations/", body, ip="203.0.113.10")

    # then neither used up the other's limit
    assert (listed.status_code, started.status_code) == (200, 201)


# --- questions per conversation (websocket) --------------------------------------------------------


def socket_for(conversation: Conversation) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, f"/ws/chat/{conversation.pk}/", headers=SAME_SITE,
                                 subprotocols=client_subprotocols(conversation.token))


@pytest.mark.django_db(transaction=True)
def test_questions_past_the_per_conversation_limit_get_chat_rate_limited(monkeypatch, settings):
    # given a limit of 2 questions a minute per conversation
    settings.RATE_LIMIT_QUESTIONS_PER_CONVERSATION = "2/minute"
    fake = FakeAnswers(SCRIPT)
    monkeypatch.setattr("chat.services.answer_events", fake)
    conversation, other = conversation_start(), conversation_start()

    async def scenario():
        socket = socket_for(conversation)
        assert (await socket.connect())[0]
        for question in ("one", "two"):
            await socket.send_json_to({"type": "chat.message", "text": question})
            assert [await socket.receive_json_from(timeout=5) for _ in SCRIPT] == frames_of(SCRIPT)
        # when a third question arrives within the minute
        await socket.send_json_to({"type": "chat.message", "text": "three"})
        limited = await socket.receive_json_from(timeout=5)
        assert await socket.receive_nothing(timeout=0.1)
        await socket.disconnect()
        # while another conversation still asks
        second = socket_for(other)
        assert (await second.connect())[0]
        await second.send_json_to({"type": "chat.message", "text": "elsewhere"})
        assert (await second.receive_json_from(timeout=5))["type"] == "chat.token"
        await second.disconnect()
        return limited

    limited = async_to_sync(scenario)()

    # then it gets chat.rate_limited with the delay, and it never reached the answer pipeline
    assert sorted(limited) == ["message", "retry_after_s", "type"]
    assert limited["type"] == "chat.rate_limited"
    assert limited["message"] == "You're sending questions faster than we can answer; yours will go in a moment."
    assert 0 < limited["retry_after_s"] <= 60
    assert [question for _, question, _ in fake.calls] == ["one", "two", "elsewhere"]


@pytest.mark.django_db(transaction=True)
def test_a_question_sent_again_after_busy_is_not_counted_twice(monkeypatch, settings):
    # given a limit of 1 question a minute, and an engine that is busy
    settings.RATE_LIMIT_QUESTIONS_PER_CONVERSATION = "1/minute"
    busy = AnswerEvent("chat.busy", {"retry_after_s": 1.0, "message": "busy"})
    monkeypatch.setattr("chat.services.answer_events", FakeAnswers([busy]))
    conversation = conversation_start()

    async def scenario():
        socket = socket_for(conversation)
        assert (await socket.connect())[0]
        await socket.send_json_to({"type": "chat.message", "text": "question"})
        first = await socket.receive_json_from(timeout=5)
        # when the widget sends the same question again, as it does after chat.busy
        await socket.send_json_to({"type": "chat.message", "text": "question"})
        again = await socket.receive_json_from(timeout=5)
        # but a different question is a new one, past the limit
        await socket.send_json_to({"type": "chat.message", "text": "another question"})
        other = await socket.receive_json_from(timeout=5)
        await socket.disconnect()
        return [first["type"], again["type"], other["type"]]

    assert async_to_sync(scenario)() == ["chat.busy", "chat.busy", "chat.rate_limited"]


def test_retry_after_header_is_whole_seconds_rounded_up():
    assert [rate_limits.RateLimited("k", s).retry_after_header for s in (0.1, 1.0, 1.2, 59.01)] == ["1", "1", "2", "60"]

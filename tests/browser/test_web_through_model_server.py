"""The production process model end to end: a web process (daphne, ``LLM_SERVER_URL`` set) holding no
model answers a customer over the chat websocket through a real model server (``manage.py
serve_model``) with the real GGUF model, and a customer who leaves frees the model server's sequence.

Quote-first is off in the web process (``ANSWER_QUOTE_MIN_RELEVANCE=2``) so the model is always asked,
and answers may run to 400 tokens (tens of seconds here), so a sequence freed within 15 s of the
customer leaving was cancelled, not finished.
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.chat.test_engine import wait_until
from tests.live_server import LiveServerError, live_server
from tests.model_server import model_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db]


@pytest.fixture(scope="module")
def servers(demo_knowledge_base, tmp_path_factory, django_db_blocker):
    from django.db import connection

    with django_db_blocker.unblock():
        database = connection.settings_dict["NAME"]
    logs = tmp_path_factory.mktemp("process-model")
    try:
        # one llama.cpp thread: a step then takes ~2 s on a busy 2-core machine, where two threads
        # collapse (README "Model server"), and a cancel is seen after the current step
        with model_server(database, log_path=logs / "model.log", env={"LLM_THREADS": "1"}) as model:
            with live_server(database, log_path=logs / "web.log",
                             env={"LLM_SERVER_URL": model.url, "ANSWER_QUOTE_MIN_RELEVANCE": "2",
                                  "LLM_MAX_TOKENS": "400"}) as web:
                yield web, model
    except LiveServerError as error:
        pytest.fail(str(error))


def start_conversation(web) -> dict:
    request = urllib.request.Request(web.url + "/api/conversations/", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def socket_url(web, conversation) -> str:
    return f"{web.url.replace('http', 'ws', 1)}/ws/chat/{conversation['id']}/"


def open_socket(web, conversation):
    """A websocket to the conversation, its token offered as a subprotocol (never in the URL)."""
    from websockets.sync.client import connect

    from chat.conversation_access import client_subprotocols

    return connect(socket_url(web, conversation), open_timeout=30,
                   subprotocols=client_subprotocols(conversation["token"]))


def test_a_web_process_without_a_model_answers_through_the_model_server(servers):
    from chat.models import Message

    web, model = servers
    conversation = start_conversation(web)
    # when a customer asks over the websocket
    with open_socket(web, conversation) as socket:
        socket.send(json.dumps({"type": "chat.message", "text": "How long does standard shipping take?"}))
        frames = []
        while not frames or frames[-1]["type"] not in ("chat.done", "chat.error", "chat.busy"):
            frames.append(json.loads(socket.recv(timeout=300)))
    # then tokens stream, then citations, then done, with tokens the model server generated
    types = [f["type"] for f in frames]
    assert types[-1] == "chat.done", frames[-1]
    assert types[-2] == "chat.citations" and set(types[:-2]) == {"chat.token"}
    done = frames[-1]
    assert done["timings"]["tokens"] >= 1
    assert "".join(f["text"] for f in frames if f["type"] == "chat.token").strip() == done["text"]
    # and the stored answer records the version the model server served, which it has loaded
    stored = Message.objects.get(pk=done["message_id"])
    assert stored.model_version is not None
    assert [m["model"] for m in model.health()["loaded"]] == [stored.model_version.base_model_path]


def test_a_customer_who_leaves_frees_the_model_servers_sequence(servers):
    web, model = servers
    conversation = start_conversation(web)
    with open_socket(web, conversation) as socket:
        socket.send(json.dumps({"type": "chat.message", "text": "What is your returns policy for used boots?"}))
        # given the model server generating this answer
        wait_until(lambda: sum(m["pending"] for m in model.health()["loaded"]) == 1, timeout_s=120)
    # when the socket is closed, then the model server's sequence is released
    wait_until(lambda: sum(m["pending"] for m in model.health()["loaded"]) == 0, timeout_s=15)

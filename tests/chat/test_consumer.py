"""The customer's chat websocket (``chat.consumers.ChatConsumer``) through ``config.asgi.application``.

Unit tests replace ``chat.services.answer_events`` with scripted async generators; the channel layer,
the origin check, the token check and the database are real. The last tests run the real answer
pipeline (real GGUF model, real embedding model, real Postgres) on real Doc2Dial pages.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator

from chat import consumers, notifications
from chat.conversation_access import SUBPROTOCOL, client_subprotocols
from chat.models import Conversation, Message
from chat.services import AnswerEvent, conversation_start
from config.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

SAME_SITE = [(b"origin", b"http://testserver"), (b"host", b"testserver")]


def run(scenario, *args):
    """Run an async test body on a fresh event loop (no pytest-asyncio plugin needed)."""
    return async_to_sync(scenario)(*args)


def communicator(conversation: Conversation, *, token: str | None = None, headers=SAME_SITE) -> WebsocketCommunicator:
    """A client of the conversation's socket offering ``token`` (default: the conversation's own) the
    way the widget does, as a subprotocol (``""``: no token offered)."""
    token = conversation.token if token is None else token
    subprotocols = client_subprotocols(token) if token else [SUBPROTOCOL]
    return WebsocketCommunicator(application, f"/ws/chat/{conversation.pk}/", headers=headers, subprotocols=subprotocols)


class FakeAnswers:
    """Stands in for ``chat.services.answer_events``: records each call and yields ``events``.

    With ``hold=True`` it then waits until the caller's cancel event is set (an answer still
    generating); with ``ignore_cancel=True`` it waits forever (a stuck answer). ``finished`` is set
    when the generator is finalised, however it ended.
    """

    def __init__(self, events=(), *, hold=False, ignore_cancel=False):
        self.events = list(events)
        self.hold = hold
        self.ignore_cancel = ignore_cancel
        self.calls: list[tuple] = []
        self.finalised = 0

    async def __call__(self, conversation_id, question, *, cancel=None):
        self.calls.append((conversation_id, question, cancel))
        try:
            for event in self.events:
                yield event
            if self.ignore_cancel:
                await asyncio.Event().wait()
            while self.hold and not cancel.is_set():
                await asyncio.sleep(0.01)
        finally:
            self.finalised += 1


SCRIPT = [
    AnswerEvent("chat.token", {"text": "Refunds take"}),
    AnswerEvent("chat.token", {"text": " five days [1]."}),
    AnswerEvent("chat.citations", {"citations": [
        {"n": 1, "chunk_id": 7, "source_id": 3, "source_title": "Returns", "start": 0, "end": 40,
         "title": "Returns", "excerpt": "Refunds take five business days."}]}),
    AnswerEvent("chat.done", {"message_id": 11, "abstained": False, "text": "Refunds take five days [1].",
                              "timings": {"retrieval_ms": 4.0, "ttft_ms": 80.0, "generation_ms": 200.0,
                                          "tokens": 6, "tokens_per_s": 30.0}}),
]


@pytest.fixture
def fake_answers(monkeypatch):
    fake = FakeAnswers(SCRIPT)
    monkeypatch.setattr("chat.services.answer_events", fake)
    return fake


def frames_of(events):
    return [{"type": event.type, **event.data} for event in events]


# --- connecting ------------------------------------------------------------------------------------


def test_the_conversations_own_token_connects_with_the_chat_subprotocol():
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        # then the handshake is accepted with "supportbot.chat", never echoing the token protocol
        assert await socket.connect() == (True, "supportbot.chat")
        await socket.disconnect()

    run(scenario)


@pytest.mark.parametrize("with_subprotocol", [False, True], ids=["query-only", "query-and-subprotocol"])
def test_a_token_in_the_url_is_refused_with_4400(with_subprotocol):
    # given a client that puts the conversation's token in the URL (even beside a good subprotocol)
    conversation = conversation_start()
    subprotocols = client_subprotocols(conversation.token) if with_subprotocol else None

    async def scenario():
        socket = WebsocketCommunicator(application, f"/ws/chat/{conversation.pk}/?token={conversation.token}",
                                       headers=SAME_SITE, subprotocols=subprotocols)
        # then the handshake is refused before it is accepted
        assert await socket.connect() == (False, 4400)
        await socket.disconnect()

    run(scenario)


@pytest.mark.parametrize("token", ["other", "", "made-up"])
def test_another_conversations_token_is_refused_with_4403(token):
    # given two conversations, and a caller holding the other one's token (or none, or a made-up one)
    conversation, other = conversation_start(), conversation_start()
    value = {"other": other.token, "": "", "made-up": "x" * 43}[token]

    async def scenario():
        socket = communicator(conversation, token=value)
        connected, code = await socket.connect()
        # then the handshake is closed before it is accepted
        assert (connected, code) == (False, 4403)
        await socket.disconnect()

    run(scenario)


def test_an_unknown_conversation_is_refused_with_4403():
    conversation = conversation_start()
    Conversation.objects.filter(pk=conversation.pk).delete()

    async def scenario():
        socket = communicator(conversation)
        connected, code = await socket.connect()
        assert (connected, code) == (False, 4403)
        await socket.disconnect()

    run(scenario)


@pytest.mark.parametrize("path", ["/ws/chat/not-a-uuid/?token=x", "/ws/nothing-here/", "/", "/ws/agent/extra/"])
def test_a_path_no_route_serves_is_refused_with_4404(path):
    async def scenario():
        # given a websocket path that no route serves (a malformed id, an unknown path)
        socket = WebsocketCommunicator(application, path, headers=SAME_SITE)
        # when the handshake is attempted
        # then it is refused with 4404 (not a ValueError from the router, which was a 500)
        assert await socket.connect() == (False, 4404)

    run(scenario)
    assert Conversation.objects.count() == 0


def test_an_origin_not_allowed_is_refused(settings):
    settings.WIDGET_ALLOWED_ORIGINS = ["https://shop.example.com"]
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation, headers=[(b"origin", b"https://evil.example.net")])
        connected, _ = await socket.connect()
        assert connected is False
        await socket.disconnect()

    run(scenario)


def test_an_embedding_site_listed_in_the_setting_connects(settings):
    settings.WIDGET_ALLOWED_ORIGINS = ["https://shop.example.com"]
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation, headers=[(b"origin", b"https://shop.example.com")])
        connected, _ = await socket.connect()
        assert connected is True
        await socket.disconnect()

    run(scenario)


# --- asking ----------------------------------------------------------------------------------------


def test_a_question_streams_the_answer_events_as_frames(fake_answers):
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "  How long do refunds take?  "})
        received = [await socket.receive_json_from(timeout=5) for _ in SCRIPT]
        assert received == frames_of(SCRIPT)
        assert await socket.receive_nothing(timeout=0.1)
        await socket.disconnect()

    run(scenario)
    # the service got the conversation and the stripped question
    assert [(conversation_id, question) for conversation_id, question, _ in fake_answers.calls] == [
        (conversation.pk, "How long do refunds take?")
    ]


BAD_FRAMES = [
    pytest.param("{not json", {"code": "invalid_json", "message": "frames must be valid JSON"}, id="invalid-json"),
    pytest.param("[1, 2]", {"code": "invalid_frame", "message": "frames must be JSON objects with a type"}, id="not-object"),
    pytest.param(json.dumps({"type": "chat.delete_everything"}),
                 {"code": "unknown_type", "message": "unknown frame type; expected chat.message or chat.handoff"},
                 id="unknown-type"),
    pytest.param(json.dumps({"text": "no type"}),
                 {"code": "unknown_type", "message": "unknown frame type; expected chat.message or chat.handoff"},
                 id="missing-type"),
    pytest.param(json.dumps({"type": "chat.message", "text": ""}), {"code": "empty", "message": "the message is empty"},
                 id="empty"),
    pytest.param(json.dumps({"type": "chat.message", "text": " \n\t "}),
                 {"code": "empty", "message": "the message is empty"}, id="blank"),
    pytest.param(json.dumps({"type": "chat.message"}), {"code": "empty", "message": "the message is empty"},
                 id="no-text"),
    pytest.param(json.dumps({"type": "chat.message", "text": ["a list"]}),
                 {"code": "empty", "message": "the message is empty"}, id="text-not-string"),
    pytest.param(json.dumps({"type": "chat.message", "text": "x" * 2001}),
                 {"code": "too_long", "message": "the message is longer than 2000 characters"}, id="oversized"),
    pytest.param("x" * 20_000, {"code": "too_long", "message": "the message is longer than 2000 characters"},
                 id="oversized-frame"),
    pytest.param(json.dumps({"type": "chat.message", "text": "refund\u0000 policy"}),
                 {"code": "invalid_characters",
                  "message": "the message contains characters that cannot be stored (NUL or an unpaired surrogate)"},
                 id="nul-byte"),
    pytest.param('{"type": "chat.message", "text": "refund \\ud800 policy"}',
                 {"code": "invalid_characters",
                  "message": "the message contains characters that cannot be stored (NUL or an unpaired surrogate)"},
                 id="lone-surrogate"),
    pytest.param(json.dumps({"type": "chat.message", "text": "\u200b\u200b \ufeff\u200d"}),
                 {"code": "empty", "message": "the message is empty"}, id="only-zero-width-spaces"),
]


@pytest.mark.parametrize(("frame", "error"), BAD_FRAMES)
def test_a_bad_frame_gets_chat_error_and_the_socket_stays_usable(fake_answers, frame, error):
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        # when a bad frame arrives
        await socket.send_to(text_data=frame)
        # then it gets exactly one chat.error
        assert await socket.receive_json_from(timeout=5) == {"type": "chat.error", **error}
        assert await socket.receive_nothing(timeout=0.1)
        # and nothing was asked of the answer service
        assert fake_answers.calls == []
        # and the same socket still answers a good question
        await socket.send_json_to({"type": "chat.message", "text": "How long do refunds take?"})
        assert [await socket.receive_json_from(timeout=5) for _ in SCRIPT] == frames_of(SCRIPT)
        await socket.disconnect()

    run(scenario)
    assert len(fake_answers.calls) == 1
    assert Message.objects.count() == 0  # the fake stores nothing; the consumer itself never writes


def test_a_binary_frame_gets_chat_error(fake_answers):
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_to(bytes_data=b"\x00\x01")
        assert await socket.receive_json_from(timeout=5) == {
            "type": "chat.error", "code": "invalid_frame", "message": "frames must be JSON text"}
        await socket.disconnect()

    run(scenario)
    assert fake_answers.calls == []


def test_a_message_of_exactly_the_limit_is_accepted(fake_answers):
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "y" * 2000})
        assert (await socket.receive_json_from(timeout=5))["type"] == "chat.token"
        await socket.disconnect()

    run(scenario)
    assert [len(question) for _, question, _ in fake_answers.calls] == [2000]


def test_a_second_question_while_an_answer_streams_is_refused(monkeypatch):
    # given an answer that is still generating
    fake = FakeAnswers([AnswerEvent("chat.token", {"text": "Working"})], hold=True)
    monkeypatch.setattr("chat.services.answer_events", fake)
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "first"})
        assert await socket.receive_json_from(timeout=5) == {"type": "chat.token", "text": "Working"}
        # when a second question arrives
        await socket.send_json_to({"type": "chat.message", "text": "second"})
        # then it is refused and the first answer goes on
        assert await socket.receive_json_from(timeout=5) == {
            "type": "chat.error", "code": "answer_in_progress", "message": "please wait for the current answer to finish"}
        assert [question for _, question, _ in fake.calls] == ["first"]
        await socket.disconnect()

    run(scenario)


def test_disconnecting_cancels_the_running_answer(monkeypatch):
    fake = FakeAnswers([AnswerEvent("chat.token", {"text": "Working"})], hold=True)
    monkeypatch.setattr("chat.services.answer_events", fake)
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "long question"})
        await socket.receive_json_from(timeout=5)
        # when the customer leaves mid-answer
        await socket.disconnect()

    run(scenario)
    # then the answer's cancel event was set and its generator finalised
    (_, _, cancel), = fake.calls
    assert cancel.is_set()
    assert fake.finalised == 1


def test_disconnecting_cancels_an_answer_that_ignores_its_cancel_event(monkeypatch):
    # given an answer stuck waiting (it never checks the cancel event)
    monkeypatch.setattr(consumers, "CANCEL_GRACE_S", 0.1)
    fake = FakeAnswers([AnswerEvent("chat.token", {"text": "Stuck"})], ignore_cancel=True)
    monkeypatch.setattr("chat.services.answer_events", fake)
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "question"})
        await socket.receive_json_from(timeout=5)
        await socket.disconnect(timeout=5)

    run(scenario)
    # then after the grace period its task was cancelled, which finalised the generator
    assert fake.finalised == 1


def test_busy_is_relayed_so_the_widget_can_retry(monkeypatch):
    busy = AnswerEvent("chat.busy", {"retry_after_s": 2.5, "message": "Our assistant is busy right now; retrying in a moment."})
    monkeypatch.setattr("chat.services.answer_events", FakeAnswers([busy]))
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "question"})
        assert await socket.receive_json_from(timeout=5) == {"type": "chat.busy", **busy.data}
        # and the socket takes the retry
        await socket.send_json_to({"type": "chat.message", "text": "question"})
        assert (await socket.receive_json_from(timeout=5))["type"] == "chat.busy"
        await socket.disconnect()

    run(scenario)


def test_a_failing_answer_service_becomes_chat_error_and_the_socket_stays_open(monkeypatch):
    async def broken(conversation_id, question, *, cancel=None):
        raise RuntimeError("database on fire")
        yield  # pragma: no cover  (makes this an async generator)

    monkeypatch.setattr("chat.services.answer_events", broken)
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.message", "text": "question"})
        assert await socket.receive_json_from(timeout=5) == {
            "type": "chat.error", "code": "internal", "message": "something went wrong while answering; please try again"}
        await socket.send_json_to({"type": "chat.handoff"})
        assert await socket.receive_json_from(timeout=5) == {
            "type": "chat.status", "status": "needs_human", "message": "We've asked a person to join the conversation."}
        await socket.disconnect()

    run(scenario)


# --- handoff and the conversation's group ---------------------------------------------------------


def test_handoff_frame_marks_the_conversation_as_needing_a_human():
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        await socket.send_json_to({"type": "chat.handoff"})
        # the service's chat.status reaches this socket through the conversation's group
        assert await socket.receive_json_from(timeout=5) == {
            "type": "chat.status", "status": "needs_human", "message": "We've asked a person to join the conversation."}
        assert await socket.receive_nothing(timeout=0.5)
        await socket.disconnect()

    run(scenario)
    conversation.refresh_from_db()
    assert conversation.status == "needs_human"


def test_agent_messages_and_status_changes_of_the_group_reach_the_socket():
    conversation, other = conversation_start(), conversation_start()
    agent_message = {"type": "chat.agent_message", "message_id": 5, "text": "Hi, this is Sam from support."}

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        layer = get_channel_layer()
        # a message to another conversation's group does not arrive here
        await layer.group_send(notifications.conversation_group(other.pk), {"type": "chat.status", "status": "agent"})
        assert await socket.receive_nothing(timeout=0.3)
        # this conversation's group messages do
        await layer.group_send(notifications.conversation_group(conversation.pk), agent_message)
        assert await socket.receive_json_from(timeout=5) == agent_message
        await layer.group_send(notifications.conversation_group(conversation.pk), {"type": "chat.status", "status": "agent"})
        assert await socket.receive_json_from(timeout=5) == {"type": "chat.status", "status": "agent"}
        await socket.disconnect()

    run(scenario)


def test_a_socket_idle_longer_than_the_channel_layers_receive_wait_stays_usable(fake_answers):
    # regression: redis-py's default 5 s read timeout raced the Redis layer's 5 s BZPOPMIN and closed
    # every socket that stayed quiet for 5 s
    conversation = conversation_start()

    async def scenario():
        socket = communicator(conversation)
        await socket.connect()
        assert await socket.receive_nothing(timeout=6.5, interval=0.5)
        await socket.send_json_to({"type": "chat.message", "text": "still there?"})
        assert [await socket.receive_json_from(timeout=5) for _ in SCRIPT] == frames_of(SCRIPT)
        await socket.disconnect()

    run(scenario)


# --- end to end: the real pipeline on real Doc2Dial pages -----------------------------------------

E2E_COLLECTION = "doc2dial-ws-e2e"


def _first_turn_question(doc2dial_questions, gold_file: str) -> dict:
    return next(q for q in doc2dial_questions if q["is_first_turn"] and q["gold_file"] == gold_file)


@pytest.fixture
def doc2dial_pages(doc2dial_dir, embedding_model):
    """Three real Doc2Dial pages ingested (parsed, chunked, embedded) into their own collection."""
    from knowledge import services as knowledge_services

    files = [
        "docs/dmv/010_Escort_driver_certification_1_0.txt",
        "docs/dmv/005_Renew_non_driver_ID_card_1_0.txt",
        "docs/ssa/097_Benefits_Planner_Retirement_Delayed_Retirement_Credits_Social_Security_Administr.txt",
    ]
    paths = [doc2dial_dir / name for name in files]
    result = knowledge_services.sources_register_paths(paths, collection=E2E_COLLECTION, enqueue=False)
    for source in result.queued:
        assert knowledge_services.document_ingest(source.pk).status == "ingested"
    return {name: Path(path) for name, path in zip(files, paths)}


async def _ask(conversation: Conversation, question: str, *, timeout_s: float = 300) -> list[dict]:
    socket = communicator(conversation)
    connected, _ = await socket.connect()
    assert connected
    await socket.send_json_to({"type": "chat.message", "text": question})
    frames = []
    while not frames or frames[-1]["type"] not in {"chat.done", "chat.error", "chat.busy"}:
        frames.append(await socket.receive_json_from(timeout=timeout_s))
    await socket.disconnect()
    return frames


@pytest.mark.e2e
def test_e2e_a_real_question_streams_tokens_and_cites_retrieved_chunks_of_its_page(
    doc2dial_pages, doc2dial_questions, settings
):
    from knowledge.models import Chunk, Source

    settings.ANSWER_QUOTE_MIN_RELEVANCE = 2.0  # the model is asked (no source sentence is quoted first)

    # given a real customer question about one of the ingested pages
    gold_file = "docs/dmv/010_Escort_driver_certification_1_0.txt"
    question = _first_turn_question(doc2dial_questions, gold_file)["question"]
    gold_source = Source.objects.get(collection=E2E_COLLECTION, uri=str(doc2dial_pages[gold_file].resolve()))
    conversation = conversation_start(collection=E2E_COLLECTION)

    # when it is asked over the websocket
    frames = run(_ask, conversation, question)

    # then tokens stream first, then the citations, then done
    types = [frame["type"] for frame in frames]
    assert types[-2:] == ["chat.citations", "chat.done"], types
    tokens = [frame["text"] for frame in frames if frame["type"] == "chat.token"]
    assert len(tokens) >= 1 and set(types[:-2]) == {"chat.token"}
    done = frames[-1]
    assert done["abstained"] is False
    # (checked text arrives a sentence at a time; a quote when nothing the model wrote passed)
    assert done["method"] in ("generated", "extractive")
    assert "".join(tokens).strip() == done["text"]
    assert done["timings"]["tokens"] >= 3 and done["timings"]["ttft_ms"] > 0

    # and every citation points at a retrieved chunk of the question's page, as stored
    citations = frames[-2]["citations"]
    assert citations, f"the answer cited nothing: {done['text']!r}"
    message = Message.objects.get(pk=done["message_id"])
    retrieved = {row["chunk_id"] for row in message.retrieval}
    # (the frames add the chunk's title and an excerpt to what is stored)
    assert message.citations == [{k: v for k, v in c.items() if k not in ("title", "excerpt")} for c in citations]
    for citation in citations:
        chunk = Chunk.objects.get(pk=citation["chunk_id"])
        assert citation["chunk_id"] in retrieved
        assert (citation["source_id"], citation["start"], citation["end"]) == (gold_source.pk, chunk.start, chunk.end)
        assert f"[{citation['n']}]" in done["text"]
    # and the question and answer are the conversation's stored transcript
    assert list(conversation.messages.values_list("role", "text")) == [("user", question), ("assistant", done["text"])]


@pytest.mark.e2e
def test_e2e_an_unrelated_question_abstains_over_the_websocket(doc2dial_pages):
    from chat.services import ABSTAIN_MESSAGE

    conversation = conversation_start(collection=E2E_COLLECTION)

    frames = run(_ask, conversation, "What is the best recipe for banana bread?")

    assert [frame["type"] for frame in frames] == ["chat.token", "chat.citations", "chat.done"]
    assert frames[0] == {"type": "chat.token", "text": ABSTAIN_MESSAGE}
    assert frames[1] == {"type": "chat.citations", "citations": []}
    assert frames[2]["abstained"] is True

"""The widget's HTTP API (``chat.views``): starting conversations, transcripts, cited passages,
handoff, CORS for the embedding sites, and the demo page.

Real Postgres; no model is involved (messages are written directly, as the answer pipeline would).
"""

from __future__ import annotations

import json

import pytest
from django.contrib.staticfiles import finders

from chat.models import Conversation, Message, WidgetSite
from chat.services import HANDOFF_MESSAGE, conversation_start
from knowledge.models import Chunk, Source

pytestmark = pytest.mark.django_db

SHOP = "https://shop.example.com"

# A source whose chunk is "Refunds take five business days." (offsets 40..73).
SOURCE_TEXT = (
    "Returns policy\n\nYou can return any item. Refunds take five business days. "
    "Exchanges are free."
)
CHUNK_START = SOURCE_TEXT.index("Refunds")
CHUNK_END = SOURCE_TEXT.index(" Exchanges")


def make_chunk(text: str = SOURCE_TEXT, start: int = CHUNK_START, end: int = CHUNK_END, *, title="Returns policy",
               uri="returns.md") -> Chunk:
    source = Source.objects.create(uri=uri, title=title, text=text, status=Source.Status.READY)
    return Chunk.objects.create(
        source=source, ordinal=0, start=start, end=end, text=text[start:end],
        embedding=[1.0] + [0.0] * 383, embedding_model="test@384",
    )


def cite(conversation: Conversation, chunk: Chunk, *, n: int = 1, text: str = "Refunds take five days [1].") -> Message:
    return Message.objects.create(
        conversation=conversation, role=Message.Role.ASSISTANT, text=text,
        citations=[{"n": n, "chunk_id": chunk.pk, "source_id": chunk.source_id, "source_title": chunk.source.title,
                    "start": chunk.start, "end": chunk.end}],
    )


def auth(conversation: Conversation) -> dict:
    return {"HTTP_X_CONVERSATION_TOKEN": conversation.token}


# --- POST /api/conversations/ ----------------------------------------------------------------------


def test_the_widget_learns_the_longest_question_from_the_setting(client, settings):
    # given a deployment that raised the limit
    settings.WIDGET_MESSAGE_MAX_CHARS = 3000
    # when the widget starts a conversation and later reloads its transcript
    created = client.post("/api/conversations/").json()
    transcript = client.get(f"/api/conversations/{created['id']}/messages/", HTTP_X_CONVERSATION_TOKEN=created["token"])
    # then both tell it the raised limit
    assert (created["message_max_chars"], transcript.json()["message_max_chars"]) == (3000, 3000)


def test_the_widget_learns_the_longest_feedback_comment_from_the_setting(client, settings):
    # given a deployment that raised the comment limit
    settings.FEEDBACK_COMMENT_MAX_CHARS = 5000
    # when the widget starts a conversation and later reloads its transcript
    created = client.post("/api/conversations/").json()
    transcript = client.get(f"/api/conversations/{created['id']}/messages/", HTTP_X_CONVERSATION_TOKEN=created["token"])
    # then both tell it the raised limit, and the question limit is unchanged
    assert (created["feedback_comment_max_chars"], transcript.json()["feedback_comment_max_chars"]) == (5000, 5000)
    assert (created["message_max_chars"], transcript.json()["message_max_chars"]) == (2000, 2000)



def test_create_returns_id_and_token_of_a_new_bot_conversation(client):
    # when the widget starts a conversation from the site itself (no Origin header)
    response = client.post("/api/conversations/")

    # then it gets the new conversation's id and secret token, as an anonymous (unverified) visitor
    assert response.status_code == 201
    body = response.json()
    assert sorted(body) == ["feedback_comment_max_chars", "id", "message_max_chars", "token", "verified"]
    conversation = Conversation.objects.get()
    assert body == {"id": str(conversation.pk), "token": conversation.token, "verified": False,
                    "message_max_chars": 2000, "feedback_comment_max_chars": 2000}
    assert (conversation.status, conversation.collection, conversation.origin) == ("bot", "default", "")
    assert conversation.verified_user_id == ""
    assert len(conversation.token) == 43


def test_create_answers_from_the_collection_mapped_to_the_origin_and_records_it(client, settings):
    # given a shop allowed to embed the widget, whose conversations answer from "tidewater"
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP]
    WidgetSite.objects.create(origin=SHOP, collection="tidewater")

    # when the widget on the shop starts a conversation naming that collection
    response = client.post("/api/conversations/", data=json.dumps({"collection": "tidewater"}),
                           content_type="application/json", HTTP_ORIGIN=SHOP)

    # then the response carries the CORS header for the shop, and the conversation its origin
    assert response.status_code == 201
    assert response["Access-Control-Allow-Origin"] == SHOP
    assert "Origin" in response["Vary"]
    conversation = Conversation.objects.get()
    assert (conversation.collection, conversation.origin) == ("tidewater", SHOP)


def test_create_from_an_origin_not_allowed_is_refused_and_creates_nothing(client, settings):
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP]

    response = client.post("/api/conversations/", HTTP_ORIGIN="https://evil.example.net")

    assert response.status_code == 403
    assert response.json() == {"error": "this site is not allowed to use the chat widget"}
    assert not response.has_header("Access-Control-Allow-Origin")
    assert Conversation.objects.count() == 0


def test_create_with_a_star_allows_any_origin(client, settings):
    settings.WIDGET_ALLOWED_ORIGINS = ["*"]

    response = client.post("/api/conversations/", HTTP_ORIGIN="https://anyone.example.org")

    assert response.status_code == 201
    assert response["Access-Control-Allow-Origin"] == "https://anyone.example.org"


def test_create_from_the_sites_own_host_is_allowed_without_widget_origins(client, settings):
    # given no embedding sites configured: same-origin only
    settings.WIDGET_ALLOWED_ORIGINS = []

    response = client.post("/api/conversations/", HTTP_ORIGIN="http://testserver")

    assert response.status_code == 201


def test_preflight_from_an_allowed_origin_lists_methods_and_the_token_header(client, settings):
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP]

    response = client.options("/api/conversations/", HTTP_ORIGIN=SHOP,
                              HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST")

    assert response.status_code == 204
    assert response["Access-Control-Allow-Origin"] == SHOP
    assert response["Access-Control-Allow-Methods"] == "POST, OPTIONS"
    assert response["Access-Control-Allow-Headers"] == "Content-Type, X-Conversation-Token"
    assert response["Access-Control-Max-Age"] == "600"
    assert Conversation.objects.count() == 0


def test_preflight_from_another_origin_is_refused(client, settings):
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP]

    response = client.options("/api/conversations/", HTTP_ORIGIN="https://evil.example.net")

    assert response.status_code == 403
    assert not response.has_header("Access-Control-Allow-Origin")


@pytest.mark.parametrize(
    ("body", "error"),
    [
        ("{not json", "the body must be JSON"),
        ("[1, 2]", "the body must be a JSON object"),
        (json.dumps({"collection": "../etc"}), "collection must be 1 to 100 letters, digits, '_', '.' or '-'"),
        (json.dumps({"collection": 7}), "collection must be 1 to 100 letters, digits, '_', '.' or '-'"),
        # "$" in a pattern also matches before a final newline: "abc\n" used to be accepted and stored
        (json.dumps({"collection": "abc\n"}), "collection must be 1 to 100 letters, digits, '_', '.' or '-'"),
        (json.dumps({"collection": "abc\u0000"}), "collection must be 1 to 100 letters, digits, '_', '.' or '-'"),
    ],
)
def test_create_with_a_malformed_body_is_a_400_and_creates_nothing(client, body, error):
    response = client.post("/api/conversations/", data=body, content_type="application/json")

    assert response.status_code == 400
    assert response.json() == {"error": error}
    assert Conversation.objects.count() == 0


def test_create_with_get_is_a_json_405(client):
    response = client.get("/api/conversations/")

    assert response.status_code == 405
    assert response.json() == {"error": "method GET is not allowed"}
    assert response["Allow"] == "POST"


# --- GET /api/conversations/<id>/messages/ ----------------------------------------------------------


def test_transcript_lists_customer_visible_messages_oldest_first(client):
    # given a conversation with a question, a cited answer, a handoff note for staff and an agent's reply
    conversation = conversation_start()
    chunk = make_chunk()
    question = Message.objects.create(conversation=conversation, role="user", text="How long do refunds take?")
    answer = cite(conversation, chunk)
    Message.objects.create(conversation=conversation, role="system", kind="handoff", text=HANDOFF_MESSAGE)
    reply = Message.objects.create(conversation=conversation, role="agent", text="Hi, Sam here.")

    # when the widget reloads it with the token in the header
    response = client.get(f"/api/conversations/{conversation.pk}/messages/", **auth(conversation))

    # then it gets exactly the customer-visible transcript (no system note, no retrieval trace)
    assert response.status_code == 200
    assert response.json() == {
        "id": str(conversation.pk),
        "status": "bot",
        "message_max_chars": 2000,
        "feedback_comment_max_chars": 2000,
        "messages": [
            {"id": question.pk, "role": "user", "text": "How long do refunds take?", "abstained": False,
             "citations": [], "created_at": question.created_at.isoformat()},
            {"id": answer.pk, "role": "assistant", "text": "Refunds take five days [1].", "abstained": False,
             "citations": [{"n": 1, "chunk_id": chunk.pk, "source_title": "Returns policy"}],
             "created_at": answer.created_at.isoformat()},
            {"id": reply.pk, "role": "agent", "text": "Hi, Sam here.", "abstained": False, "citations": [],
             "created_at": reply.created_at.isoformat()},
        ],
    }


TOKEN_IN_URL = {"error": "conversation tokens are not accepted in URLs; send the X-Conversation-Token header"}


@pytest.mark.parametrize("with_header", [False, True], ids=["query-only", "query-and-header"])
def test_a_token_in_the_url_is_refused_on_every_conversation_endpoint(client, with_header):
    # given a conversation with a question, an answer citing a chunk
    conversation = conversation_start()
    chunk = make_chunk()
    Message.objects.create(conversation=conversation, role="user", text="How long do refunds take?")
    answer = cite(conversation, chunk)
    base = f"/api/conversations/{conversation.pk}"
    query = f"?token={conversation.token}"
    headers = auth(conversation) if with_header else {}
    body = {"content_type": "application/json"}

    # when a client puts the token in the query string of each endpoint (even beside a good header)
    responses = [
        client.get(f"{base}/messages/{query}", **headers),
        client.get(f"{base}/passages/{chunk.pk}/{query}", **headers),
        client.post(f"{base}/handoff/{query}", **headers),
        client.post(f"{base}/messages/{answer.pk}/feedback/{query}", data=json.dumps({"value": "up"}), **body, **headers),
        client.post(f"{base}/rating/{query}", data=json.dumps({"rating": 5}), **body, **headers),
    ]

    # then every one is refused with 400 and the reason, and nothing changed
    assert [(response.status_code, response.json()) for response in responses] == [(400, TOKEN_IN_URL)] * 5
    conversation.refresh_from_db()
    assert conversation.status == "bot"
    assert list(conversation.messages.values_list("role", flat=True)) == ["user", "assistant"]
    assert not hasattr(answer, "feedback") and not Conversation.objects.filter(rating__isnull=False).exists()


@pytest.mark.parametrize("token", ["", "wrong-token", "other"])
def test_transcript_without_the_conversations_token_is_403(client, token):
    # given two conversations; the caller holds the other one's token (or none, or a made-up one)
    conversation = conversation_start()
    Message.objects.create(conversation=conversation, role="user", text="my order number is 1234")
    other = conversation_start()
    headers = {"HTTP_X_CONVERSATION_TOKEN": other.token if token == "other" else token} if token else {}

    response = client.get(f"/api/conversations/{conversation.pk}/messages/", **headers)

    assert response.status_code == 403
    assert response.json() == {"error": "unknown conversation or wrong token"}


def test_transcript_of_an_unknown_conversation_is_403_like_a_wrong_token(client):
    conversation = conversation_start()

    response = client.get("/api/conversations/00000000-0000-0000-0000-000000000000/messages/", **auth(conversation))

    assert response.status_code == 403
    assert response.json() == {"error": "unknown conversation or wrong token"}


def test_a_malformed_conversation_id_is_a_json_404(client):
    response = client.get("/api/conversations/not-a-uuid/messages/", HTTP_X_CONVERSATION_TOKEN="x")

    assert response.status_code == 404
    assert response.json() == {"error": "not found"}


# --- GET /api/conversations/<id>/passages/<chunk_id>/ ------------------------------------------------


def test_passage_returns_the_cited_chunk_with_surrounding_text_cut_at_words(client, settings):
    # given an answer citing the chunk "Refunds take five business days." and 12 characters of context
    settings.WIDGET_PASSAGE_CONTEXT_CHARS = 12
    conversation = conversation_start()
    chunk = make_chunk()
    cite(conversation, chunk)

    response = client.get(f"/api/conversations/{conversation.pk}/passages/{chunk.pk}/", **auth(conversation))

    # then the passage is the chunk exactly, with at most 12 characters each side, whole words only
    assert response.status_code == 200
    assert response.json() == {
        "status": "current",
        "notice": "",
        "title": "Returns policy",
        "url": "",
        "before": "any item. ",
        "passage": "Refunds take five business days.",
        "after": " Exchanges",
    }


def test_passage_at_the_start_and_end_of_a_source_has_empty_context(client):
    conversation = conversation_start()
    chunk = make_chunk(text="Only sentence.", start=0, end=14)
    cite(conversation, chunk)

    response = client.get(f"/api/conversations/{conversation.pk}/passages/{chunk.pk}/", **auth(conversation))

    assert response.json() == {"status": "current", "notice": "", "title": "Returns policy", "url": "", "before": "",
                               "passage": "Only sentence.", "after": ""}


def test_passage_not_cited_in_this_conversation_is_404(client):
    # given a chunk cited in another customer's conversation only
    conversation, other = conversation_start(), conversation_start()
    chunk = make_chunk()
    cite(other, chunk)
    Message.objects.create(conversation=conversation, role="user", text=f"show me chunk {chunk.pk}")

    response = client.get(f"/api/conversations/{conversation.pk}/passages/{chunk.pk}/", **auth(conversation))

    assert response.status_code == 404
    assert response.json() == {"error": "this passage was not cited in the conversation"}


def test_passage_of_a_deleted_source_is_a_removed_view_not_a_404(client):
    # given a cited chunk whose source was deleted since
    conversation = conversation_start()
    chunk = make_chunk()
    cite(conversation, chunk)
    chunk_id = chunk.pk
    chunk.source.delete()

    response = client.get(f"/api/conversations/{conversation.pk}/passages/{chunk_id}/", **auth(conversation))

    # then the customer is told the page was removed, under the title the citation recorded
    assert response.status_code == 200
    assert response.json() == {"status": "removed", "notice": "This page has been removed since this answer was written.",
                               "title": "Returns policy", "url": "", "before": "", "passage": "", "after": ""}


def test_passage_whose_text_changed_on_reingestion_shows_the_page_as_it_is_now(client, settings):
    # given a cited chunk of a web page whose source was re-ingested with other text (new chunk ids)
    settings.WIDGET_PASSAGE_CONTEXT_CHARS = 20
    conversation = conversation_start()
    chunk = make_chunk()
    cite(conversation, chunk)
    chunk_id, source = chunk.pk, chunk.source
    chunk.delete()
    Source.objects.filter(pk=source.pk).update(
        text="Returns are accepted within 60 days of delivery, unused.", title="Returns (new)")

    response = client.get(f"/api/conversations/{conversation.pk}/passages/{chunk_id}/", **auth(conversation))

    # then the view says the page changed and shows the start of its current text (40 characters at
    # most, cut at a word)
    assert response.status_code == 200
    assert response.json() == {
        "status": "changed",
        "notice": "This page has changed since this answer was written; the passage it cited is no longer on it.",
        "title": "Returns (new)", "url": "", "before": "", "passage": "",
        "after": "Returns are accepted within 60 days of",
    }


def test_passage_with_another_conversations_token_is_403(client):
    conversation, other = conversation_start(), conversation_start()
    chunk = make_chunk()
    cite(conversation, chunk)

    response = client.get(f"/api/conversations/{conversation.pk}/passages/{chunk.pk}/", **auth(other))

    assert response.status_code == 403
    assert response.json() == {"error": "unknown conversation or wrong token"}


# --- POST /api/conversations/<id>/handoff/ ------------------------------------------------------------


def test_handoff_marks_the_conversation_as_needing_a_human(client):
    conversation = conversation_start()

    response = client.post(f"/api/conversations/{conversation.pk}/handoff/", **auth(conversation))

    assert response.status_code == 200
    assert response.json() == {"id": str(conversation.pk), "status": "needs_human"}
    conversation.refresh_from_db()
    assert conversation.status == "needs_human"
    assert list(conversation.messages.values_list("role", "text")) == [("system", HANDOFF_MESSAGE)]


def test_handoff_with_a_wrong_token_changes_nothing(client):
    conversation, other = conversation_start(), conversation_start()

    response = client.post(f"/api/conversations/{conversation.pk}/handoff/", **auth(other))

    assert response.status_code == 403
    assert response.json() == {"error": "unknown conversation or wrong token"}
    assert list(Conversation.objects.values_list("status", flat=True)) == ["bot", "bot"]
    assert Message.objects.count() == 0


def test_handoff_with_get_is_a_405_and_changes_nothing(client):
    conversation = conversation_start()

    response = client.get(f"/api/conversations/{conversation.pk}/handoff/", **auth(conversation))

    assert response.status_code == 405
    conversation.refresh_from_db()
    assert conversation.status == "bot"


# --- the demo page and the widget script ------------------------------------------------------------


def test_demo_page_embeds_the_widget_script_pointing_at_this_server(client):
    response = client.get("/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "Tidewater Trail Co." in html
    assert (
        '<script src="/static/widget/widget.js" data-server="http://testserver" data-title="Tidewater Help" defer>'
        in html
    )


def test_widget_script_is_a_static_file():
    path = finders.find("widget/widget.js")

    assert path is not None
    source = open(path, encoding="utf-8").read()
    assert "attachShadow" in source
    # nothing in it parses strings as HTML: data is rendered with textContent / text nodes only
    assert [api for api in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write") if api in source] == []

"""Identity verification (``chat.identity``): the host site signs its user id with its site's secret
(``user_hash = HMAC-SHA256(secret, user_id)``, hex); a verified customer's conversations are listed
and resumed on another device; an unverified claim is refused with nothing created.

The hashes here are computed with ``hmac`` directly, as a host site would, not with the code under test.
"""

from __future__ import annotations

import hashlib
import hmac
import json

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.test import Client

from chat.identity import HASH_MISSING_MESSAGE, HASH_REFUSED_MESSAGE, NO_SECRET_MESSAGE, REQUIRED_MESSAGE
from chat.models import Conversation, Message, WidgetSite

pytestmark = pytest.mark.django_db

SHOP = "https://shop.example.com"
OTHER = "https://other.example.org"
UNMAPPED = "https://unmapped.example.net"  # allowed to embed the widget, but no WidgetSite row


def signed(site: WidgetSite, user_id: str) -> str:
    return hmac.new(site.identity_secret.encode(), user_id.encode(), hashlib.sha256).hexdigest()


@pytest.fixture
def sites(settings):
    """Two mapped sites (each with its own generated secret) and one allowed but unmapped origin."""
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP, OTHER, UNMAPPED]
    return (WidgetSite.objects.create(origin=SHOP, collection="tidewater"),
            WidgetSite.objects.create(origin=OTHER, collection="default"))


def post(client, path: str, origin: str | None, body: dict | None = None, **headers):
    if origin:
        headers["HTTP_ORIGIN"] = origin
    if body is None:
        return client.post(path, **headers)
    return client.post(path, data=json.dumps(body), content_type="application/json", **headers)


def start(client, origin, body=None):
    return post(client, "/api/conversations/", origin, body)


def listed(client, origin, body):
    return post(client, "/api/conversations/verified/", origin, body)


def with_question(conversation_id: str, text: str) -> Conversation:
    """The conversation after its customer asked ``text`` (listed only once it has a question)."""
    conversation = Conversation.objects.get(pk=conversation_id)
    Message.objects.create(conversation=conversation, role=Message.Role.USER, text=text)
    return conversation


def test_the_sites_get_distinct_64_hex_secrets(sites):
    shop, other = sites
    assert len(shop.identity_secret) == 64 and int(shop.identity_secret, 16) >= 0
    assert shop.identity_secret != other.identity_secret


def test_a_verified_customer_lists_and_resumes_their_conversation_on_a_second_device(sites):
    shop, _ = sites
    laptop, phone = Client(), Client()
    identity = {"user_id": "cust-42", "user_hash": signed(shop, "cust-42")}

    # given customer 42 started a conversation on the shop from their laptop and asked a question
    started = start(laptop, SHOP, identity)
    assert started.status_code == 201
    assert started.json()["verified"] is True
    conversation = with_question(started.json()["id"], "Where is my order?")
    assert conversation.verified_user_id == "cust-42"
    assert conversation.origin == SHOP

    # when they open the widget on their phone (no token there) with the same signed identity
    response = listed(phone, SHOP, identity)

    # then the conversation is listed, without its token
    assert response.status_code == 200
    assert response["Access-Control-Allow-Origin"] == SHOP
    [item] = response.json()["conversations"]
    assert item == {"id": str(conversation.pk), "status": "bot", "messages": 1, "preview": "Where is my order?",
                    "created_at": item["created_at"], "updated_at": item["updated_at"]}
    assert conversation.token not in response.content.decode()

    # and resuming it gives the phone the conversation's token, which opens its transcript as usual
    resumed = post(phone, f"/api/conversations/{conversation.pk}/resume/", SHOP, identity)
    assert resumed.status_code == 200
    assert resumed.json() == {"id": str(conversation.pk), "token": conversation.token, "status": "bot",
                              "message_max_chars": 2000, "feedback_comment_max_chars": 2000}
    transcript = phone.get(f"/api/conversations/{conversation.pk}/messages/", HTTP_ORIGIN=SHOP,
                           HTTP_X_CONVERSATION_TOKEN=resumed.json()["token"])
    assert transcript.status_code == 200
    assert [m["text"] for m in transcript.json()["messages"]] == ["Where is my order?"]


def test_an_upper_case_hex_hash_is_the_same_hash(sites):
    shop, _ = sites
    response = start(Client(), SHOP, {"user_id": "7", "user_hash": signed(shop, "7").upper()})
    assert response.status_code == 201
    assert Conversation.objects.get().verified_user_id == "7"


@pytest.mark.parametrize(("user_hash", "error"), [
    ("0" * 64, HASH_REFUSED_MESSAGE),
    ("not hex at all", HASH_REFUSED_MESSAGE + " (expected 64 hex digits)"),
    ("é" * 64, HASH_REFUSED_MESSAGE + " (expected 64 hex digits)"),  # compare_digest would raise on non-ASCII
    (12345, HASH_REFUSED_MESSAGE + " (expected 64 hex digits)"),
])
def test_a_wrong_hash_is_refused_and_creates_nothing(sites, user_hash, error):
    response = start(Client(), SHOP, {"user_id": "cust-42", "user_hash": user_hash})

    assert response.status_code == 403
    assert response.json() == {"error": error}
    assert response["Access-Control-Allow-Origin"] == SHOP  # so the widget can read the reason
    assert Conversation.objects.count() == 0


def test_the_hash_of_another_user_id_is_refused(sites):
    shop, _ = sites
    response = start(Client(), SHOP, {"user_id": "cust-42", "user_hash": signed(shop, "cust-7")})
    assert response.status_code == 403
    assert response.json() == {"error": HASH_REFUSED_MESSAGE}
    assert Conversation.objects.count() == 0


def test_a_hash_made_with_another_sites_secret_is_refused(sites):
    shop, other = sites
    forged = {"user_id": "cust-42", "user_hash": signed(other, "cust-42")}
    # given customer 42 of the shop has a conversation there
    own = start(Client(), SHOP, {"user_id": "cust-42", "user_hash": signed(shop, "cust-42")})
    with_question(own.json()["id"], "Return policy?")

    # when someone who knows the other site's secret signs "cust-42" and talks to the shop's API
    refused_start = start(Client(), SHOP, forged)
    refused_list = listed(Client(), SHOP, forged)
    refused_resume = post(Client(), f"/api/conversations/{own.json()['id']}/resume/", SHOP, forged)

    # then every request is refused and nothing is created
    assert [r.status_code for r in (refused_start, refused_list, refused_resume)] == [403, 403, 403]
    assert refused_list.json() == {"error": HASH_REFUSED_MESSAGE}
    assert Conversation.objects.count() == 1


def test_another_customers_or_sites_conversations_are_never_listed_or_resumed(sites):
    shop, other = sites
    me = {"user_id": "42", "user_hash": signed(shop, "42")}
    # given conversations of customer 42 on the shop, of customer 7 on the shop, of customer 42 of
    # the other site (same id, another company's user), and an anonymous one on the shop
    mine = start(Client(), SHOP, me).json()["id"]
    theirs = start(Client(), SHOP, {"user_id": "7", "user_hash": signed(shop, "7")}).json()["id"]
    other_site = start(Client(), OTHER, {"user_id": "42", "user_hash": signed(other, "42")}).json()["id"]
    anonymous = start(Client(), SHOP).json()["id"]
    for conversation_id in (mine, theirs, other_site, anonymous):
        with_question(conversation_id, f"question in {conversation_id}")

    # when customer 42 of the shop lists their conversations
    response = listed(Client(), SHOP, me)

    # then only their own is listed, and none of the others can be resumed with their identity
    assert [item["id"] for item in response.json()["conversations"]] == [mine]
    for conversation_id in (theirs, other_site, anonymous, "00000000-0000-0000-0000-000000000000"):
        refused = post(Client(), f"/api/conversations/{conversation_id}/resume/", SHOP, me)
        assert refused.status_code == 403
        assert refused.json() == {"error": "unknown conversation, or not this customer's"}


def test_a_conversation_without_a_question_is_not_listed(sites):
    shop, _ = sites
    me = {"user_id": "42", "user_hash": signed(shop, "42")}
    assert start(Client(), SHOP, me).status_code == 201

    assert listed(Client(), SHOP, me).json() == {"conversations": []}


def test_anonymous_conversations_still_start_on_a_site_that_does_not_enforce(sites):
    response = start(Client(), SHOP)

    assert response.status_code == 201
    assert response.json()["verified"] is False
    assert Conversation.objects.get().verified_user_id == ""


@pytest.mark.parametrize("user_hash", [None, ""])
def test_a_user_id_claimed_without_a_hash_is_refused_even_when_not_enforced(sites, user_hash):
    body = {"user_id": "cust-42"} if user_hash is None else {"user_id": "cust-42", "user_hash": user_hash}

    response = start(Client(), SHOP, body)

    assert response.status_code == 403
    assert response.json() == {"error": HASH_MISSING_MESSAGE}
    assert Conversation.objects.count() == 0


def test_an_enforcing_site_refuses_anonymous_and_unverified_conversations_and_accepts_verified(sites):
    shop, _ = sites
    shop.identity_required = True
    shop.save()

    anonymous = start(Client(), SHOP)
    unverified = start(Client(), SHOP, {"user_id": "cust-42"})
    verified = start(Client(), SHOP, {"user_id": "cust-42", "user_hash": signed(shop, "cust-42")})

    assert (anonymous.status_code, anonymous.json()) == (403, {"error": REQUIRED_MESSAGE})
    assert (unverified.status_code, unverified.json()) == (403, {"error": HASH_MISSING_MESSAGE})
    assert verified.status_code == 201
    assert list(Conversation.objects.values_list("verified_user_id", flat=True)) == ["cust-42"]


def test_an_origin_without_a_site_row_cannot_verify_anyone(sites):
    shop, _ = sites
    response = start(Client(), UNMAPPED, {"user_id": "cust-42", "user_hash": signed(shop, "cust-42")})
    no_origin = start(Client(), None, {"user_id": "cust-42", "user_hash": signed(shop, "cust-42")})

    assert (response.status_code, response.json()) == (403, {"error": NO_SECRET_MESSAGE})
    assert no_origin.status_code == 403
    assert Conversation.objects.count() == 0


@pytest.mark.parametrize(("body", "error"), [
    ({"user_id": 42, "user_hash": "0" * 64}, "user_id must be a string of 1 to 255 characters"),
    ({"user_id": "", "user_hash": "0" * 64}, "user_id must be a string of 1 to 255 characters"),
    ({"user_id": "x" * 256, "user_hash": "0" * 64}, "user_id must be a string of 1 to 255 characters"),
    ({"user_id": "a\x00b", "user_hash": "0" * 64},
     "user_id contains characters that cannot be stored (NUL or an unpaired surrogate)"),
    ({"user_hash": "0" * 64}, "user_hash was sent without user_id"),
])
def test_a_malformed_identity_is_a_400_and_creates_nothing(sites, body, error):
    response = start(Client(), SHOP, body)

    assert (response.status_code, response.json()) == (400, {"error": error})
    assert Conversation.objects.count() == 0


def test_listing_needs_a_signed_identity_and_never_takes_the_hash_in_the_url(sites):
    shop, _ = sites
    no_claim = listed(Client(), SHOP, None)
    not_json = post(Client(), "/api/conversations/verified/", SHOP, None, data="{", content_type="application/json")
    in_url = post(Client(), f"/api/conversations/verified/?user_hash={signed(shop, '42')}", SHOP,
                  {"user_id": "42", "user_hash": signed(shop, "42")})
    wrong_method = Client().get("/api/conversations/verified/", HTTP_ORIGIN=SHOP)

    assert (no_claim.status_code, no_claim.json()) == (
        403, {"error": "send user_id and user_hash to list a signed-in customer's conversations"})
    assert (not_json.status_code, not_json.json()) == (400, {"error": "the body must be JSON"})
    assert (in_url.status_code, in_url.json()) == (
        400, {"error": "user_hash is not accepted in URLs; send it in the JSON body"})
    assert wrong_method.status_code == 405


def test_the_identity_endpoints_answer_cors_preflight(sites):
    preflight = Client().options("/api/conversations/verified/", HTTP_ORIGIN=SHOP,
                                 HTTP_ACCESS_CONTROL_REQUEST_METHOD="POST")

    assert preflight.status_code == 204
    assert preflight["Access-Control-Allow-Origin"] == SHOP
    assert "Content-Type" in preflight["Access-Control-Allow-Headers"]


def test_rotating_the_secret_refuses_old_hashes_and_keeps_the_customers_conversations(sites, client):
    shop, _ = sites
    old = {"user_id": "42", "user_hash": signed(shop, "42")}
    old_secret = shop.identity_secret
    with_question(start(Client(), SHOP, old).json()["id"], "Sizes?")
    admin = User.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)

    # when an admin rotates the shop's secret
    response = client.post("/admin/chat/widgetsite/", {"action": "rotate_identity_secret",
                                                       "_selected_action": [shop.pk]})
    assert response.status_code == 302
    shop.refresh_from_db()

    # then the old hash is refused, and a hash made with the new secret lists the same conversation
    assert listed(Client(), SHOP, old).status_code == 403
    renewed = listed(Client(), SHOP, {"user_id": "42", "user_hash": signed(shop, "42")})
    assert [item["preview"] for item in renewed.json()["conversations"]] == ["Sizes?"]
    assert shop.identity_secret != old_secret and len(shop.identity_secret) == 64


def test_the_admin_shows_the_secret_and_the_enforce_switch(sites, client):
    shop, _ = sites
    client.force_login(User.objects.create_superuser("root", "root@example.com", "pw"))

    page = client.get(f"/admin/chat/widgetsite/{shop.pk}/change/").content.decode()
    saved = client.post(f"/admin/chat/widgetsite/{shop.pk}/change/",
                        {"origin": SHOP, "collection": "tidewater", "identity_required": "on"})

    assert shop.identity_secret in page
    assert "require identity verification" in page.lower()
    assert saved.status_code == 302
    refreshed = WidgetSite.objects.get(pk=shop.pk)
    assert refreshed.identity_required is True
    assert refreshed.identity_secret == shop.identity_secret  # saving the form does not change it


def test_the_database_refuses_a_verified_user_without_origin_and_a_malformed_secret(sites):
    with pytest.raises(IntegrityError), transaction.atomic():
        Conversation.objects.create(verified_user_id="42", origin="")
    with pytest.raises(IntegrityError), transaction.atomic():
        WidgetSite.objects.create(origin="https://third.example.com", collection="x", identity_secret="short")
    assert Conversation.objects.count() == 0
    assert WidgetSite.objects.count() == 2

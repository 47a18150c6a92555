"""The collection of a new conversation comes from the widget's origin (``chat.origins``,
``WidgetSite`` rows managed in the admin), never from the client alone: ``data-collection`` is only
checked against it, and a spoofed one is refused with nothing created.
"""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction

from chat.models import Conversation, WidgetSite
from chat.origins import origin_normalize

pytestmark = pytest.mark.django_db

SHOP = "https://shop.example.com"
OTHER = "https://other.example.org"


@pytest.fixture
def shop(settings):
    """Two sites allowed to embed the widget; the shop answers from "tidewater", the other has no row."""
    settings.WIDGET_ALLOWED_ORIGINS = [SHOP, OTHER]
    return WidgetSite.objects.create(origin=SHOP, collection="tidewater")


def start(client, origin: str | None, body: dict | None = None):
    headers = {"HTTP_ORIGIN": origin} if origin else {}
    if body is None:
        return client.post("/api/conversations/", **headers)
    return client.post("/api/conversations/", data=json.dumps(body), content_type="application/json", **headers)


def test_a_widget_naming_no_collection_gets_its_origins(client, shop):
    response = start(client, SHOP)

    assert response.status_code == 201
    assert Conversation.objects.get().collection == "tidewater"


def test_a_spoofed_collection_is_refused_and_creates_nothing(client, shop):
    # given the shop's page edited (or a script on it) to name another company's collection
    response = start(client, SHOP, {"collection": "internal-hr"})

    # then the conversation is refused with the reason, and none is created
    assert response.status_code == 403
    assert response.json() == {"error": "the collection 'internal-hr' is not served to the site https://shop.example.com"}
    assert response["Access-Control-Allow-Origin"] == SHOP  # so the widget can read the reason
    assert Conversation.objects.count() == 0


def test_a_site_without_a_row_gets_the_default_collection_and_cannot_name_another(client, shop):
    assert start(client, OTHER).status_code == 201
    assert Conversation.objects.get().collection == "default"

    refused = start(client, OTHER, {"collection": "tidewater"})

    assert refused.status_code == 403
    assert refused.json() == {"error": "the collection 'tidewater' is not served to a site without its own collection "
                                       "(admin: Widget sites)"}
    assert Conversation.objects.count() == 1


def test_a_request_without_origin_cannot_name_a_collection_either(client, shop):
    assert start(client, None, {"collection": "tidewater"}).status_code == 403
    assert start(client, None, {"collection": "default"}).status_code == 201
    assert list(Conversation.objects.values_list("collection", flat=True)) == ["default"]


@pytest.mark.parametrize(("typed", "stored"), [
    ("HTTPS://Shop.Example.com:443/", "https://shop.example.com"),
    ("http://localhost:8000", "http://localhost:8000"),
    ("http://[::1]:80", "http://[::1]"),
])
def test_origins_are_normalised_as_browsers_send_them(typed, stored):
    assert origin_normalize(typed) == stored


@pytest.mark.parametrize("typed", ["shop.example.com", "ftp://shop.example.com", "https://shop.example.com/help",
                                   "https://user:pw@shop.example.com", "https://", "https://shop.example.com:99999"])
def test_malformed_origins_are_refused(typed):
    with pytest.raises(ValueError):
        origin_normalize(typed)


def test_the_database_refuses_a_malformed_row():
    with pytest.raises(IntegrityError), transaction.atomic():
        WidgetSite.objects.create(origin="https://shop.example.com/path", collection="tidewater")
    with pytest.raises(IntegrityError), transaction.atomic():
        WidgetSite.objects.create(origin=SHOP, collection="tide water\n")
    assert WidgetSite.objects.count() == 0


def test_an_admin_maps_a_site_to_a_collection(client):
    # given a staff user in the admin
    admin = User.objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(admin)

    # when they add a site typed loosely, and then one with a malformed origin
    added = client.post("/admin/chat/widgetsite/add/", {"origin": " HTTPS://Shop.Example.com/ ", "collection": "tidewater"})
    refused = client.post("/admin/chat/widgetsite/add/", {"origin": "https://shop.example.com/help", "collection": "x"})

    # then the first is stored as browsers send the origin, the second is a form error
    assert added.status_code == 302
    assert list(WidgetSite.objects.values_list("origin", "collection")) == [(SHOP, "tidewater")]
    assert refused.status_code == 200
    assert "an origin has no path, query or credentials" in refused.content.decode()

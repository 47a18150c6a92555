"""Knowledge-base admin through Django's test client: the source list with ingestion status, the
multi-file upload page, re-ingestion, and products. Tasks are queued with ``transaction.on_commit``;
these tests capture the callbacks instead of running them (the worker is tested in test_tasks)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile
from django.urls import reverse

from knowledge import services
from knowledge.models import Chunk, Product, Source
from tests.knowledge.sample_files import FAQ_CSV, RETURNS_MD, WARRANTY_HTML

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:knowledge_source_changelist"
UPLOAD = "admin:knowledge_source_upload"


def ingested_upload(filename: str, data: bytes) -> Source:
    source = services.source_upload(filename=filename, data=data)
    services.document_ingest(source.pk)
    return Source.objects.get(pk=source.pk)


def test_superuser_sees_sources_with_status_progress_chunks_and_failure_reason(admin_client):
    # given a ready source and a failed one
    ready = ingested_upload("returns.md", RETURNS_MD.encode())
    Source.objects.create(uri="upload:app.html", title="app", status="failed",
                          error="the page has no visible text once its scripts are removed")
    # when the superuser opens the source list
    response = admin_client.get(reverse(CHANGELIST))
    # then it lists both with status, chunk count and reason, and links to the upload page
    assert response.status_code == 200
    page = response.content.decode()
    assert f'href="{reverse(UPLOAD)}"' in page
    assert "Upload files" in page
    assert '<b style="color:#2e7d32">Ready</b>' in page
    assert '<b style="color:#c62828">Failed</b>' in page
    assert "the page has no visible text once its scripts are removed" in page
    assert [row.chunk_count for row in response.context["cl"].result_list] == [0, 3]
    assert [str(row) for row in response.context["cl"].result_list] == ["app", "Returns policy"]
    assert ready.status == "ready"
    # and, with nothing queued, the list does not auto-refresh
    assert response.context["ingestion_busy"] is False
    assert 'http-equiv="refresh"' not in page


def test_source_list_refreshes_itself_while_ingestion_is_busy(admin_client):
    Source.objects.create(uri="upload:returns.md", status="embedding", progress=40)
    response = admin_client.get(reverse(CHANGELIST))
    assert response.context["ingestion_busy"] is True
    assert '<meta http-equiv="refresh" content="3">' in response.content.decode()


def test_source_page_shows_its_chunks_with_headings_and_offsets(admin_client):
    # given an ingested Markdown upload
    source = ingested_upload("returns.md", RETURNS_MD.encode())
    # when its page is opened
    response = admin_client.get(reverse("admin:knowledge_source_change", args=[source.pk]))
    # then each chunk is listed with its heading path and text
    assert response.status_code == 200
    page = response.content.decode()
    assert "Returns policy › Refunds" in page
    assert "Exchanges for another size are free." in page


def test_superuser_opens_the_upload_page(admin_client):
    response = admin_client.get(reverse(UPLOAD))
    assert response.status_code == 200
    page = response.content.decode()
    assert 'enctype="multipart/form-data"' in page
    assert '<input type="file" name="files"' in page and "multiple" in page
    assert 'name="collection" value="default"' in page
    assert "Upload and ingest" in page


def test_multi_file_upload_creates_queued_sources_and_queues_one_task_each(
    admin_client, media_root, django_capture_on_commit_callbacks
):
    # given three files chosen in the upload form
    files = [
        SimpleUploadedFile("returns.md", RETURNS_MD.encode(), content_type="text/markdown"),
        SimpleUploadedFile("warranty.html", WARRANTY_HTML.encode(), content_type="text/html"),
        SimpleUploadedFile("store_faq.csv", FAQ_CSV.encode(), content_type="text/csv"),
    ]
    # when they are posted together
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse(UPLOAD), {"files": files, "collection": "help"})
    # then the browser goes back to the list, and each file is a queued source with its bytes pending
    assert response.status_code == 302 and response.url == reverse(CHANGELIST)
    sources = list(Source.objects.order_by("uri"))
    assert [(s.collection, s.uri, s.kind, s.title, s.status, s.progress, s.chunk_count) for s in sources] == [
        ("help", "upload:returns.md", "file", "returns", "queued", 0, 0),
        ("help", "upload:store_faq.csv", "faq", "store_faq", "queued", 0, 0),
        ("help", "upload:warranty.html", "file", "warranty", "queued", 0, 0),
    ]
    assert [(media_root / s.pending_file.name).read_bytes() for s in sources] == [
        RETURNS_MD.encode(), FAQ_CSV.encode(), WARRANTY_HTML.encode()]
    # and one ingestion task per file is queued for when the request's transaction commits
    assert len(callbacks) == 3
    assert Chunk.objects.count() == 0
    # and the list says so
    listing = admin_client.get(response.url)
    assert "3 file(s) queued for ingestion." in listing.content.decode()


def test_upload_without_files_shows_the_form_error_and_creates_nothing(admin_client):
    response = admin_client.post(reverse(UPLOAD), {"collection": "default"})
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    assert Source.objects.count() == 0


def test_staff_without_permission_is_sent_away_from_upload_and_anonymous_to_login(client):
    # given a staff user without knowledge-base permissions
    staff = User.objects.create_user("agent", password="pw-agent-123", is_staff=True)
    client.force_login(staff)
    # when it posts an upload, then it is redirected to the admin index and nothing is created
    response = client.post(reverse(UPLOAD), {"files": [SimpleUploadedFile("a.md", b"# A\n\ntext\n")]})
    assert (response.status_code, response.url) == (302, reverse("admin:index"))
    assert Source.objects.count() == 0
    # and with the change permission it may open the page
    staff.user_permissions.add(Permission.objects.get(codename="change_source"))
    assert client.get(reverse(UPLOAD)).status_code == 200
    # and an anonymous visitor is sent to the login page
    client.logout()
    response = client.get(reverse(UPLOAD))
    assert response.status_code == 302 and response.url.startswith(reverse("admin:login"))


def test_reingest_action_queues_selected_sources_with_force(admin_client, django_capture_on_commit_callbacks):
    # given an ingested source
    source = ingested_upload("returns.md", RETURNS_MD.encode())
    # when the "Re-ingest selected sources" action is applied to it
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse(CHANGELIST), {"action": "reingest", "_selected_action": [source.pk]})
    # then it is queued again (its chunks still serving) and one task is queued on commit
    assert response.status_code == 302
    source.refresh_from_db()
    assert (source.status, source.progress, source.chunk_count) == ("queued", 0, 3)
    assert Chunk.objects.filter(source=source).count() == 3
    assert len(callbacks) == 1


def test_deleting_a_source_in_the_admin_removes_its_chunks(admin_client):
    source = ingested_upload("returns.md", RETURNS_MD.encode())
    response = admin_client.post(reverse("admin:knowledge_source_delete", args=[source.pk]), {"post": "yes"})
    assert response.status_code == 302
    assert (Source.objects.count(), Chunk.objects.count()) == (0, 0)


def test_saving_a_product_in_the_admin_queues_its_source(admin_client, django_capture_on_commit_callbacks):
    # when a product is added in the admin
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse("admin:knowledge_product_add"), {
            "collection": "default", "sku": "TR-100", "name": "Trailblazer running shoe", "price": "129.00",
            "currency": "USD", "description": "A waterproof trail running shoe.", "attributes": '{"colour": "green"}',
        })
    # then it is saved and its source "product:TR-100" is queued for ingestion
    assert response.status_code == 302
    product = Product.objects.get()
    assert (product.sku, product.price, product.attributes) == ("TR-100", Decimal("129.00"), {"colour": "green"})
    assert (product.source.uri, product.source.kind, product.source.status) == ("product:TR-100", "product", "queued")
    assert len(callbacks) == 1

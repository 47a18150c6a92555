"""Knowledge-base admin through Django's test client: the source list with ingestion status, the
multi-file upload page, re-ingestion, and products. Tasks are queued with ``transaction.on_commit``;
these tests capture the callbacks instead of running them (the worker is tested in test_tasks)."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.core.files.uploadedfile import SimpleUploadedFile, TemporaryUploadedFile
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from django.test import Client
from django.urls import reverse
from django.utils.datastructures import MultiValueDict

from knowledge import services
from knowledge.admin import UploadForm
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


def test_multi_file_upload_creates_queued_sources_and_queues_them_in_one_batch_task(
    admin_client, media_root, django_capture_on_commit_callbacks, monkeypatch
):
    from knowledge import tasks

    sent = []
    # (sent through config.task_queue, which calls apply_async)
    monkeypatch.setattr(tasks.ingest_sources, "apply_async",
                        lambda args, kwargs: sent.append(("batch", args[0], kwargs.get("force", False))))
    monkeypatch.setattr(tasks.ingest_source, "apply_async",
                        lambda args, kwargs: sent.append(("one", args[0], kwargs.get("force", False))))
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
    # and, when the upload's transaction commits, one knowledge.ingest_sources task is queued for the
    # three (their chunks are embedded together), not one task per file
    assert sent == []
    for callback in callbacks:
        callback()
    assert sent == [("batch", [s.pk for s in sorted(sources, key=lambda s: s.pk)], False)]
    assert Chunk.objects.count() == 0
    # and the list says so
    listing = admin_client.get(response.url)
    assert "3 file(s) queued for ingestion." in listing.content.decode()


def test_upload_without_files_shows_the_form_error_and_creates_nothing(admin_client):
    response = admin_client.post(reverse(UPLOAD), {"collection": "default"})
    assert response.status_code == 200
    assert "This field is required." in response.content.decode()
    assert Source.objects.count() == 0


# --- the size limit -------------------------------------------------------------------------------------

LIMIT = 1024 * 1024  # INGEST_MAX_FILE_BYTES in these tests: 1 MB
CHUNK = 64 * 1024  # Django's upload chunk size
HUGE_TXT = b"Big file\n\n" + b"All work and no play. " * 250_000  # 5.5 MB
REFUSED = ["huge.txt: the file is larger than the 1 MB limit (INGEST_MAX_FILE_BYTES).",
           "Nothing was uploaded; choose the files again without the ones over the limit."]


@pytest.fixture
def upload_limits(settings, tmp_path):
    """A 1 MB limit; every uploaded file goes to a temporary file in a folder of this test."""
    settings.INGEST_MAX_FILE_BYTES = LIMIT
    settings.FILE_UPLOAD_MAX_MEMORY_SIZE = 1000
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "upload-tmp")
    (tmp_path / "upload-tmp").mkdir()
    return tmp_path / "upload-tmp"


def files_in(folder) -> list:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def test_upload_over_the_size_limit_is_refused_while_received_and_nothing_is_stored(
    admin_client, media_root, upload_limits, monkeypatch, django_capture_on_commit_callbacks
):
    # given a good file and one over the limit, chosen together (bytes written to temporary files
    # are counted per file)
    written: dict[str, int] = {}
    receive = TemporaryFileUploadHandler.receive_data_chunk

    def counting(self, raw_data, start):
        written[self.file_name] = written.get(self.file_name, 0) + len(raw_data)
        return receive(self, raw_data, start)

    monkeypatch.setattr(TemporaryFileUploadHandler, "receive_data_chunk", counting)
    files = [SimpleUploadedFile("returns.md", RETURNS_MD.encode()), SimpleUploadedFile("huge.txt", HUGE_TXT)]
    # when they are posted
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse(UPLOAD), {"files": files, "collection": "default"})
    # then the page shows why, and nothing is stored or queued: no source, no file, no task
    assert response.status_code == 200
    assert response.context["form"].errors["files"] == REFUSED
    assert REFUSED[0] in response.content.decode()
    assert (Source.objects.count(), files_in(media_root), callbacks) == (0, [], [])
    # and the big file was dropped at the chunk that passed the limit (no byte beyond it was kept),
    # its temporary file deleted like the good file's
    assert written["returns.md"] == len(RETURNS_MD.encode())
    assert LIMIT - CHUNK < written["huge.txt"] <= LIMIT
    assert files_in(upload_limits) == []


def test_upload_within_the_limit_is_streamed_from_its_temporary_file_to_storage(
    admin_client, media_root, upload_limits, monkeypatch, django_capture_on_commit_callbacks
):
    # given a file under the limit but over FILE_UPLOAD_MAX_MEMORY_SIZE
    body = b"Shipping times\n\n" + b"Parcels ship daily. " * 40_000  # 800 kB
    received = []
    real_upload = services.sources_upload

    def spy(files, *, collection):
        received.extend(type(data) for _, data in files)
        return real_upload(files, collection=collection)

    monkeypatch.setattr(services, "sources_upload", spy)
    # when it is uploaded
    with django_capture_on_commit_callbacks() as callbacks:
        response = admin_client.post(reverse(UPLOAD), {"files": [SimpleUploadedFile("shipping.txt", body)],
                                                       "collection": "default"})
    # then the service got the temporary file, not its bytes, and stored it whole; one task is queued
    assert (response.status_code, response.url) == (302, reverse(CHANGELIST))
    assert received == [TemporaryUploadedFile]
    source = Source.objects.get()
    assert (source.uri, source.status) == ("upload:shipping.txt", "queued")
    assert files_in(media_root) == [media_root / source.pending_file.name]
    assert (media_root / source.pending_file.name).read_bytes() == body
    assert len(callbacks) == 1
    assert files_in(upload_limits) == []


def test_upload_page_checks_csrf_with_the_size_limit_in_place(admin_user, media_root, upload_limits):
    # given a browser-like client that sends the CSRF token only when told
    client = Client(enforce_csrf_checks=True)
    client.force_login(admin_user)
    assert client.get(reverse(UPLOAD)).status_code == 200
    token = client.cookies["csrftoken"].value

    def post(name, data, **extra):
        return client.post(reverse(UPLOAD), {"files": [SimpleUploadedFile(name, data)], "collection": "default",
                                             **extra})

    # when a file is posted without the token, then it is forbidden and nothing is stored
    assert post("returns.md", RETURNS_MD.encode()).status_code == 403
    assert (Source.objects.count(), files_in(media_root)) == (0, [])
    # when a file over the limit is posted with it, then the page explains (no 403, no 500)
    response = post("huge.txt", HUGE_TXT, csrfmiddlewaretoken=token)
    assert response.status_code == 200 and response.context["form"].errors["files"] == REFUSED
    assert (Source.objects.count(), files_in(media_root)) == (0, [])
    # and a good file with it is queued
    response = post("returns.md", RETURNS_MD.encode(), csrfmiddlewaretoken=token)
    assert (response.status_code, list(Source.objects.values_list("uri", "status"))) == (
        302, [("upload:returns.md", "queued")])


def test_upload_form_refuses_a_file_over_the_limit_by_itself(settings):
    # given the form without the upload handler in front of it (a file it receives whole)
    settings.INGEST_MAX_FILE_BYTES = LIMIT
    form = UploadForm({"collection": "default"}, MultiValueDict({"files": [
        SimpleUploadedFile("returns.md", RETURNS_MD.encode()), SimpleUploadedFile("huge.txt", HUGE_TXT)]}))
    # then it is invalid, naming the file
    assert not form.is_valid()
    assert form.errors["files"] == REFUSED


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

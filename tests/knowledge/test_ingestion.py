"""Ingestion services against the real Postgres + pgvector and the real embedding model: every file
type, the hash skip, the atomic replace, deletion, products, re-embedding, and every kind of bad
input (the source is marked failed with its reason; the rest of a batch goes on; what was serving is
untouched), and batch ingestion (``documents_ingest``: several files per embedding call, each stored
and failed on its own)."""

from __future__ import annotations

import hashlib
import io
import threading
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.core.files.storage import storages
from django.core.management import call_command
from django.db import connection, transaction

from knowledge import services
from knowledge.services import ingestion, sources
from knowledge.chunking import chunk_document
from knowledge.embedding import get_embedding_model, model_id, passage_text
from knowledge.models import Chunk, Product, Source
from knowledge.parsers import parse_file
from knowledge.selectors import chunk_search
from tests.knowledge import object_storage
from tests.knowledge.conftest import ingest_paths, serving_snapshot
from tests.knowledge.sample_files import (
    CARE_PDF_PAGES,
    FAQ_CSV,
    RETURNS_MD,
    SCRIPTS_ONLY_HTML,
    SHIPPING_TXT,
    WARRANTY_HTML,
    good_files,
    pdf_bytes,
)

pytestmark = pytest.mark.django_db

MODEL_ID = "all-MiniLM-L6-v2@384"

EXPECTED_CHUNKS = {
    "returns.md": ("Returns policy", [
        (["Returns policy"], "You can return any item within 30 days of delivery."),
        (["Returns policy", "Refunds"], "Refunds go back to the original payment method within 5 business days."
                                        "\n\n- The item must be unused\n- Keep the receipt"),
        (["Returns policy", "Exchanges"], "Exchanges for another size are free."),
    ]),
    "shipping.txt": ("Shipping times", [
        (["Shipping times"],
         "Orders ship within two business days. Express orders placed before noon ship the same day."),
        (["Shipping times", "International shipping"], "We ship to 40 countries.\nCustoms fees are paid by the buyer."),
    ]),
    "warranty.html": ("Warranty", [
        (["Warranty"], "Every product has a two-year warranty."),
        (["Warranty", "Claims"], "Email support with your order number.\n\nAttach a photo of the fault.\n\n"
                                 "Plan | Years\n\nBasic | 2"),
    ]),
    "care.pdf": ("Care instructions", [
        (["Care instructions"], "Wash the jacket in cold water.\n\nDo not tumble dry."),
        (["Care instructions", "Storage"], "Keep the jacket in a dry place."),
    ]),
    "handbook.docx": ("Employee handbook", [
        (["Holidays"], "Staff get 25 days of paid leave a year."),
        (["Holidays", "Booking leave"], "Book leave in the HR portal two weeks ahead.\n\n"
                                        "Years of service | Extra days\n\n5 | 2"),
    ]),
    "store_faq.csv": ("store faq", [
        ([], "How long does shipping take?\nOrders arrive in 3 to 5 business days."),
        ([], "Can I change my order?\nYes, within one hour of placing it."),
    ]),
}


def chunk_rows(source_id: int) -> list[tuple[list[str], str]]:
    return [(c.heading_path, c.text) for c in Chunk.objects.filter(source_id=source_id).order_by("ordinal")]


# --- every file type ----------------------------------------------------------------------------


@pytest.mark.parametrize("filename", sorted(EXPECTED_CHUNKS))
def test_each_file_type_becomes_ready_chunks_with_exact_offsets_and_embeddings(filename, kb_folder, embedding_model):
    # given a realistic file of one type in a folder
    data = good_files()[filename]
    (kb_folder / filename).write_bytes(data)
    # when the folder is registered and ingested
    results = ingest_paths([kb_folder])
    # then the source is ready with the expected title and chunks
    source = Source.objects.get()
    title, expected = EXPECTED_CHUNKS[filename]
    assert results == {filename: services.IngestResult(source.pk, "ingested", len(expected))}
    assert (source.status, source.progress, source.error, source.chunk_count) == ("ready", 100, "", len(expected))
    assert source.kind == ("faq" if filename.endswith(".csv") else "file")
    assert source.uri == str(kb_folder / filename)
    assert source.title == title
    assert source.content_hash == hashlib.sha256(data).hexdigest()
    assert source.text == parse_file(filename, data).text
    assert source.ingested_at is not None
    assert chunk_rows(source.pk) == expected
    # and each chunk is its exact span of the source's text, within the token bound, embedded by
    # the recorded model (a unit vector of the passage with its title and headings), full-text indexed
    spans = chunk_document(parse_file(filename, data), max_tokens=settings.CHUNK_MAX_TOKENS,
                           count_tokens=embedding_model.count_tokens)
    chunks = list(Chunk.objects.filter(source=source).order_by("ordinal"))
    assert [(c.ordinal, c.start, c.end, c.token_count) for c in chunks] == [
        (n, s.start, s.end, s.token_count) for n, s in enumerate(spans)
    ]
    for chunk in chunks:
        assert source.text[chunk.start : chunk.end] == chunk.text
        assert chunk.token_count <= settings.CHUNK_MAX_TOKENS
        assert chunk.embedding_model == MODEL_ID == model_id()
        assert len(chunk.embedding) == settings.EMBEDDING_DIM == 384
        assert np.linalg.norm(chunk.embedding) == pytest.approx(1.0, abs=1e-5)
        assert chunk.search_vector
    expected_vector = embedding_model.encode([passage_text(title, chunks[0].heading_path, chunks[0].text)])[0]
    assert np.asarray(chunks[0].embedding) == pytest.approx(expected_vector, abs=1e-5)


def test_full_text_vector_holds_the_title_and_headings_as_well_as_the_passage(kb_folder):
    # given an ingested Markdown page
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    ingest_paths([kb_folder])
    # when chunks are matched by a heading word that is not in their own passage
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT text FROM knowledge_chunk WHERE search_vector @@ to_tsquery('english', 'refund & policy') "
            "ORDER BY ordinal"
        )
        matched = [row[0] for row in cursor.fetchall()]
    # then the chunk under "Returns policy > Refunds" matches (title and headings weigh in)
    assert matched == [EXPECTED_CHUNKS["returns.md"][1][1][1]]


# --- hash skip and replace ------------------------------------------------------------------------


def test_unchanged_bytes_are_skipped_and_chunks_are_untouched(kb_folder):
    # given a serving Markdown source
    path = kb_folder / "returns.md"
    path.write_text(RETURNS_MD)
    ingest_paths([kb_folder])
    source = Source.objects.get()
    before = serving_snapshot(source.pk)
    # when the same folder is registered again
    registered = services.sources_register_paths([kb_folder], enqueue=False)
    # then nothing is queued
    assert (registered.queued, [s.pk for s in registered.unchanged]) == ([], [source.pk])
    # and ingesting it anyway (a task run twice) reports "unchanged" and keeps every chunk as it was
    assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "unchanged", 3)
    assert serving_snapshot(source.pk) == before
    assert Source.objects.get().status == "ready"


def test_force_reingests_unchanged_bytes_keeping_each_passages_chunk_id(kb_folder):
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    ingest_paths([kb_folder])
    source = Source.objects.get()
    old_ids = list(Chunk.objects.order_by("ordinal").values_list("pk", flat=True))
    # when ingestion is forced
    result = services.document_ingest(source.pk, force=True)
    # then the same chunks are written again, each under the id its passage had (citations survive)
    assert result == services.IngestResult(source.pk, "ingested", 3)
    assert chunk_rows(source.pk) == EXPECTED_CHUNKS["returns.md"][1]
    assert list(Chunk.objects.order_by("ordinal").values_list("pk", flat=True)) == old_ids


def test_reingesting_a_changed_file_keeps_the_ids_of_unchanged_passages_at_their_new_offsets(kb_folder):
    # given a serving page of three sections
    path = kb_folder / "guide.md"
    path.write_text("# Guide\n\n## Sizes\n\nJackets run small.\n\n## Care\n\nWash cold.\n\n## Repairs\n\nSend it in.\n")
    ingest_paths([kb_folder])
    before = {c.text: (c.pk, c.start) for c in Chunk.objects.all()}
    # when a section is inserted before the others and one section's text changes
    path.write_text("# Guide\n\n## Colours\n\nRed and blue.\n\n## Sizes\n\nJackets run small.\n\n"
                    "## Care\n\nWash cold, hang dry.\n\n## Repairs\n\nSend it in.\n")
    ingest_paths([kb_folder])
    # then the unchanged passages keep their ids at their new offsets, the changed and new ones are new rows
    source = Source.objects.get()
    after = {c.text: (c.pk, c.start) for c in Chunk.objects.all()}
    assert sorted(after) == ["Jackets run small.", "Red and blue.", "Send it in.", "Wash cold, hang dry."]
    for text in ("Jackets run small.", "Send it in."):
        assert after[text][0] == before[text][0]
        assert after[text][1] == source.text.index(text) != before[text][1]
    assert {after["Red and blue."][0], after["Wash cold, hang dry."][0]}.isdisjoint(pk for pk, _ in before.values())
    assert not Chunk.objects.filter(pk=before["Wash cold."][0]).exists()


def test_changed_file_replaces_its_chunks_text_and_hash(kb_folder):
    # given a serving Markdown source and another source beside it
    path = kb_folder / "returns.md"
    path.write_text(RETURNS_MD)
    (kb_folder / "shipping.txt").write_text(SHIPPING_TXT)
    ingest_paths([kb_folder])
    source = Source.objects.get(uri=str(path))
    neighbour = Source.objects.get(uri=str(kb_folder / "shipping.txt"))
    neighbour_before = serving_snapshot(neighbour.pk)
    old_ids = set(Chunk.objects.filter(source=source).values_list("pk", flat=True))
    # when the file changes and the folder is registered and ingested again
    new_text = "# Returns policy\n\nReturns are accepted within 60 days.\n"
    path.write_text(new_text)
    results = ingest_paths([kb_folder])
    # then only the changed file was queued, and its chunks, text and hash are the new version's
    assert results == {"returns.md": services.IngestResult(source.pk, "ingested", 1)}
    source.refresh_from_db()
    assert chunk_rows(source.pk) == [(["Returns policy"], "Returns are accepted within 60 days.")]
    assert (source.text, source.content_hash, source.chunk_count) == (
        new_text, hashlib.sha256(new_text.encode()).hexdigest(), 1)
    assert old_ids.isdisjoint(Chunk.objects.filter(source=source).values_list("pk", flat=True))
    # and the neighbour is exactly as it was
    assert serving_snapshot(neighbour.pk) == neighbour_before


def numbered_guide(version: str, sections: int) -> str:
    return "".join(
        f"## {version} section {n}\n\nIn the {version.lower()} guide, step {n} is to check the parcel "
        f"label number {n} before shipping.\n\n"
        for n in range(sections)
    )


@pytest.mark.django_db(transaction=True)
def test_reingest_is_atomic_for_readers_on_another_connection(kb_folder, embedding_model, monkeypatch):
    # given a serving source of 30 chunks, and its file changed to a version of 20 different chunks
    path = kb_folder / "guide.md"
    path.write_text(numbered_guide("Old", 30))
    ingest_paths([kb_folder])
    source = Source.objects.get()
    old_hash, old_texts = source.content_hash, frozenset(Chunk.objects.values_list("text", flat=True))
    path.write_text(numbered_guide("New", 20))
    services.sources_register_paths([kb_folder], enqueue=False)
    query_embedding = embedding_model.encode(["check the parcel label number before shipping"])[0]

    # The swap is paused after the old chunks are deleted and the new ones inserted, until a
    # reader has looked: that reader must still see the old version.
    mid_swap, reader_looked = threading.Event(), threading.Event()
    real_swap = ingestion._swap_chunks

    def swap_then_wait_for_a_reader(*args, **kwargs):
        real_swap(*args, **kwargs)
        mid_swap.set()
        assert reader_looked.wait(30)

    monkeypatch.setattr(ingestion, "_swap_chunks", swap_then_wait_for_a_reader)
    reads, searches, during_swap, errors = [], [], [], []
    first_read, writer_done, stop = threading.Event(), threading.Event(), threading.Event()

    def reader():
        try:
            after_writer = 0
            while not stop.is_set() and after_writer < 5:
                looking_mid_swap = mid_swap.is_set() and not reader_looked.is_set()
                with connection.cursor() as cursor:  # this thread's own connection, autocommit
                    cursor.execute(
                        "SELECT s.content_hash, c.text FROM knowledge_source s "
                        "LEFT JOIN knowledge_chunk c ON c.source_id = s.id WHERE s.id = %s",
                        [source.pk],
                    )
                    rows = cursor.fetchall()
                seen = (frozenset(row[0] for row in rows), frozenset(row[1] for row in rows if row[1] is not None))
                found = frozenset(r.text for r in chunk_search(
                    "check the parcel label number before shipping", k=50, query_embedding=query_embedding))
                reads.append(seen)
                searches.append(found)
                if looking_mid_swap:
                    during_swap.append(seen)
                    reader_looked.set()
                first_read.set()
                if writer_done.is_set():
                    after_writer += 1
        except Exception as error:  # reported by the main thread
            errors.append(error)
            reader_looked.set()
        finally:
            first_read.set()
            connection.close()

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        assert first_read.wait(30)
        # when the new version is ingested while the reader keeps reading
        result = services.document_ingest(source.pk)
    finally:
        writer_done.set()
        thread.join(60)
        stop.set()
    assert not errors, errors
    assert result == services.IngestResult(source.pk, "ingested", 20)
    new_hash, new_texts = Source.objects.get().content_hash, frozenset(Chunk.objects.values_list("text", flat=True))
    assert len(old_texts) == 30 and len(new_texts) == 20 and old_texts.isdisjoint(new_texts)
    # then every read saw the whole old version or the whole new version, never a mix or nothing
    old, new = (frozenset({old_hash}), old_texts), (frozenset({new_hash}), new_texts)
    assert set(reads) <= {old, new}
    assert reads[0] == old and reads[-1] == new
    # and a read made in the middle of the swap transaction saw the old version
    assert during_swap == [old]
    # and retrieval always found chunks of one version only
    assert all(found and (found <= old_texts or found <= new_texts) for found in searches)
    assert searches[0] <= old_texts and searches[-1] <= new_texts


# --- deletion ---------------------------------------------------------------------------------------


def test_registering_a_missing_path_raises_and_queues_nothing(kb_folder):
    # given a folder with a file, and a path that does not exist
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    # when both are registered, then FileNotFoundError names the missing path and nothing is created
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*/gone.md"):
        services.sources_register_paths([kb_folder, kb_folder / "gone.md"], enqueue=False)
    assert Source.objects.count() == 0


def test_deleting_a_source_removes_its_chunks_and_nothing_else(kb_folder):
    # given two serving sources
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    (kb_folder / "shipping.txt").write_text(SHIPPING_TXT)
    ingest_paths([kb_folder])
    returns = Source.objects.get(uri=str(kb_folder / "returns.md"))
    shipping = Source.objects.get(uri=str(kb_folder / "shipping.txt"))
    shipping_before = serving_snapshot(shipping.pk)
    # when one is deleted
    services.source_delete(returns)
    # then it and its chunks are gone, and the other is exactly as it was
    assert not Source.objects.filter(pk=returns.pk).exists()
    assert Chunk.objects.filter(source_id=returns.pk).count() == 0
    assert serving_snapshot(shipping.pk) == shipping_before
    assert [r.source_id for r in chunk_search("return any item within 30 days", k=5)] == [shipping.pk] * 2


def test_prune_deletes_sources_whose_files_are_gone(kb_folder):
    # given two ingested files, one of which is then deleted from the folder
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    (kb_folder / "shipping.txt").write_text(SHIPPING_TXT)
    ingest_paths([kb_folder])
    (kb_folder / "returns.md").unlink()
    # when the folder is registered with prune
    registered = services.sources_register_paths([kb_folder], prune=True, enqueue=False)
    # then the missing file's source and chunks are deleted and the other is left alone
    assert (len(registered.queued), len(registered.unchanged), registered.pruned) == (0, 1, 1)
    assert list(Source.objects.values_list("uri", flat=True)) == [str(kb_folder / "shipping.txt")]
    assert Chunk.objects.count() == 2


# --- products -----------------------------------------------------------------------------------------


def make_product(**overrides) -> Product:
    fields = dict(sku="TR-100", name="Trailblazer running shoe", price=Decimal("129.00"),
                  description="A waterproof trail running shoe with a grippy sole.",
                  attributes={"colour": "forest green", "weight": "280 g"})
    return Product.objects.create(**{**fields, **overrides})


def test_product_sync_makes_a_product_retrievable_and_product_delete_removes_it():
    # given a product saved and synced
    product = make_product()
    source = services.product_sync(product)
    assert (source.uri, source.kind, source.status, source.title) == (
        "product:TR-100", "product", "queued", "Trailblazer running shoe")
    # when its source is ingested
    assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "ingested", 2)
    # then it is retrieved by what a customer would ask, with its rendered text
    results = chunk_search("waterproof trail running shoe price", k=3)
    assert results[0].source_uri == "product:TR-100"
    assert results[0].source_title == "Trailblazer running shoe"
    assert chunk_rows(source.pk) == [
        (["Trailblazer running shoe"],
         "SKU: TR-100. Price: 129.00 USD.\n\nA waterproof trail running shoe with a grippy sole."),
        (["Trailblazer running shoe", "Specifications"], "- colour: forest green\n- weight: 280 g"),
    ]
    source.refresh_from_db()
    assert (source.status, source.pending_file.name) == ("ready", "")
    # when the product is deleted
    services.product_delete(product)
    # then its source and chunks are gone and it is no longer retrieved
    assert not Product.objects.exists()
    assert not Source.objects.exists()
    assert Chunk.objects.count() == 0
    assert chunk_search("waterproof trail running shoe price", k=3) == []


def test_product_ingested_twice_stays_ready_and_untouched():
    # given a synced and ingested product
    product = make_product()
    source = services.product_sync(product)
    services.document_ingest(source.pk)
    before = serving_snapshot(source.pk)
    # when its ingestion runs again (a task delivered twice)
    result = services.document_ingest(source.pk)
    # then it reports unchanged, stays ready, and serves the same chunks
    assert result == services.IngestResult(source.pk, "unchanged", 2)
    assert Source.objects.get(pk=source.pk).status == "ready"
    assert serving_snapshot(source.pk) == before


def test_product_sku_or_collection_change_moves_its_source():
    # given an ingested product
    product = make_product()
    services.document_ingest(services.product_sync(product).pk)
    # when its SKU changes and it is synced again
    product.sku = "TR-200"
    product.save()
    moved = services.product_sync(product)
    services.document_ingest(moved.pk)
    # then only the new SKU's source exists
    assert list(Source.objects.values_list("collection", "uri")) == [("default", "product:TR-200")]
    # when its collection changes
    product.collection = "outdoor"
    product.save()
    services.document_ingest(services.product_sync(product).pk)
    # then it is retrievable in the new collection only
    assert list(Source.objects.values_list("collection", "uri")) == [("outdoor", "product:TR-200")]
    assert chunk_search("trail running shoe", k=3, collection="default") == []
    assert {r.source_uri for r in chunk_search("trail running shoe", k=3, collection="outdoor")} == {"product:TR-200"}


# --- uploads --------------------------------------------------------------------------------------------


def test_upload_is_ingested_from_its_pending_file_and_a_second_run_is_a_no_op(
    media_root, django_capture_on_commit_callbacks
):
    # given an uploaded FAQ sheet
    source = services.source_upload(filename="store_faq.csv", data=FAQ_CSV.encode(), collection="store")
    pending = media_root / source.pending_file.name
    assert (source.uri, source.kind, source.status, pending.read_bytes()) == (
        "upload:store_faq.csv", "faq", "queued", FAQ_CSV.encode())
    # when it is ingested (and its transaction commits)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "ingested", 2)
    # then it serves its rows and its pending file is gone
    source.refresh_from_db()
    assert (source.status, source.pending_file.name, pending.exists()) == ("ready", "", False)
    assert chunk_rows(source.pk) == EXPECTED_CHUNKS["store_faq.csv"][1]
    before = serving_snapshot(source.pk)
    # when the task runs again, then nothing changes and it stays ready
    assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "unchanged", 2)
    assert Source.objects.get(pk=source.pk).status == "ready"
    assert serving_snapshot(source.pk) == before
    # when the same bytes are uploaded again, then they are skipped by their hash (and their file is
    # deleted once that commits)
    again = services.source_upload(filename="store_faq.csv", data=FAQ_CSV.encode(), collection="store")
    assert again.pk == source.pk
    with django_capture_on_commit_callbacks(execute=True):
        assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "unchanged", 2)
    assert serving_snapshot(source.pk) == before
    assert list(media_root.rglob("*.csv")) == []


def test_upload_over_the_size_limit_is_refused_and_the_pending_version_is_untouched(
    media_root, queued_by_hand, settings
):
    # given an upload queued under a 1 MB limit
    settings.INGEST_MAX_FILE_BYTES = 1024 * 1024
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    before = files_in(media_root)
    # when a bigger version is uploaded under the same name
    with pytest.raises(services.UploadRefused) as refused:
        services.source_upload(filename="returns.md", data=b"# Returns\n\n" + b"Keep receipts. " * 70_000)
    # then it is refused with the reason and nothing was stored or queued
    assert str(refused.value) == "returns.md: the file is larger than the 1 MB limit (INGEST_MAX_FILE_BYTES)"
    assert files_in(media_root) == before
    assert (Source.objects.get().pending_file.name, Source.objects.get().pending_version) == (
        source.pending_file.name, 1)
    assert queued_by_hand == [source.pk]


# --- a file re-uploaded while its previous version is being ingested ----------------------------------
# The overlap is simulated in this thread by ordered calls: v2 is uploaded (and, in one test, ingested)
# from inside v1's ingestion while it embeds. tests/knowledge/test_tasks.py runs the same overlap on a
# real worker with two threads.

RETURNS_V2_MD = RETURNS_MD.replace("30 days", "60 days")
RETURNS_V2_CHUNKS = [
    (["Returns policy"], "You can return any item within 60 days of delivery."),
    *EXPECTED_CHUNKS["returns.md"][1][1:],
]


@pytest.fixture
def queued_by_hand(monkeypatch) -> list[int]:
    """Ingestion tasks are recorded, not sent to the broker: the tests run ``document_ingest`` by hand."""
    queued: list[int] = []
    monkeypatch.setattr(sources, "sources_enqueue", lambda ids, force=False: queued.extend(ids))
    return queued


def during_next_embedding(monkeypatch, action) -> None:
    """Run ``action()`` once, inside the next ingestion, after it read and parsed its version and
    before it embeds it."""
    real, done = ingestion._embed_with_progress, []

    def embed(model, texts, report):
        if not done:
            done.append(True)
            action()
        return real(model, texts, report)

    monkeypatch.setattr(ingestion, "_embed_with_progress", embed)


def files_in(folder) -> list:
    return sorted(path for path in folder.rglob("*") if path.is_file())


def test_reupload_during_ingestion_supersedes_it_and_the_new_version_is_ingested_by_its_own_task(
    media_root, queued_by_hand, monkeypatch, django_capture_on_commit_callbacks
):
    # given v1 uploaded
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    v1_file = media_root / source.pending_file.name
    # when v2 is uploaded while v1 is being ingested
    during_next_embedding(monkeypatch, lambda: services.source_upload(filename="returns.md",
                                                                      data=RETURNS_V2_MD.encode()))
    with django_capture_on_commit_callbacks(execute=True):
        first = services.document_ingest(source.pk)
    # then v1's ingestion stops without writing: v2 is queued with its file, v1's file is deleted
    assert first == services.IngestResult(source.pk, "superseded")
    source.refresh_from_db()
    v2_file = media_root / source.pending_file.name
    assert (source.status, source.chunk_count, source.content_hash, source.pending_version) == ("queued", 0, "", 2)
    assert files_in(media_root) == [v2_file] and v2_file.read_bytes() == RETURNS_V2_MD.encode()
    assert not v1_file.exists() and Chunk.objects.count() == 0
    assert queued_by_hand == [source.pk, source.pk]
    # when v2's own task runs, then v2 serves and no file is left
    with django_capture_on_commit_callbacks(execute=True):
        assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "ingested", 3)
    source.refresh_from_db()
    assert (source.status, source.pending_file.name, source.content_hash) == (
        "ready", "", hashlib.sha256(RETURNS_V2_MD.encode()).hexdigest())
    assert chunk_rows(source.pk) == RETURNS_V2_CHUNKS
    assert files_in(media_root) == []


def test_older_ingestion_finishing_after_the_newer_one_leaves_the_newer_version_serving(
    media_root, queued_by_hand, monkeypatch, django_capture_on_commit_callbacks
):
    # given v1 uploaded
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    newer = []

    def upload_and_ingest_v2():
        services.source_upload(filename="returns.md", data=RETURNS_V2_MD.encode())
        newer.append(services.document_ingest(source.pk))

    # when v2 is uploaded and ingested while v1 is being ingested, and v1's ingestion ends after
    during_next_embedding(monkeypatch, upload_and_ingest_v2)
    with django_capture_on_commit_callbacks(execute=True):
        older = services.document_ingest(source.pk)
    # then v2's was ingested and v1's wrote nothing
    assert (newer, older) == ([services.IngestResult(source.pk, "ingested", 3)],
                              services.IngestResult(source.pk, "superseded"))
    source.refresh_from_db()
    assert (source.status, source.progress, source.error, source.pending_file.name, source.content_hash) == (
        "ready", 100, "", "", hashlib.sha256(RETURNS_V2_MD.encode()).hexdigest())
    assert chunk_rows(source.pk) == RETURNS_V2_CHUNKS
    assert files_in(media_root) == []


def test_upload_rolled_back_keeps_the_pending_version_and_its_file(media_root, queued_by_hand):
    # given v1 uploaded, not yet ingested
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    v1_name = source.pending_file.name
    # when v2 is uploaded in a transaction that then rolls back
    with pytest.raises(RuntimeError, match="request failed"), transaction.atomic():
        services.source_upload(filename="returns.md", data=RETURNS_V2_MD.encode())
        raise RuntimeError("the request failed after the upload")
    # then the source still points at v1's file, which is still there, and ingests it
    source.refresh_from_db()
    assert (media_root / v1_name).read_bytes() == RETURNS_MD.encode()
    assert (source.pending_file.name, source.status) == (v1_name, "queued")
    assert source.pending_version == 1
    assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "ingested", 3)
    assert chunk_rows(source.pk) == EXPECTED_CHUNKS["returns.md"][1]


# --- re-embedding -----------------------------------------------------------------------------------------


def test_chunks_of_another_embedding_model_are_detected_and_reembedded(kb_folder):
    # given a serving source whose chunks were written by another embedding model
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    ingest_paths([kb_folder])
    source = Source.objects.get()
    before = serving_snapshot(source.pk)
    Chunk.objects.update(embedding_model="old-model@384", embedding=[0.0] * 383 + [1.0])
    # when reembed runs
    result = services.reembed()
    # then every chunk is re-embedded in place: same ids, text and offsets, current model's vectors
    assert (result.sources, result.chunks) == (1, 3)
    after = serving_snapshot(source.pk)
    without_vectors = lambda chunks: [c[:7] + c[8:] for c in chunks]  # noqa: E731
    assert without_vectors(after["chunks"]) == without_vectors(before["chunks"])
    for old, new in zip(before["chunks"], after["chunks"]):
        assert new[7] == pytest.approx(old[7], abs=1e-5)
    # and unchanged bytes are still skipped once the model matches
    assert services.document_ingest(source.pk).status == "unchanged"


def test_unchanged_bytes_are_reingested_when_the_embedding_model_changed(kb_folder):
    (kb_folder / "returns.md").write_text(RETURNS_MD)
    ingest_paths([kb_folder])
    source = Source.objects.get()
    Chunk.objects.update(embedding_model="old-model@384")
    # when the same bytes are ingested, then they are not skipped
    assert services.document_ingest(source.pk) == services.IngestResult(source.pk, "ingested", 3)
    assert set(Chunk.objects.values_list("embedding_model", flat=True)) == {MODEL_ID}


# --- bad input ---------------------------------------------------------------------------------------------

OVER_LIMIT = 1024 * 1024  # INGEST_MAX_FILE_BYTES for these tests: 1 MB

BAD_VERSIONS = {
    # id: (file name, bad bytes, reason)
    "empty": ("returns.md", b"", "the file is empty"),
    "corrupt-pdf": ("care.pdf", b"%PDF-1.4\nthis is not a pdf at all\n",
                    "corrupt or unreadable PDF (Stream has ended unexpectedly)"),
    "over-size-limit": ("shipping.txt", b"Shipping times\n\n" + b"Parcels ship daily. " * 60000,
                        "the file is larger than the 1 MB limit (INGEST_MAX_FILE_BYTES)"),
    "not-utf8": ("shipping.txt", "Shipping times\n\nCaf\u00e9 orders ship daily.\n".encode("latin-1"),
                 "the file is not valid UTF-8 text (byte 0xe9 at offset 19); save it as UTF-8 and upload it again"),
    "html-only-scripts": ("warranty.html", SCRIPTS_ONLY_HTML.encode(),
                          "the page has no visible text once its scripts are removed (is it rendered by JavaScript?)"),
    "csv-without-columns": ("store_faq.csv", b"name,email\nAnn,ann@example.com\n",
                            "a CSV FAQ sheet needs a 'question' column and an 'answer' column; "
                            "found columns: 'name', 'email'"),
    "corrupt-docx": ("handbook.docx", b"PK\x03\x04 this is not really a zip file",
                     "corrupt or unreadable Word document (File is not a zip file)"),
}


@pytest.mark.parametrize("case", sorted(BAD_VERSIONS))
def test_bad_new_version_fails_with_its_reason_and_the_serving_version_is_untouched(case, kb_folder, settings):
    # given a serving source of a good file, and a neighbour
    settings.INGEST_MAX_FILE_BYTES = OVER_LIMIT
    filename, bad, reason = BAD_VERSIONS[case]
    path = kb_folder / filename
    path.write_bytes(good_files()[filename])
    (kb_folder / "neighbour.md").write_text(RETURNS_MD.replace("Returns policy", "Neighbour policy"))
    ingest_paths([kb_folder])
    source = Source.objects.get(uri=str(path))
    neighbour = Source.objects.get(uri=str(kb_folder / "neighbour.md"))
    before, neighbour_before = serving_snapshot(source.pk), serving_snapshot(neighbour.pk)
    served = [r.chunk_id for r in chunk_search(before["chunks"][0][4], k=3, collection="default")]
    # when the file is replaced by a bad version and ingested
    path.write_bytes(bad)
    results = ingest_paths([kb_folder])
    # then its source is failed with the reason
    assert results == {filename: services.IngestResult(source.pk, "failed", 0, reason)}
    source.refresh_from_db()
    assert (source.status, source.error, source.progress) == ("failed", reason, 0)
    # and what was serving is exactly as before, still retrieved, and the neighbour is untouched
    assert serving_snapshot(source.pk) == before
    assert serving_snapshot(neighbour.pk) == neighbour_before
    assert [r.chunk_id for r in chunk_search(before["chunks"][0][4], k=3, collection="default")] == served


def test_file_that_disappears_before_ingestion_fails_and_the_serving_version_is_untouched(kb_folder):
    # given a serving source queued again after a change, whose file is then removed
    path = kb_folder / "returns.md"
    path.write_text(RETURNS_MD)
    ingest_paths([kb_folder])
    source = Source.objects.get()
    before = serving_snapshot(source.pk)
    path.write_text(RETURNS_MD + "\nOne more line.\n")
    services.sources_register_paths([kb_folder], enqueue=False)
    path.unlink()
    # when it is ingested
    result = services.document_ingest(source.pk)
    # then it is failed with the reason and still serves the old version
    reason = f"cannot read {path} (No such file or directory)"
    assert result == services.IngestResult(source.pk, "failed", 0, reason)
    assert Source.objects.get().error == reason
    assert serving_snapshot(source.pk) == before


def test_bad_upload_fails_the_serving_upload_is_untouched_and_its_file_is_deleted(
    media_root, queued_by_hand, django_capture_on_commit_callbacks
):
    # given a serving uploaded page
    source = services.source_upload(filename="warranty.html", data=WARRANTY_HTML.encode())
    with django_capture_on_commit_callbacks(execute=True):
        services.document_ingest(source.pk)
    before = serving_snapshot(source.pk)
    # when a version rendered only by scripts is uploaded under the same name and ingested
    bad = services.source_upload(filename="warranty.html", data=SCRIPTS_ONLY_HTML.encode())
    assert (media_root / bad.pending_file.name).read_bytes() == SCRIPTS_ONLY_HTML.encode()
    with django_capture_on_commit_callbacks(execute=True):
        result = services.document_ingest(source.pk)
    # then it fails with the reason and the serving version is untouched
    reason = "the page has no visible text once its scripts are removed (is it rendered by JavaScript?)"
    assert result == services.IngestResult(source.pk, "failed", 0, reason)
    assert serving_snapshot(source.pk) == before
    # and the failed version's file is deleted: nothing is left on disk
    source.refresh_from_db()
    assert (source.status, source.error, source.pending_file.name) == ("failed", reason, "")
    assert [path for path in media_root.rglob("*") if path.is_file()] == []


@pytest.mark.parametrize("storage", ["file system", "object storage"])
def test_an_upload_missing_from_the_storage_fails_with_the_same_reason_and_the_serving_version_is_untouched(
    media_root, queued_by_hand, settings, django_capture_on_commit_callbacks, storage
):
    # given the upload storage on disk, or an object storage whose reads of a missing name raise its own
    # exception (not an OSError), and a serving uploaded page
    if storage == "object storage":
        settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": object_storage.BACKEND}}
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    with django_capture_on_commit_callbacks(execute=True):
        services.document_ingest(source.pk)
    before = serving_snapshot(source.pk)
    # when a new version is uploaded, its stored file disappears (removed from the bucket or volume),
    # and it is ingested
    new = services.source_upload(filename="returns.md", data=RETURNS_V2_MD.encode())
    new.pending_file.storage.delete(new.pending_file.name)
    with django_capture_on_commit_callbacks(execute=True):
        result = services.document_ingest(source.pk)
    # then it fails with the same reason on either storage, naming the file, and serves its previous version
    reason = f"the uploaded file is missing ({new.pending_file.name}); upload the file again"
    assert result == services.IngestResult(source.pk, "failed", 0, reason)
    source.refresh_from_db()
    assert (source.status, source.error, source.progress, source.pending_file.name) == ("failed", reason, 0, "")
    assert serving_snapshot(source.pk) == before


@pytest.mark.parametrize("storage", ["file system", "object storage"])
def test_an_upload_the_storage_cannot_read_but_still_holds_keeps_the_storages_error(
    media_root, queued_by_hand, settings, monkeypatch, storage
):
    # given an uploaded page whose storage fails to read it although it still holds it (an outage, a
    # permission problem)
    if storage == "object storage":
        settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": object_storage.BACKEND}}
    source = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    storage_class = type(storages["default"])
    error = PermissionError(13, "Permission denied") if storage == "file system" else RuntimeError("SlowDown")

    def broken_open(self, name, mode="rb"):
        raise error

    monkeypatch.setattr(storage_class, "_open", broken_open)
    # when it is ingested
    # then the storage's own error is raised (the task records it as an internal error), not called missing
    with pytest.raises(type(error)):
        services.document_ingest(source.pk)
    source.refresh_from_db()
    assert (source.status, source.error, source.chunk_count) == ("queued", "", 0)
    assert source.pending_file.storage.exists(source.pending_file.name)


BATCH_BAD = {
    "empty.md": (b"", "the file is empty"),
    "setup.exe": (b"MZ\x90\x00\x03", "unsupported file type .exe; supported: "
                                     ".txt, .text, .md, .markdown, .html, .htm, .pdf, .docx, .csv"),
    "broken.pdf": (pdf_bytes(CARE_PDF_PAGES)[:60], "corrupt or unreadable PDF (Stream has ended unexpectedly)"),
    "huge.txt": (b"Big file\n\n" + b"All work and no play. " * 50000,
                 "the file is larger than the 1 MB limit (INGEST_MAX_FILE_BYTES)"),
    "latin1.txt": ("Caf\u00e9 hours\n".encode("latin-1"),
                   "the file is not valid UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8 and upload it again"),
    "app.html": (SCRIPTS_ONLY_HTML.encode(),
                 "the page has no visible text once its scripts are removed (is it rendered by JavaScript?)"),
    "contacts.csv": (b"name,email\nAnn,ann@example.com\n",
                     "a CSV FAQ sheet needs a 'question' column and an 'answer' column; "
                     "found columns: 'name', 'email'"),
}


def write_batch(folder) -> None:
    for name, data in good_files().items():
        (folder / name).write_bytes(data)
    for name, (data, _) in BATCH_BAD.items():
        (folder / name).write_bytes(data)
    (folder / ".hidden").mkdir()
    (folder / ".hidden" / "notes.md").write_text("# Hidden\n\nNever ingested.\n")


def test_a_batch_with_bad_files_marks_each_failed_and_the_rest_becomes_ready(kb_folder, settings):
    # given a folder of six good files, seven bad ones and a hidden folder
    settings.INGEST_MAX_FILE_BYTES = OVER_LIMIT
    write_batch(kb_folder)
    # when the folder is registered and every queued source ingested
    results = ingest_paths([kb_folder])
    # then each bad file is failed with its reason and every good file is ready
    assert {name: (r.status, r.error) for name, r in results.items()} == {
        **{name: ("ingested", "") for name in good_files()},
        **{name: ("failed", reason) for name, (_, reason) in BATCH_BAD.items()},
    }
    states = {s.uri.rsplit("/", 1)[1]: (s.status, s.error, s.chunk_count, s.text)
              for s in Source.objects.all()}
    assert states == {
        **{name: ("ready", "", len(EXPECTED_CHUNKS[name][1]), parse_file(name, data).text)
           for name, data in good_files().items()},
        **{name: ("failed", reason, 0, "") for name, (_, reason) in BATCH_BAD.items()},
    }
    assert Chunk.objects.count() == sum(len(chunks) for _, chunks in EXPECTED_CHUNKS.values())
    assert not Chunk.objects.filter(source__status="failed").exists()


def test_ingest_command_sync_reports_ready_and_failed_files(kb_folder, settings):
    # given the same mixed folder
    settings.INGEST_MAX_FILE_BYTES = OVER_LIMIT
    write_batch(kb_folder)
    out = io.StringIO()
    # when `manage.py ingest FOLDER --sync --collection help` runs
    call_command("ingest", str(kb_folder), "--sync", "--collection", "help", stdout=out, stderr=io.StringIO())
    # then it reports the counts and each failure's reason
    lines = out.getvalue().splitlines()
    assert lines[0] == "13 queued, 0 unchanged, 0 pruned (collection 'help')"
    assert lines[1] == "6 ready (13 chunks), 7 failed"
    assert sorted(lines[2:]) == sorted(
        f"  failed: {kb_folder / name}: {reason}" for name, (_, reason) in BATCH_BAD.items()
    )
    assert set(Source.objects.values_list("collection", flat=True)) == {"help"}


# --- batch ingestion (several sources per embedding call) ---------------------------------------------


class EncodeSpy:
    """Records the texts of every call of the embedding model's ``encode`` (then runs the real one)."""

    def __init__(self, model, monkeypatch):
        self.calls: list[list[str]] = []
        real = model.encode

        def spy(texts, batch_size=None):
            self.calls.append(list(texts))
            return real(texts, batch_size=batch_size)

        monkeypatch.setattr(model, "encode", spy)


def ingest_batch(paths, **kwargs) -> dict[str, services.IngestResult]:
    """Register ``paths`` and ingest the queued sources with ``documents_ingest`` (what ``manage.py
    ingest --sync`` does); results by file name."""
    registered = services.sources_register_paths(paths, enqueue=False)
    names = {s.pk: Path(s.uri).name for s in registered.queued}
    return {names[r.source_id]: r for r in services.documents_ingest(list(names), **kwargs)}


def test_batch_embeds_several_files_per_call_and_stores_each_files_chunks_under_its_own_source(
        kb_folder, embedding_model, monkeypatch, settings):
    # given the six good files (13 chunks), rounds of at least 5 chunks and batches of 4 texts
    settings.INGEST_BATCH_CHUNKS, settings.EMBEDDING_BATCH_SIZE = 5, 4
    for name, data in good_files().items():
        (kb_folder / name).write_bytes(data)
    # (the encoder ingestion will use: the process's cache may hold another instance than the session's)
    spy = EncodeSpy(get_embedding_model(), monkeypatch)
    # when the folder is ingested as one batch
    results = ingest_batch([kb_folder])
    # then every file is ingested with exactly its own chunks, as one-file ingestion stores them
    assert {name: (r.status, r.chunk_count, r.error) for name, r in results.items()} == {
        name: ("ingested", len(chunks), "") for name, (_, chunks) in EXPECTED_CHUNKS.items()}
    for name, (title, expected) in EXPECTED_CHUNKS.items():
        source = Source.objects.get(uri=str(kb_folder / name))
        assert (source.status, source.progress, source.title, source.chunk_count) == ("ready", 100, title, len(expected))
        assert chunk_rows(source.pk) == expected
    # and files were taken in rounds (sorted names: care.pdf 2 + handbook.docx 2 + returns.md 3 chunks,
    # then shipping.txt 2 + store_faq.csv 2 + warranty.html 2), each round's texts in calls of at most 4,
    # longest first, mixing files
    texts = {
        source.uri.rsplit("/", 1)[1]: [passage_text(source.title, c.heading_path, c.text)
                                       for c in source.chunks.order_by("ordinal")]
        for source in Source.objects.all()
    }
    rounds = [texts["care.pdf"] + texts["handbook.docx"] + texts["returns.md"],
              texts["shipping.txt"] + texts["store_faq.csv"] + texts["warranty.html"]]
    by_length = [sorted(r, key=len, reverse=True) for r in rounds]
    assert spy.calls == [by_length[0][:4], by_length[0][4:], by_length[1][:4], by_length[1][4:]]
    # and each chunk's embedding is its own passage's (nothing shifted between files)
    for chunk in Chunk.objects.select_related("source"):
        expected_vector = embedding_model.encode([passage_text(chunk.source.title, chunk.heading_path, chunk.text)])[0]
        assert np.asarray(chunk.embedding) == pytest.approx(expected_vector, abs=1e-5)


def test_batch_with_a_corrupt_file_fails_only_it_keeps_its_serving_version_and_skips_unchanged_files(
        kb_folder, settings):
    # given three serving files
    settings.INGEST_MAX_FILE_BYTES = OVER_LIMIT
    for name in ("care.pdf", "returns.md", "shipping.txt"):
        (kb_folder / name).write_bytes(good_files()[name])
    ingest_batch([kb_folder])
    ids = {name: Source.objects.get(uri=str(kb_folder / name)).pk for name in ("care.pdf", "returns.md", "shipping.txt")}
    before = {name: serving_snapshot(pk) for name, pk in ids.items()}
    # when the PDF is replaced by a corrupt one, the Markdown page changes, a new page arrives, the
    # text file stays as it was, and all four are ingested in one batch (the unchanged one too, as a
    # task delivered twice would)
    (kb_folder / "care.pdf").write_bytes(b"%PDF-1.4\nthis is not a pdf at all\n")
    (kb_folder / "returns.md").write_text("# Returns policy\n\nReturns are accepted within 60 days.\n")
    (kb_folder / "warranty.html").write_bytes(good_files()["warranty.html"])
    registered = services.sources_register_paths([kb_folder], enqueue=False)
    ids["warranty.html"] = Source.objects.get(uri=str(kb_folder / "warranty.html")).pk
    assert sorted(s.pk for s in registered.queued) == sorted(ids[n] for n in ("care.pdf", "returns.md", "warranty.html"))
    order = [ids[n] for n in ("care.pdf", "returns.md", "shipping.txt", "warranty.html")]
    seen = []
    results = services.documents_ingest(order, on_result=seen.append)
    # then the corrupt file alone failed with its reason, the changed and new ones are ingested, the
    # unchanged one was skipped by its hash
    reason = "corrupt or unreadable PDF (Stream has ended unexpectedly)"
    assert results == [
        services.IngestResult(ids["care.pdf"], "failed", 0, reason),
        services.IngestResult(ids["returns.md"], "ingested", 1),
        services.IngestResult(ids["shipping.txt"], "unchanged", 2),
        services.IngestResult(ids["warranty.html"], "ingested", 2),
    ]
    assert sorted(seen, key=lambda r: r.source_id) == sorted(results, key=lambda r: r.source_id)
    states = {name: Source.objects.filter(pk=pk).values_list("status", "error", "progress").get()
              for name, pk in ids.items()}
    assert states == {"care.pdf": ("failed", reason, 0), "returns.md": ("ready", "", 100),
                      "shipping.txt": ("ready", "", 100), "warranty.html": ("ready", "", 100)}
    # and the corrupt file's previous version is served exactly as before, the unchanged file untouched
    assert serving_snapshot(ids["care.pdf"]) == before["care.pdf"]
    [top] = chunk_search(before["care.pdf"]["chunks"][0][4], k=1, collection="default")
    assert (top.chunk_id, top.source_id) == (before["care.pdf"]["chunks"][0][0], ids["care.pdf"])
    assert serving_snapshot(ids["shipping.txt"]) == before["shipping.txt"]
    # and every file's chunks are stored under its own source
    assert chunk_rows(ids["returns.md"]) == [(["Returns policy"], "Returns are accepted within 60 days.")]
    assert chunk_rows(ids["warranty.html"]) == EXPECTED_CHUNKS["warranty.html"][1]
    assert chunk_rows(ids["care.pdf"]) == EXPECTED_CHUNKS["care.pdf"][1]
    assert Chunk.objects.count() == 2 + 1 + 2 + 2


@pytest.mark.parametrize("stage", ["parse", "store"])
def test_unexpected_error_in_one_source_of_a_batch_fails_only_that_source(stage, kb_folder, monkeypatch):
    # given two serving files, both changed since
    for name in ("returns.md", "shipping.txt"):
        (kb_folder / name).write_bytes(good_files()[name])
    ingest_batch([kb_folder])
    returns, shipping = (Source.objects.get(uri=str(kb_folder / n)) for n in ("returns.md", "shipping.txt"))
    before = serving_snapshot(returns.pk)
    (kb_folder / "returns.md").write_text(RETURNS_MD + "\nOne more line.\n")
    (kb_folder / "shipping.txt").write_text(SHIPPING_TXT + "\nParcels are insured.\n")
    # when the Markdown page breaks in an unforeseen way while it is parsed, or while it is stored
    if stage == "parse":
        real_parse = ingestion.parse_file

        def broken(filename, data):
            if filename == "returns.md":
                raise RuntimeError("parser bug")
            return real_parse(filename, data)

        monkeypatch.setattr(ingestion, "parse_file", broken)
    else:
        real_swap = ingestion._swap_chunks

        def broken(source, chunks, *, title):
            if source.pk == returns.pk:
                Chunk.objects.filter(source_id=source.pk).delete()  # half done, then
                raise RuntimeError("disk on fire")
            return real_swap(source, chunks, title=title)

        monkeypatch.setattr(ingestion, "_swap_chunks", broken)
    results = ingest_batch([kb_folder])
    # then only that page failed, with the error's text, and it serves its previous version
    message = "parser bug" if stage == "parse" else "disk on fire"
    reason = f"internal error during ingestion: RuntimeError: {message}"
    assert results == {"returns.md": services.IngestResult(returns.pk, "failed", 0, reason),
                       "shipping.txt": services.IngestResult(shipping.pk, "ingested", 2)}
    returns.refresh_from_db()
    assert (returns.status, returns.error) == ("failed", reason)
    assert serving_snapshot(returns.pk) == before
    # and the other file of the batch is ready with its new version
    shipping.refresh_from_db()
    assert (shipping.status, "Parcels are insured." in shipping.text) == ("ready", True)
    assert Chunk.objects.filter(source=shipping, text__contains="Parcels are insured.").count() == 1


def test_an_unexpected_error_in_a_batch_keeps_the_uploaded_file_so_re_ingesting_retries_it(
        media_root, queued_by_hand, monkeypatch, django_capture_on_commit_callbacks):
    # given an upload serving v1, and v2 uploaded
    first = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    services.documents_ingest([first.pk])
    before = serving_snapshot(first.pk)
    second = services.source_upload(filename="returns.md", data=RETURNS_V2_MD.encode())
    pending = second.pending_file.name
    # when the batch meets an unforeseen error that is not the file's (a storage outage, a bug)
    real_parse = ingestion.parse_file

    def broken(filename, data):
        raise RuntimeError("storage timed out")

    monkeypatch.setattr(ingestion, "parse_file", broken)
    [result] = services.documents_ingest([second.pk])
    # then the source failed with the reason, v1 keeps serving, and the uploaded v2 is kept
    reason = "internal error during ingestion: RuntimeError: storage timed out"
    assert (result.status, result.error) == ("failed", reason)
    source = Source.objects.get(pk=second.pk)
    assert (source.status, source.error, source.pending_file.name) == ("failed", reason, pending)
    assert (media_root / pending).read_bytes() == RETURNS_V2_MD.encode()
    assert serving_snapshot(second.pk) == before
    # and once the error is gone, re-ingesting (the admin's action) serves v2 without a new upload
    monkeypatch.setattr(ingestion, "parse_file", real_parse)
    with django_capture_on_commit_callbacks(execute=True):
        assert services.documents_ingest([second.pk], force=True)[0].status == "ingested"
    source.refresh_from_db()
    assert source.status == "ready" and "60 days" in source.text and "60 days" not in before["text"]
    assert not (media_root / pending).exists()


def test_enqueueing_many_sources_queues_batches_and_one_source_its_own_task(
        monkeypatch, settings, django_capture_on_commit_callbacks):
    # given a task size of two sources
    from knowledge import tasks

    settings.INGEST_TASK_SOURCES = 2
    sent = []
    # (sent through config.task_queue, which calls apply_async)
    monkeypatch.setattr(tasks.ingest_sources, "apply_async",
                        lambda args, kwargs: sent.append(("many", args[0], kwargs.get("force", False))))
    monkeypatch.setattr(tasks.ingest_source, "apply_async",
                        lambda args, kwargs: sent.append(("one", args[0], kwargs.get("force", False))))
    # when five sources are queued, then one
    with django_capture_on_commit_callbacks(execute=True):
        services.sources_enqueue([11, 12, 13, 14, 15], force=True)
        services.sources_enqueue([16])
    # then the five go in tasks of two, three, and the single one in a task of its own
    assert sent == [("many", [11, 12], True), ("many", [13, 14], True), ("many", [15], True), ("one", 16, False)]


def test_reupload_to_a_storage_that_overwrites_same_names_keeps_the_new_file(
    media_root, queued_by_hand, settings, django_capture_on_commit_callbacks
):
    # given a storage that writes a file of an existing name over it instead of choosing a new name
    # (django-storages' S3Storage does with its default file_overwrite=True), and v1 uploaded
    settings.STORAGES = {**settings.STORAGES, "default": {
        "BACKEND": "django.core.files.storage.FileSystemStorage", "OPTIONS": {"allow_overwrite": True}}}
    with django_capture_on_commit_callbacks(execute=True):
        first = services.source_upload(filename="returns.md", data=RETURNS_MD.encode())
    # when v2 is uploaded under the same name
    with django_capture_on_commit_callbacks(execute=True):
        second = services.source_upload(filename="returns.md", data=RETURNS_V2_MD.encode())
    # then v2 took v1's storage name, and its file was not deleted as "the replaced pending file"
    second.refresh_from_db()
    assert second.pending_file.name == first.pending_file.name
    assert (second.status, second.pending_version) == ("queued", 2)
    assert files_in(media_root) == [media_root / second.pending_file.name]
    assert (media_root / second.pending_file.name).read_bytes() == RETURNS_V2_MD.encode()
    assert queued_by_hand == [first.pk, first.pk]

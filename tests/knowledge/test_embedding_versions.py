"""Embedding-model versions (``knowledge.services.embedding_versions``) on real Postgres + pgvector with
the real MiniLM embedder and candidates made from it (a Dense layer on top: one of the same dimension,
one of 128): the shadow re-embedding while the active version serves, ingestion during a build,
a killed build, the search of a candidate's vectors, atomic promotion for every reader and process,
rollback from the kept vectors, another dimension; promotion and rollback queued by the admin and run
by a worker (one at a time, failures given back with the reason, a lost task given back by the sweep);
a conversation search whose two searches straddle a promotion."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from knowledge import embedding as embedding_module
from knowledge import services
from knowledge.models import Chunk, ChunkEmbedding, EmbeddingModelVersion, Source
from knowledge.selectors import chunk_search
from knowledge.services import embedding_versions
from knowledge.services.reembedding import embedding_text

PAGES = {
    "passports.md": "# Passports\n\nRenewal takes six to eight weeks after we receive your form.\n\n"
                    "A passport photo must be two by two inches, in colour.",
    "fines.md": "# Fines\n\nParking penalties may be paid with a credit or debit card online.\n\n"
                "Speeding tickets add points to your driving record.",
    "benefits.md": "# Benefits\n\nA widow or widower aged 60 or older may receive survivor payments.\n\n"
                   "Report a death by calling our office.",
}
QUESTION = "How long does it take to renew a passport?"


class WorkerKilled(Exception):
    """Stands for a worker killed in the middle of a build."""


@pytest.fixture(scope="session")
def candidate_folders(tmp_path_factory) -> dict[str, Path]:
    """Two sentence-transformers folders built from the settings' MiniLM with a seeded Dense layer on
    top: ``"same"`` (384 -> 384, identity plus noise: other vectors, same dimension) and ``"narrow"``
    (384 -> 128: another dimension)."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Dense

    base = SentenceTransformer(settings.EMBEDDING_MODEL, device="cpu")
    generator = torch.Generator().manual_seed(0)
    folders = {}
    for name, dimension in (("same", 384), ("narrow", 128)):
        noise = torch.randn(dimension, 384, generator=generator) / 384 ** 0.5
        weight = torch.eye(384) + 1.5 * noise if dimension == 384 else noise
        model = SentenceTransformer(modules=[*base, Dense(384, dimension, bias=False, activation_function=None,
                                                          init_weight=weight)], device="cpu")
        folder = tmp_path_factory.mktemp("embedder") / name
        model.save(str(folder))
        folders[name] = folder
    return folders


def ingest(pages: dict[str, str]) -> list[Source]:
    made = []
    for name, text in pages.items():
        source = services.source_upload(filename=name, data=text.encode())
        assert services.document_ingest(source.pk).status == "ingested"
        made.append(source)
    return made


def served_vectors() -> dict[int, tuple[str, bytes]]:
    """Every chunk's ``embedding_model`` and vector bytes (float32), by chunk id."""
    return {c.pk: (c.embedding_model, np.asarray(c.embedding, dtype=np.float32).tobytes())
            for c in Chunk.objects.order_by("pk")}


def shadow_vectors(version_id: int) -> dict[int, np.ndarray]:
    return {row.chunk_id: np.asarray(row.embedding, dtype=np.float32)
            for row in ChunkEmbedding.objects.filter(version_id=version_id)}


def expected_vectors(folder: Path, version: EmbeddingModelVersion) -> dict[int, np.ndarray]:
    """What ``folder``'s model makes of every chunk's embedded text, by chunk id."""
    chunks = list(Chunk.objects.select_related("source").order_by("pk"))
    encoder = embedding_module.encoder_for(embedding_module.version_embedding(version))
    vectors = encoder.encode([embedding_text(c.source, c) for c in chunks])
    return {c.pk: vector for c, vector in zip(chunks, vectors)}


def ranking(results) -> list[tuple[int, float | None]]:
    """A ranking's signature: chunk ids with their vector distances (which say which vectors were read)."""
    return [(r.chunk_id, None if r.vector_distance is None else round(r.vector_distance, 4)) for r in results]


def index_names() -> set[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexname FROM pg_indexes WHERE tablename IN ('knowledge_chunk', 'knowledge_chunkembedding')")
        return {row[0] for row in cursor.fetchall()}


def column_dimension() -> int:
    with connection.cursor() as cursor:
        return embedding_versions._stored_dimension(cursor)


def built(folder: Path, name: str = "candidate", **build) -> EmbeddingModelVersion:
    version = services.embedding_version_register(name=name, path=folder)
    return services.embedding_version_build(version.pk, **build)


@pytest.fixture
def encode_calls(monkeypatch) -> list[int]:
    """The number of texts of every ``EmbeddingModel.encode`` call from now on."""
    calls: list[int] = []
    real = embedding_module.EmbeddingModel.encode

    def counting(self, texts, batch_size=None):
        calls.append(len(texts))
        return real(self, texts, batch_size)

    monkeypatch.setattr(embedding_module.EmbeddingModel, "encode", counting)
    return calls


def test_a_candidate_is_built_in_shadow_vectors_while_the_active_version_serves_untouched(db, candidate_folders):
    # Given an ingested knowledge base served by the settings' model (no version registered yet)
    ingest(PAGES)
    assert not EmbeddingModelVersion.objects.exists()
    before, served = served_vectors(), ranking(chunk_search(QUESTION, k=5))

    # When a candidate is registered and built one chunk per batch (each page is one chunk)
    version = services.embedding_version_register(name="candidate", path=candidate_folders["same"], note="test")
    progress = []
    version = services.embedding_version_build(version.pk, batch_size=1, on_progress=progress.append)

    # Then the settings' model became the registered active version, and the candidate is ready with
    # one vector per chunk, each the candidate's embedding of the chunk's text
    active = EmbeddingModelVersion.objects.get(status="active")
    assert (active.name, active.dimension, active.model_id) == (settings.EMBEDDING_MODEL_NAME, 384,
                                                               embedding_module.settings_model_id())
    assert len(active.sha256) == 64
    assert (version.status, version.progress, version.chunks_done, version.chunks_total) == ("ready", 1.0, 3, 3)
    assert version.dimension == 384 and version.ready_at is not None and len(version.sha256) == 64
    assert progress == [0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]
    shadow, expected = shadow_vectors(version.pk), expected_vectors(candidate_folders["same"], version)
    assert set(shadow) == set(expected) == set(before)
    assert all(np.allclose(shadow[pk], expected[pk], atol=1e-5) for pk in shadow)
    # and its partial HNSW index exists
    assert version.index_name in index_names()
    # and what is served did not change: the same vectors, the same ranking
    assert served_vectors() == before
    assert ranking(chunk_search(QUESTION, k=5)) == served
    assert embedding_module.model_id() == embedding_module.settings_model_id()

    # When the candidate's vectors are searched (the gate's path), then its encoder and vectors are used
    candidate = chunk_search(QUESTION, k=5, embedding_version=version.pk)
    query = embedding_module.encoder_for(embedding_module.version_embedding(version)).encode([QUESTION])[0]
    best = candidate[0]
    assert best.vector_distance == pytest.approx(1 - float(query @ shadow[best.chunk_id]), abs=1e-4)
    assert ranking(candidate) != served
    # and the active version's id searches the served vectors
    assert ranking(chunk_search(QUESTION, k=5, embedding_version=active.pk)) == served


def test_ingestion_during_a_build_lands_in_both_versions_and_a_deleted_chunk_leaves_both(db, candidate_folders):
    # Given a knowledge base and a candidate that is still building
    ingest({"passports.md": PAGES["passports.md"]})
    version = services.embedding_version_register(name="candidate", path=candidate_folders["same"])

    # When a page is ingested meanwhile
    [fines] = ingest({"fines.md": PAGES["fines.md"]})

    # Then its chunks are served with the active version's vectors and stored under the candidate with its own
    new_chunks = list(Chunk.objects.filter(source=fines).select_related("source"))
    assert len(new_chunks) == 1
    active = embedding_module.settings_encoder()
    for chunk in new_chunks:
        assert chunk.embedding_model == embedding_module.settings_model_id()
        assert np.allclose(np.asarray(chunk.embedding), active.encode([embedding_text(fines, chunk)])[0], atol=1e-5)
    shadow, expected = shadow_vectors(version.pk), expected_vectors(candidate_folders["same"], version)
    assert set(shadow) == {c.pk for c in new_chunks}
    assert all(np.allclose(shadow[pk], expected[pk], atol=1e-5) for pk in shadow)

    # When the build runs, then it embeds only the chunks it lacked, and all are there
    version = services.embedding_version_build(version.pk)
    assert version.status == "ready" and set(shadow_vectors(version.pk)) == set(Chunk.objects.values_list("pk", flat=True))

    # When the page is deleted, then its chunks leave both versions
    services.source_delete(fines)
    assert set(shadow_vectors(version.pk)) == set(Chunk.objects.values_list("pk", flat=True))
    assert not ChunkEmbedding.objects.filter(chunk_id__in=[c.pk for c in new_chunks]).exists()


def test_the_final_catch_up_embeds_chunks_the_ingesting_process_could_not(db, candidate_folders, monkeypatch):
    # Given a building candidate whose folder the ingesting process cannot load
    ingest({"passports.md": PAGES["passports.md"]})
    version = services.embedding_version_register(name="candidate", path=candidate_folders["same"])
    real = embedding_module.encoder_for

    def unreadable(found):
        if found.version_id == version.pk:
            raise OSError("no such folder on this host")
        return real(found)

    monkeypatch.setattr(embedding_module, "encoder_for", unreadable)
    [fines] = ingest({"fines.md": PAGES["fines.md"]})
    # then ingestion succeeded without the candidate's vectors
    assert not ChunkEmbedding.objects.filter(chunk__source=fines).exists()

    # When the build runs where the folder is readable, then the chunks ingested meanwhile are embedded too
    monkeypatch.setattr(embedding_module, "encoder_for", real)
    version = services.embedding_version_build(version.pk)
    assert version.status == "ready"
    assert set(shadow_vectors(version.pk)) == set(Chunk.objects.values_list("pk", flat=True))


def test_a_killed_build_leaves_the_active_version_serving_is_resumable_and_is_failed_when_stale(db, candidate_folders,
                                                                                               settings):
    # Given a knowledge base (three chunks) and a candidate whose build dies after its first batch (two)
    ingest(PAGES)
    before, served = served_vectors(), ranking(chunk_search(QUESTION, k=5))
    version = services.embedding_version_register(name="candidate", path=candidate_folders["same"])

    def die(share):
        if share > 0:
            raise WorkerKilled("worker killed")

    with pytest.raises(WorkerKilled):
        services.embedding_version_build(version.pk, batch_size=2, on_progress=die)

    # Then the half-built shadow holds one batch, never serves, and the active version serves as before
    version.refresh_from_db()
    assert version.status == "building" and ChunkEmbedding.objects.filter(version=version).count() == 2
    assert ranking(chunk_search(QUESTION, k=5)) == served and served_vectors() == before
    with pytest.raises(services.EmbeddingVersionError, match="only a ready or retired version"):
        services.embedding_version_activate(version.pk)

    # When the builder is silent for longer than EMBEDDING_VERSION_STALE_S, then the stale check fails it
    EmbeddingModelVersion.objects.filter(pk=version.pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=settings.EMBEDDING_VERSION_STALE_S + 1))
    assert services.embedding_versions_fail_stale() == 1
    version.refresh_from_db()
    assert version.status == "failed" and version.reason.startswith("the re-embedding stopped reporting")
    # and its shadow vectors and index are gone, serving still untouched
    assert not ChunkEmbedding.objects.filter(version=version).exists()
    assert version.index_name not in index_names()
    assert ranking(chunk_search(QUESTION, k=5)) == served and served_vectors() == before
    assert EmbeddingModelVersion.objects.get(status="active").model_id == embedding_module.settings_model_id()

    # Given another candidate killed the same way, when its build is run again, then it resumes
    again = services.embedding_version_register(name="again", path=candidate_folders["same"])
    with pytest.raises(WorkerKilled):
        services.embedding_version_build(again.pk, batch_size=2, on_progress=die)
    resumed = services.embedding_version_build(again.pk, batch_size=2)
    assert resumed.status == "ready" and ChunkEmbedding.objects.filter(version=again).count() == 3


def test_promotion_switches_vectors_and_query_encoder_and_rollback_restores_without_re_embedding(db, candidate_folders,
                                                                                                 encode_calls):
    # Given a served knowledge base and a ready candidate, and a query vector made before the switch
    ingest(PAGES)
    before, served = served_vectors(), ranking(chunk_search(QUESTION, k=5))
    old_query = embedding_module.get_embedding_model().encode([QUESTION])[0]
    version = built(candidate_folders["same"])
    candidate_shadow = shadow_vectors(version.pk)
    candidate_ranking = ranking(chunk_search(QUESTION, k=5, embedding_version=version.pk))
    first = EmbeddingModelVersion.objects.get(status="active")

    # When it is promoted
    promoted = services.embedding_version_activate(version.pk, note="test")

    # Then its vectors serve, the previous ones are kept under the previous version, statuses flipped
    assert (promoted.status, promoted.reason, promoted.promoted_at is not None) == ("active", "test", True)
    first.refresh_from_db()
    assert first.status == "retired" and first.retired_at is not None
    after = served_vectors()
    assert {model for model, _ in after.values()} == {version.model_id}
    assert all(np.allclose(np.frombuffer(after[pk][1], np.float32), candidate_shadow[pk]) for pk in after)
    kept = shadow_vectors(first.pk)
    assert {pk: vector.tobytes() for pk, vector in kept.items()} == {pk: v for pk, (_, v) in before.items()}
    assert not ChunkEmbedding.objects.filter(version=version).exists()
    assert version.index_name not in index_names() and "chunk_embedding_hnsw" in index_names()
    # and the query encoder follows: the process embeds with the candidate, searches give its ranking,
    # and a query vector made by the old encoder is not searched against the new vectors
    assert embedding_module.get_embedding_model().model_id == version.model_id == embedding_module.model_id()
    assert ranking(chunk_search(QUESTION, k=5)) == candidate_ranking
    assert ranking(chunk_search(QUESTION, k=5, query_embedding=old_query)) == candidate_ranking
    # and a second active version is refused by the database
    with pytest.raises(IntegrityError), transaction.atomic():
        EmbeddingModelVersion.objects.filter(pk=first.pk).update(status="active")

    # When it is rolled back (one action)
    encode_calls.clear()
    rolled = services.embedding_version_rollback()

    # Then the previous vectors serve again, byte for byte, without a single encode call
    assert rolled.pk == first.pk and encode_calls == []
    assert served_vectors() == before
    assert ranking(chunk_search(QUESTION, k=5)) == served
    version.refresh_from_db()
    assert version.status == "retired" and set(shadow_vectors(version.pk)) == set(before)
    assert list(EmbeddingModelVersion.objects.filter(status="active").values_list("pk", flat=True)) == [first.pk]
    # and rolling forward again needs no re-embedding either
    encode_calls.clear()
    services.embedding_version_rollback()
    assert encode_calls == [] and {m for m, _ in served_vectors().values()} == {version.model_id}


def test_a_search_during_a_promotion_sees_the_old_version_or_the_new_one_never_a_mix(transactional_db, candidate_folders,
                                                                                     monkeypatch):
    # Given a ready candidate whose ranking differs from the served one
    ingest(PAGES)
    version = built(candidate_folders["same"])
    old = ranking(chunk_search(QUESTION, k=5))
    new = ranking(chunk_search(QUESTION, k=5, embedding_version=version.pk))
    assert old != new
    # and a reader that pauses right after reading the active version, until the promotion committed
    read_version, promoted = threading.Event(), threading.Event()
    real = embedding_module.active_embedding

    def pausing():
        found = real()
        if threading.current_thread().name == "reader" and not read_version.is_set():
            read_version.set()
            assert promoted.wait(60)
        return found

    monkeypatch.setattr(embedding_module, "active_embedding", pausing)
    seen, errors = {}, []

    def reader():
        try:
            seen["during"] = ranking(chunk_search(QUESTION, k=5))
            seen["after"] = ranking(chunk_search(QUESTION, k=5))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)
        finally:
            connection.close()

    thread = threading.Thread(target=reader, name="reader")
    thread.start()
    assert read_version.wait(60)

    # When the candidate is promoted while the reader is between its version read and its search
    services.embedding_version_activate(version.pk)
    promoted.set()
    thread.join(60)

    # Then the reader saw the old version whole (its snapshot), and its next search the new one whole
    assert errors == [] and not thread.is_alive()
    assert seen == {"during": old, "after": new}


def test_every_process_follows_the_promotion_with_its_own_encoder(transactional_db, candidate_folders):
    # Given a ready candidate, and another thread (its own connection) that has searched with the active version
    ingest(PAGES)
    version = built(candidate_folders["same"])
    old = ranking(chunk_search(QUESTION, k=5))
    new = ranking(chunk_search(QUESTION, k=5, embedding_version=version.pk))
    searched, switched, seen = threading.Event(), threading.Event(), {}

    def other_process():
        try:
            seen["before"] = (embedding_module.get_embedding_model().model_id, ranking(chunk_search(QUESTION, k=5)))
            searched.set()
            assert switched.wait(60)
            seen["after"] = (embedding_module.get_embedding_model().model_id, ranking(chunk_search(QUESTION, k=5)))
        finally:
            connection.close()

    thread = threading.Thread(target=other_process)
    thread.start()
    assert searched.wait(60)

    # When this one promotes the candidate
    services.embedding_version_activate(version.pk)
    switched.set()
    thread.join(60)

    # Then the other one embeds and searches with the new version on its next search, without a restart
    assert seen["before"] == (embedding_module.settings_model_id(), old)
    assert seen["after"] == (version.model_id, new)


def test_a_candidate_of_another_dimension_builds_serves_ingests_and_rolls_back(db, candidate_folders, encode_calls):
    # Given a served knowledge base and a 128-dimensional candidate
    ingest(PAGES)
    before, served = served_vectors(), ranking(chunk_search(QUESTION, k=5))
    version = built(candidate_folders["narrow"], name="narrow")
    assert version.dimension == 128 and version.status == "ready"
    shadow = shadow_vectors(version.pk)
    assert {len(v) for v in shadow.values()} == {128}
    candidate_ranking = ranking(chunk_search(QUESTION, k=5, embedding_version=version.pk))
    assert column_dimension() == 384

    # When it is promoted
    services.embedding_version_activate(version.pk)

    # Then the column and its index were rebuilt for 128 dimensions and hold its vectors
    assert column_dimension() == 128 and "chunk_embedding_hnsw" in index_names()
    after = served_vectors()
    assert all(np.allclose(np.frombuffer(after[pk][1], np.float32), shadow[pk]) for pk in after)
    assert ranking(chunk_search(QUESTION, k=5)) == candidate_ranking
    # and a page ingested now is embedded with it
    [licences] = ingest({"more.md": "# Licences\n\nA driving licence is renewed every ten years."})
    chunk = Chunk.objects.get(source=licences)
    assert chunk.embedding_model == version.model_id and len(chunk.embedding) == 128

    # When it is rolled back, then 384 dimensions serve again with the kept vectors: only the new page's
    # chunk is embedded (one text), every other chunk's vector is the one it had
    encode_calls.clear()
    services.embedding_version_rollback()
    assert column_dimension() == 384 and encode_calls == [1]
    restored = served_vectors()
    assert {pk: restored[pk] for pk in before} == before
    assert restored[chunk.pk][0] == embedding_module.settings_model_id()
    services.source_delete(licences)  # the same chunks as at first
    assert ranking(chunk_search(QUESTION, k=5)) == served


def test_an_unknown_or_changed_candidate_folder_is_refused_and_nothing_changes(db, candidate_folders, tmp_path):
    # Given a served knowledge base
    ingest(PAGES)
    before = served_vectors()
    # When a missing folder is registered, then it is refused and no version is stored
    with pytest.raises(services.EmbeddingVersionError, match="folder not found"):
        services.embedding_version_register(name="missing", path=tmp_path / "nothing")
    assert not EmbeddingModelVersion.objects.exists()

    # Given a ready candidate whose folder changed since it was registered
    import shutil

    folder = tmp_path / "copy"
    shutil.copytree(candidate_folders["same"], folder)
    version = built(folder)
    (folder / "extra.txt").write_text("changed")
    # When it is promoted, then it is refused with the reason recorded and nothing changes
    with pytest.raises(services.EmbeddingVersionError, match="changed since it was registered"):
        services.embedding_version_activate(version.pk)
    version.refresh_from_db()
    assert version.status == "ready" and "changed since it was registered" in version.reason
    assert served_vectors() == before
    assert EmbeddingModelVersion.objects.get(status="active").model_id == embedding_module.settings_model_id()


def messages(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.fixture
def sent_promotions(monkeypatch) -> list[tuple[tuple, dict]]:
    """The ``knowledge.activate_embedding_version`` tasks sent from now on (``(args, kwargs)``); not run."""
    from knowledge import tasks

    sent: list[tuple[tuple, dict]] = []
    monkeypatch.setattr(tasks.activate_embedding_version, "apply_async",
                        lambda args, kwargs: sent.append((tuple(args), dict(kwargs))))
    return sent


def test_the_admin_queues_a_promotion_and_a_rollback_and_a_worker_switches(db, candidate_folders, admin_client,
                                                                           sent_promotions,
                                                                           django_capture_on_commit_callbacks):
    from django.urls import reverse

    from knowledge import tasks

    # Given a served knowledge base and a ready candidate
    ingest(PAGES)
    before = served_vectors()
    version = built(candidate_folders["same"])
    first = EmbeddingModelVersion.objects.get(status="active")
    url = reverse("admin:knowledge_embeddingmodelversion_changelist")
    page = admin_client.get(url)
    assert page.status_code == 200 and b"Promote the selected version" in page.content
    assert b'http-equiv="refresh"' not in page.content

    # When an admin promotes it
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, {"action": "promote", "_selected_action": [version.pk]}, follow=True)

    # Then the request only queued it: the version is promoting, one task was sent, nothing served changed
    assert response.status_code == 200
    assert messages(response) == [f"promotion of {version.model_id} queued: it is promoting, and serves once a "
                                  "worker has switched every process (this page refreshes itself)"]
    assert sent_promotions == [((version.pk,), {"note": "promoted by admin"})]
    version.refresh_from_db()
    assert (version.status, version.promoting_from) == ("promoting", "ready")
    assert version.promotion_requested_at is not None
    assert served_vectors() == before and EmbeddingModelVersion.objects.get(status="active").pk == first.pk
    # and the list refreshes itself while it promotes
    assert b'http-equiv="refresh"' in response.content and b"Promoting" in response.content

    # When they press it again before the worker ran, then nothing more is queued (compare-and-set)
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, {"action": "promote", "_selected_action": [version.pk]}, follow=True)
    assert messages(response) == [f"not promoted: {version.model_id} is promoting; only a ready or retired version "
                                  "can be promoted"]
    assert len(sent_promotions) == 1

    # When the worker runs the task, then the candidate serves
    assert tasks.activate_embedding_version(*sent_promotions[0][0], **sent_promotions[0][1]) == "active"
    version.refresh_from_db()
    assert (version.status, version.reason, version.promoting_from) == ("active", "promoted by admin", "")
    assert {model for model, _ in served_vectors().values()} == {version.model_id}
    # and a second delivery of the same task changes nothing
    assert tasks.activate_embedding_version(*sent_promotions[0][0], **sent_promotions[0][1]) == "active"

    # When they promote the active version, then they are told why and nothing is queued
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, {"action": "promote", "_selected_action": [version.pk]}, follow=True)
    assert messages(response) == [f"not promoted: {version.model_id} is active; only a ready or retired version "
                                  "can be promoted"]
    assert len(sent_promotions) == 1

    # When they roll back, then the previous version is promoting, and serves once the worker ran
    with django_capture_on_commit_callbacks(execute=True):
        response = admin_client.post(url, {"action": "roll_back", "_selected_action": [version.pk]}, follow=True)
    assert messages(response) == [f"rollback to {first.model_id} queued: it is promoting, and serves once a worker "
                                  "has switched every process (this page refreshes itself)"]
    assert sent_promotions[1] == ((first.pk,), {"note": "rolled back by admin"})
    first.refresh_from_db()
    assert (first.status, first.promoting_from) == ("promoting", "retired")
    assert {model for model, _ in served_vectors().values()} == {version.model_id}
    assert tasks.activate_embedding_version(*sent_promotions[1][0], **sent_promotions[1][1]) == "active"
    assert served_vectors() == before


def test_a_queued_promotion_is_run_by_a_real_worker(celery_worker_real, candidate_folders):
    import time

    def wait_for(done) -> None:
        deadline = time.monotonic() + 120
        while not done() and time.monotonic() < deadline:
            time.sleep(0.2)

    # Given pages the real Celery worker (default queue) ingested, and a ready candidate
    for name, text in PAGES.items():
        services.source_upload(filename=name, data=text.encode())
    wait_for(lambda: set(Source.objects.values_list("status", flat=True)) == {"ready"})
    assert set(Source.objects.values_list("status", flat=True)) == {"ready"}
    version = built(candidate_folders["same"])

    # When its promotion is requested outside any transaction (the task is sent at once)
    requested = services.embedding_version_promotion_request(version.pk, note="promoted by a test")
    assert requested.status == "promoting"

    # Then the worker switches every chunk to it, with the note as its reason
    wait_for(lambda: EmbeddingModelVersion.objects.get(pk=version.pk).status != "promoting")
    version.refresh_from_db()
    assert (version.status, version.reason) == ("active", "promoted by a test")
    assert {model for model, _ in served_vectors().values()} == {version.model_id}


def test_a_failed_switch_leaves_the_active_version_serving_and_records_why(db, candidate_folders, monkeypatch,
                                                                            tmp_path):
    import shutil

    from knowledge import tasks

    # Given a served knowledge base and a ready candidate (in a folder of its own) whose promotion was requested
    ingest(PAGES)
    before = served_vectors()
    folder = tmp_path / "copy"
    shutil.copytree(candidate_folders["same"], folder)
    version = built(folder)
    shadow = shadow_vectors(version.pk)
    services.embedding_version_promotion_request(version.pk, note="test", enqueue=False)

    # When the switch breaks inside its transaction (after the vectors were copied)
    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(embedding_versions, "_drop_shadow", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        tasks.activate_embedding_version(version.pk, note="test")

    # Then the version is ready again with the reason, and nothing else changed: same vectors served,
    # same active version, the candidate's shadow vectors kept, nothing retired
    version.refresh_from_db()
    active = EmbeddingModelVersion.objects.get(status="active")
    assert (version.status, version.promoting_from) == ("ready", "")
    assert version.reason == f"promotion failed: disk full; {active.model_id} kept serving"
    assert served_vectors() == before and active.model_id == embedding_module.settings_model_id()
    assert set(shadow_vectors(version.pk)) == set(shadow)
    assert not EmbeddingModelVersion.objects.filter(status="retired").exists()

    # Given its folder changed since, when it is requested and run again, then it is refused the same way
    monkeypatch.undo()
    (folder / "extra.txt").write_text("changed")
    services.embedding_version_promotion_request(version.pk, enqueue=False)
    assert tasks.activate_embedding_version(version.pk) == "ready"
    version.refresh_from_db()
    assert version.status == "ready" and version.reason.startswith("promotion failed: the model folder of")
    assert "changed since it was registered" in version.reason and served_vectors() == before


def test_one_promotion_at_a_time_and_a_request_nobody_ran_is_given_back(db, candidate_folders, settings):
    # Given two ready candidates
    ingest(PAGES)
    first = built(candidate_folders["same"], name="first")
    second = built(candidate_folders["narrow"], name="second")

    # When both are requested, then the second is refused while the first is promoting
    services.embedding_version_promotion_request(first.pk, enqueue=False)
    with pytest.raises(services.EmbeddingVersionError, match=f"{first.model_id} is being promoted"):
        services.embedding_version_promotion_request(second.pk, enqueue=False)
    second.refresh_from_db()
    assert second.status == "ready" and second.promoting_from == ""
    # and the database refuses a second promoting version whatever the code does
    with pytest.raises(IntegrityError), transaction.atomic():
        EmbeddingModelVersion.objects.filter(pk=second.pk).update(status="promoting")

    # When no worker reports for longer than EMBEDDING_VERSION_STALE_S (its task was lost), then the
    # stale sweep gives the request back with the reason, and the active version still serves
    EmbeddingModelVersion.objects.filter(pk=first.pk).update(
        heartbeat_at=timezone.now() - timedelta(seconds=settings.EMBEDDING_VERSION_STALE_S + 1))
    assert services.embedding_versions_fail_stale() == 1
    first.refresh_from_db()
    assert first.status == "ready" and first.reason.startswith("the promotion did not run or stopped reporting")
    assert embedding_module.model_id() == embedding_module.settings_model_id()
    # and a late delivery of its task does nothing
    assert services.embedding_version_promotion_run(first.pk).status == "ready"
    assert embedding_module.model_id() == embedding_module.settings_model_id()


def test_a_promotion_the_task_queue_could_not_take_is_given_back(db, candidate_folders, monkeypatch,
                                                                 django_capture_on_commit_callbacks):
    from kombu.exceptions import OperationalError

    from config.task_queue import unsent_reason
    from knowledge import tasks

    # Given a ready candidate and an unreachable task queue
    ingest(PAGES)
    version = built(candidate_folders["same"])

    def unreachable(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(tasks.activate_embedding_version, "apply_async", unreachable)

    # When its promotion is requested, then it is ready again with the reason once the send failed
    with django_capture_on_commit_callbacks(execute=True):
        assert services.embedding_version_promotion_request(version.pk).status == "promoting"
    version.refresh_from_db()
    assert (version.status, version.reason) == ("ready", unsent_reason("promotion"))
    assert embedding_module.model_id() == embedding_module.settings_model_id()


def test_a_conversation_search_sees_one_version_even_if_a_promotion_commits_between_its_searches(
        transactional_db, candidate_folders, monkeypatch):
    from knowledge import selectors

    # Given a ready candidate, and a follow-up that refers back (retrieved with its history: two searches)
    ingest(PAGES)
    version = built(candidate_folders["same"])
    history = [{"role": "user", "text": "I need to renew my passport."}, {"role": "assistant", "text": "Sure."}]
    question = "How long does it take?"

    def signature(found):
        return (found.follow_up, found.query, found.model_id, ranking(found.chunks),
                None if found.distance is None else round(found.distance, 4),
                None if found.question_distance is None else round(found.question_distance, 4))

    old = signature(selectors.conversation_search(question, history))
    assert old[0] == "refers back"  # its chunks come from the second search

    # and a search whose first chunk_search is followed by the candidate's promotion (another connection)
    real, calls = selectors.chunk_search, []

    def promoting_after_the_first(*args, **kwargs):
        found = real(*args, **kwargs)
        calls.append(args[0])
        if len(calls) == 1:
            def promote():
                try:
                    services.embedding_version_activate(version.pk)
                finally:
                    connection.close()

            thread = threading.Thread(target=promote)
            thread.start()
            thread.join(120)
            assert not thread.is_alive()
        return found

    monkeypatch.setattr(selectors, "chunk_search", promoting_after_the_first)

    # When the conversation search runs, then both searches read the version active when it began
    during = signature(selectors.conversation_search(question, history))
    assert len(calls) == 2 and EmbeddingModelVersion.objects.get(status="active").pk == version.pk
    assert during == old
    # and the next one reads the promoted version whole
    monkeypatch.setattr(selectors, "chunk_search", real)
    after = selectors.conversation_search(question, history)
    assert after.model_id == version.model_id and signature(after) != old


_SEARCHER = """
import json, sys
import django
django.setup()
from knowledge import embedding
from knowledge.selectors import chunk_search
for line in sys.stdin:
    results = chunk_search(line.strip(), k=5)
    print(json.dumps([embedding.get_embedding_model().model_id,
                      [[r.chunk_id, None if r.vector_distance is None else round(r.vector_distance, 4)]
                       for r in results]]), flush=True)
"""


def test_another_process_with_its_own_encoder_switches_on_its_next_search(transactional_db, candidate_folders):
    import json
    import os
    import subprocess
    import sys

    from tests.model_server import _database_environment

    # Given a ready candidate, and another process (its own Python, encoder cache and connection)
    # that has searched with the active version
    ingest(PAGES)
    version = built(candidate_folders["same"])
    old = [list(pair) for pair in ranking(chunk_search(QUESTION, k=5))]
    new = [list(pair) for pair in ranking(chunk_search(QUESTION, k=5, embedding_version=version.pk))]
    environment = {**os.environ, "DJANGO_SETTINGS_MODULE": "config.settings", "DEBUG": "false",
                   "EMBEDDED_SERVICES": "1", **_database_environment(connection.settings_dict["NAME"])}
    process = subprocess.Popen([sys.executable, "-c", _SEARCHER], cwd=Path(__file__).resolve().parents[2],
                               env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        def search() -> list:
            process.stdin.write(QUESTION + "\n")
            process.stdin.flush()
            return json.loads(process.stdout.readline())

        assert search() == [embedding_module.settings_model_id(), old]

        # When this process promotes the candidate
        services.embedding_version_activate(version.pk)

        # Then the other one embeds and searches with it on its next search, without a restart
        assert search() == [version.model_id, new]
    finally:
        process.stdin.close()
        process.wait(timeout=60)


def test_curated_question_vectors_of_a_candidate_are_its_shadow_vectors_of_the_question(db, candidate_folders):
    from sentence_transformers import SentenceTransformer

    from knowledge.selectors import curated_question_vectors

    # Given a curated answer (its one chunk embedded from the question) citing a passage
    (source, *_) = ingest(PAGES)
    source.refresh_from_db()
    passage = Chunk.objects.filter(source=source).order_by("ordinal").first()
    services.curated_answer_put(key="renewal", collection=source.collection, question=QUESTION,
                                answer="Six to eight weeks.", evidence=[{
                                    "source_id": source.pk, "start": passage.start, "end": passage.end,
                                    "content_hash": source.content_hash}])
    curated = Chunk.objects.get(source__kind="curated")

    # When a candidate of another dimension is built
    version = built(candidate_folders["narrow"])

    # Then the candidate's vector of the curated question is its encoding of the question alone (128 numbers),
    # and the active version's is the settings' model's (384), each keyed by the curated chunk
    (chunk_id, vector), = curated_question_vectors(embedding_version=version.pk).items()
    narrow = SentenceTransformer(str(candidate_folders["narrow"]), device="cpu")
    assert chunk_id == curated.pk and len(vector) == 128
    assert np.allclose(vector, narrow.encode([QUESTION], normalize_embeddings=True)[0], atol=1e-4)
    (chunk_id, vector), = curated_question_vectors().items()
    assert chunk_id == curated.pk and len(vector) == 384
    # and passages are not among them
    assert passage.pk not in curated_question_vectors(embedding_version=version.pk)

"""Embedder runs: fine-tune the sentence-embedding model on approved corrections, re-embed the
knowledge base with the candidate beside the served vectors, and promote it only when it wins on
held-out corrections through the serving retrieval.

``embedder_run_start`` snapshots the training examples of the approved, non-stale corrections
(``tuning.embedder_training.embedder_examples``, split by ``tuning.datasets.correction_split``) into a
queued ``EmbedderRun`` (one in progress at a time, a database constraint); the Celery task
``tuning.embedder_run`` (on the tuning queue) calls ``embedder_run_execute`` in a worker, which:

1. claims the run (a conditional update from ``queued``: a second delivery does nothing);
2. fine-tunes the active embedding version's model (``knowledge.embedding.active_embedding``; the
   settings' ``EMBEDDING_MODEL`` until a version was promoted) on the snapshot's training examples
   (``embedder_train``), recording the loss curve, progress and heartbeat, into
   ``TUNING_DIR/embedder-runs/<id>``;
3. registers the candidate as an embedding-model version (``knowledge.services.
   embedding_version_register``) and re-embeds every chunk into its shadow vectors
   (``embedding_version_build``; status ``reembedding``, progress on the run) while the active
   version keeps serving; ingestion meanwhile lands in both;
4. the gate (``tuning.embedder_evaluation.embedder_gate_compare`` / ``embedder_gate_decide``):
   passage-hit@1/5/10, document-hit@5 and MRR@10 of the active and the candidate version through
   ``chunk_search`` on the held-out corrections, a paired bootstrap of the MRR gain; the candidate's
   abstention thresholds and own-words margin fitted to its distance scale (``abstention_calibrate``)
   and its curated-answer match threshold (``curated_match_calibrate``), stored on its version, and
   the answerable / unanswerable questions each version declines with its own; the
   decision and its numbers are stored on the run (``evaluation``, ``decision``);
5. a candidate that wins is promoted (status ``promoting``; ``knowledge.services.
   embedding_version_promotion_request`` then ``embedding_version_promotion_run`` in this worker:
   every process switches to its vectors, query encoder and thresholds at once;
   ``TUNING_EMBEDDER_AUTO_PROMOTE`` off leaves it ready for an admin, whose promotion is queued);
   one that loses is ``rejected`` and its shadow vectors dropped.

Any error marks the run ``failed`` with the reason (and its version failed); the active version keeps
serving. Rollback is one action on the version (``embedding_version_rollback``; admin "Roll back").
``embedder_run_scheduled_check`` (periodic) starts a run when ``TUNING_EMBEDDER_MIN_NEW_CORRECTIONS``
approved corrections are new since the last run.
"""

from __future__ import annotations

import logging
import random
import resource
import time
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from config.task_queue import task_enqueue_on_commit, unsent_reason
from knowledge import services as knowledge_services
from knowledge.embedding import active_embedding, folder_sha256
from tuning.models import Correction, EmbedderRun

logger = logging.getLogger(__name__)

_SAVE_EVERY_S = 2.0


class EmbedderRunError(Exception):
    """An embedder run cannot start (one in progress, too few examples, no model folder); nothing stored."""


def embedder_hyperparameters_from_settings(**overrides):
    """``EmbedderHyperparameters`` from the ``TUNING_EMBEDDER_*`` settings and ``TUNING_SEED``, with ``overrides``."""
    from tuning.embedder_training import EmbedderHyperparameters

    values = {
        "epochs": settings.TUNING_EMBEDDER_EPOCHS, "batch_size": settings.TUNING_EMBEDDER_BATCH_SIZE,
        "learning_rate": settings.TUNING_EMBEDDER_LEARNING_RATE,
        "max_seq_length": settings.TUNING_EMBEDDER_MAX_SEQ_LENGTH,
        "mini_batch_size": settings.TUNING_EMBEDDER_MINI_BATCH_SIZE, "seed": settings.TUNING_SEED,
    }
    values.update(overrides)
    return EmbedderHyperparameters(**values)


def embedder_runs_fail_stale(now=None) -> int:
    """Mark failed every in-progress embedder run whose worker has not reported (``heartbeat_at``,
    or ``created_at`` while queued) for ``TUNING_RUN_STALE_S`` seconds (a killed worker). Returns how many.

    A run whose row its worker holds locked is skipped: it is switching its version in (the
    promotion's one transaction, minutes at 100k chunks, writes no heartbeat until it commits, and
    then writes one)."""
    now = now or timezone.now()
    cutoff = now - timedelta(seconds=settings.TUNING_RUN_STALE_S)
    count = 0
    for run in EmbedderRun.objects.filter(status__in=EmbedderRun.IN_PROGRESS):
        last = run.heartbeat_at or run.created_at
        if last < cutoff:
            reason = f"the worker stopped reporting during {run.status} (no heartbeat since {last:%Y-%m-%d %H:%M:%S})"
            with transaction.atomic():
                if EmbedderRun.objects.select_for_update(skip_locked=True).filter(
                        pk=run.pk, status=run.status, heartbeat_at=run.heartbeat_at).values_list("pk").first() is None:
                    continue  # its worker holds it (a switch under way) or it reported meanwhile
                failed = EmbedderRun.objects.filter(pk=run.pk).update(
                    status=EmbedderRun.Status.FAILED, finished_at=now, error=reason)
            if failed and run.embedding_version_id:  # its half-built shadow never served; drop it
                knowledge_services.embedding_version_fail(run.embedding_version_id, f"embedder run {run.pk}: {reason}")
            count += failed
    knowledge_services.embedding_versions_fail_stale(now)
    return count


def unanswerable_questions(corrections) -> list[str]:
    """The retrieval queries (``knowledge.selectors.retrieval_query``: the question, then the earlier
    user questions) of ``corrections`` without evidence chunks: questions agents marked unanswerable
    from the knowledge base, and seeded out-of-scope ones. Each once, in the corrections' order. The
    embedder never trains on them, so all of them serve the gate's abstention check."""
    from knowledge.selectors import retrieval_query

    found = [retrieval_query(c.question, c.history or []) for c in corrections
             if not any(chunk.get("text") for chunk in c.supporting_chunks or []) and c.question.strip()]
    return list(dict.fromkeys(found))


def embedder_run_start(*, trigger: str = "manual", requested_by=None, hyperparameters: dict | None = None,
                       holdout_share: float | None = None, max_examples: int | None = None,
                       enqueue: bool = True) -> EmbedderRun:
    """Snapshot the examples of the approved, non-stale corrections and queue an embedder run on the
    active embedding version's model (``settings.EMBEDDING_MODEL`` until a version was promoted). ``holdout_share`` defaults to
    ``TUNING_HOLDOUT_SHARE``; ``max_examples`` (default ``TUNING_EMBEDDER_MAX_EXAMPLES``, 0 = all)
    keeps a seeded sample of the training examples. ``enqueue`` sends the Celery task after commit.

    Raises ``EmbedderRunError`` (nothing stored) when a run is in progress, there are fewer than 2
    training examples or no held-out one, or the model folder is missing; ``ValueError`` for invalid
    hyper-parameters.
    """
    from tuning.embedder_training import embedder_examples, examples_sha256

    embedder_runs_fail_stale()
    if EmbedderRun.objects.filter(status__in=EmbedderRun.IN_PROGRESS).exists():
        raise EmbedderRunError("an embedder run is already in progress")
    hp = embedder_hyperparameters_from_settings(**(hyperparameters or {}))
    share = settings.TUNING_HOLDOUT_SHARE if holdout_share is None else holdout_share
    if not 0 <= share < 1:
        raise EmbedderRunError(f"holdout share must be in [0, 1), got {share}")
    base = Path(active_embedding().path)
    if not base.exists():
        raise EmbedderRunError(f"embedding model folder not found: {base}")
    corrections = (Correction.objects.filter(status=Correction.Status.APPROVED, stale=False)
                   .select_related("message").order_by("pk"))
    split = embedder_examples(corrections, holdout_share=share)
    unanswerable = unanswerable_questions(corrections)
    train, heldout = split["train"], split["heldout"]
    cap = settings.TUNING_EMBEDDER_MAX_EXAMPLES if max_examples is None else max_examples
    if cap and len(train) > cap:
        train = random.Random(hp.seed).sample(train, cap)
    if len(train) < 2:
        raise EmbedderRunError(f"{len(train)} training example(s) from approved corrections with evidence chunks; "
                               "need at least 2")
    if not heldout:
        raise EmbedderRunError("no held-out correction with evidence chunks to compare the candidate on; approve more")
    try:
        with transaction.atomic():
            run = EmbedderRun.objects.create(
                trigger=trigger, requested_by=requested_by, base_model_path=str(base),
                base_model_sha256=folder_sha256(base), hyperparameters=hp.as_dict(), holdout_share=share,
                train_examples=[e.record() for e in train], heldout_examples=[e.record() for e in heldout],
                unanswerable_questions=unanswerable,
                examples_sha256=examples_sha256([*train, *heldout]), train_count=len(train),
                heldout_count=len(heldout),
                corrections_count=len({e.correction_id for e in [*train, *heldout]}),
            )
            if enqueue:
                from tuning.tasks import embedder_run

                task_enqueue_on_commit(embedder_run, (run.pk,), on_unsent=lambda: EmbedderRun.objects.filter(
                    pk=run.pk, status=EmbedderRun.Status.QUEUED).update(
                        status=EmbedderRun.Status.FAILED, error=unsent_reason("run"), finished_at=timezone.now()),
                    later="the embedder run was marked failed; start it again once the queue is back")
    except IntegrityError:  # another start won the one-in-progress constraint
        raise EmbedderRunError("an embedder run is already in progress") from None
    return run


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class _Reporter:
    """Throttled writes of a run's progress, loss curve and heartbeat from the training loop."""

    def __init__(self, run: EmbedderRun):
        self.run = run
        self.saved_at = 0.0

    def update(self, **fields) -> None:
        fields["heartbeat_at"] = timezone.now()
        EmbedderRun.objects.filter(pk=self.run.pk).update(**fields)
        for name, value in fields.items():
            setattr(self.run, name, value)

    def step(self, point: dict, total: int) -> None:
        self.run.loss_curve.append(point)
        now = time.monotonic()
        if now - self.saved_at >= _SAVE_EVERY_S or point["step"] == total:
            self.saved_at = now
            self.update(progress=round(point["step"] / max(total, 1), 4), loss_curve=self.run.loss_curve)

    def should_stop(self) -> bool:
        status = EmbedderRun.objects.filter(pk=self.run.pk).values_list("status", flat=True).first()
        return status != EmbedderRun.Status.TRAINING


class _RunStopped(Exception):
    """The run is no longer in the status its worker set (cancelled, or failed by the stale check)."""


def embedder_run_execute(run_id: int) -> EmbedderRun:
    """Run steps 1-5 of the module docstring for run ``run_id`` (in a worker). Returns the run.

    Safe to call twice: only a ``queued`` run is claimed; any other status returns at once. Errors
    are recorded on the run (``failed`` + ``error``; its candidate version failed too), never raised,
    except ``EmbedderRun.DoesNotExist``. Every status write is a compare-and-set, so a run cancelled or
    failed by the stale check meanwhile never promotes.
    """
    now = timezone.now()
    claimed = EmbedderRun.objects.filter(pk=run_id, status=EmbedderRun.Status.QUEUED).update(
        status=EmbedderRun.Status.TRAINING, started_at=now, heartbeat_at=now, progress=0.0)
    run = EmbedderRun.objects.get(pk=run_id)
    if not claimed:
        logger.info("embedder run %s is %s; not running it again", run_id, run.status)
        return run
    reporter = _Reporter(run)
    started = time.perf_counter()
    stage = "training"
    version = None

    def advance(expected: str, **fields) -> None:
        fields["heartbeat_at"] = timezone.now()
        if not EmbedderRun.objects.filter(pk=run.pk, status=expected).update(**fields):
            raise _RunStopped(f"the run is no longer {expected}")

    try:
        from knowledge.selectors import curated_question_vectors
        from tuning.embedder_evaluation import (abstention_calibrate, curated_match_calibrate, embedder_gate_compare,
                                                embedder_gate_decide)
        from tuning.embedder_training import EmbedderExample, EmbedderHyperparameters, embedder_train

        if settings.EMBEDDING_THREADS > 0:
            import torch

            torch.set_num_threads(settings.EMBEDDING_THREADS)
        train = [EmbedderExample(**record) for record in run.train_examples]
        heldout = [EmbedderExample(**record) for record in run.heldout_examples]
        folder = Path(settings.TUNING_DIR) / "embedder-runs" / str(run.pk)
        result = embedder_train(run.base_model_path, train, folder, EmbedderHyperparameters(**run.hyperparameters),
                                device=settings.EMBEDDING_DEVICE, on_step=reporter.step,
                                should_stop=reporter.should_stop)
        sha256 = folder_sha256(folder)
        advance(EmbedderRun.Status.TRAINING, loss_curve=result.loss_curve, progress=1.0,
                status=EmbedderRun.Status.REEMBEDDING, model_path=str(folder), model_sha256=sha256,
                dimension=result.dimension, training_s=round(result.duration_s, 1), peak_rss_mb=_peak_rss_mb())

        stage = "re-embedding"
        version = knowledge_services.embedding_version_register(
            name=f"embedder-run-{run.pk}-{sha256[:8]}", path=folder, dimension=result.dimension,
            note=f"embedder run {run.pk}")
        advance(EmbedderRun.Status.REEMBEDDING, embedding_version=version)
        reembed_started = time.perf_counter()
        knowledge_services.embedding_version_build(
            version.pk, on_progress=lambda share: advance(EmbedderRun.Status.REEMBEDDING,
                                                          reembedding_progress=round(share, 4)))
        reembed_s = round(time.perf_counter() - reembed_started, 2)
        advance(EmbedderRun.Status.REEMBEDDING, status=EmbedderRun.Status.EVALUATING, reembedding_progress=1.0)

        stage = "evaluation"
        comparison = embedder_gate_compare(heldout, version.pk, unanswerable=run.unanswerable_questions)
        active = active_embedding()
        abstention = abstention_calibrate(
            comparison, served_threshold=active.abstain_distance, served_follow_up=active.follow_up_distance,
            fit=settings.TUNING_EMBEDDER_CALIBRATE_ABSTENTION,
            min_questions=settings.TUNING_EMBEDDER_CALIBRATION_MIN_QUESTIONS, served_own_margin=active.own_margin)
        curated_match = curated_match_calibrate(
            curated_question_vectors(), curated_question_vectors(embedding_version=version.pk),
            served_threshold=active.curated_match_distance, fit=settings.TUNING_EMBEDDER_CALIBRATE_ABSTENTION,
            min_questions=settings.TUNING_EMBEDDER_CALIBRATION_MIN_QUESTIONS)
        knowledge_services.embedding_version_thresholds_set(
            version.pk, abstain_max_distance=abstention["candidate_threshold"],
            follow_up_max_distance=abstention["candidate_follow_up"],
            curated_match_max_distance=curated_match["candidate_threshold"],
            follow_up_own_margin=abstention["candidate_own_margin"],
            calibration={k: v for k, v in abstention.items() if k not in ("answerable", "unanswerable")}
            | {"curated_match": curated_match, "run": run.pk, "active_version": active.model_id})
        decision = embedder_gate_decide(comparison, abstention=abstention) | {"curated_match": curated_match}
        evaluation = {"served": comparison["served"], "candidate": comparison["candidate"],
                      "chunks": version.chunks_total, "reembed_s": reembed_s, "candidate_dimension": result.dimension,
                      "search_s": comparison["search_s"], "rows": comparison["rows"],
                      "unanswerable_rows": comparison["unanswerable_rows"]}
        advance(EmbedderRun.Status.EVALUATING, evaluation=evaluation, decision=decision)

        stage = "promotion"
        promoted = False
        expected = EmbedderRun.Status.EVALUATING
        if not decision["promote"]:
            knowledge_services.embedding_version_reject(version.pk, f"embedder run {run.pk}: {decision['reason']}")
        elif settings.TUNING_EMBEDDER_AUTO_PROMOTE:
            # Already in a worker: the run switches its version itself, through the same request /
            # run pair as the admin's queued promotion, so both run and version show "promoting".
            advance(expected, status=EmbedderRun.Status.PROMOTING)
            expected = EmbedderRun.Status.PROMOTING
            knowledge_services.embedding_version_promotion_request(version.pk, enqueue=False)

            def still_ours() -> None:
                # Inside the switch's transaction: a cancel or stale-fail of the run wins before it;
                # the row stays locked until the switch commits (the stale sweep skips it meanwhile),
                # and the heartbeat written here is seen when it does.
                locked = EmbedderRun.objects.select_for_update().get(pk=run.pk)
                if locked.status != EmbedderRun.Status.PROMOTING:
                    raise _RunStopped(f"the run is no longer promoting ({locked.status})")
                EmbedderRun.objects.filter(pk=run.pk).update(heartbeat_at=timezone.now())

            knowledge_services.embedding_version_promotion_run(
                version.pk, note=f"promoted by embedder run {run.pk}: {decision['reason']}", before_switch=still_ours,
                on_progress=lambda: advance(EmbedderRun.Status.PROMOTING))
            promoted = True
        finished = timezone.now()
        advance(expected, status=EmbedderRun.Status.SUCCEEDED, promoted=promoted,
                finished_at=finished, duration_s=round(time.perf_counter() - started, 1), peak_rss_mb=_peak_rss_mb())
    except Exception as error:  # recorded on the run; serving is untouched
        logger.exception("embedder run %s failed during %s", run.pk, stage)
        EmbedderRun.objects.filter(pk=run.pk).exclude(status=EmbedderRun.Status.FAILED).update(
            status=EmbedderRun.Status.FAILED, error=f"{stage} failed: {error}"[:4000], finished_at=timezone.now(),
            duration_s=round(time.perf_counter() - started, 1), peak_rss_mb=_peak_rss_mb(),
        )
        if version is not None:
            knowledge_services.embedding_version_fail(version.pk, f"embedder run {run.pk}: {stage} failed: {error}")
    run.refresh_from_db()
    return run


def embedder_run_scheduled_check() -> EmbedderRun | None:
    """What the periodic task does: fail stale runs, then start a run (trigger ``schedule``) when at
    least ``TUNING_EMBEDDER_MIN_NEW_CORRECTIONS`` approved, non-stale corrections are not in the last
    embedder run's snapshot and no run is in progress. Returns the run started, or ``None``."""
    embedder_runs_fail_stale()
    if EmbedderRun.objects.filter(status__in=EmbedderRun.IN_PROGRESS).exists():
        return None
    approved = Correction.objects.filter(status=Correction.Status.APPROVED, stale=False)
    last = EmbedderRun.objects.order_by("-created_at", "-id").first()
    if last is not None:
        seen = {e["correction_id"] for e in [*last.train_examples, *last.heldout_examples]}
        approved = approved.exclude(pk__in=seen)
    if approved.count() < settings.TUNING_EMBEDDER_MIN_NEW_CORRECTIONS:
        return None
    try:
        return embedder_run_start(trigger="schedule")
    except EmbedderRunError as error:
        logger.info("scheduled embedder run not started: %s", error)
        return None

"""Training data from agents: corrections of assistant answers, reviewed before they are used.

A ``Correction`` is a self-contained snapshot taken when the agent writes it: the original answer,
the customer's question, the earlier turns, the chunks the model was shown and the chunks the agent
picked as support (text, offsets, source id and the source's ``content_hash`` at that time), so it
stays a faithful training example after the knowledge base changes, and a changed source can be
detected (``stale``).
"""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models import CheckConstraint, F, Q


class Correction(models.Model):
    """An agent's corrected answer for one assistant message.

    ``history`` is ``[{"role": "user"|"assistant"|"agent", "text": str}]`` (the turns before the
    question, oldest first). ``shown_chunks`` and ``supporting_chunks`` are lists of chunk snapshots
    ``{"chunk_id", "source_id", "source_title", "heading_path", "start", "end", "text",
    "content_hash"}``; ``shown_chunks`` in the order the model saw them (``[1]..[n]``). ``status``
    moves from ``pending`` to ``approved`` or ``rejected`` by a reviewer who is not the author (a
    database constraint). ``stale`` is set when a source of its chunks changed after it was written
    (``tuning.services.corrections_flag_stale``); stale corrections are never exported.
    An approved correction that is neither stale nor rejected is served as a curated answer
    (``curated_answer``, ``knowledge.models.CuratedAnswer``) when it has supporting chunks; the
    reason it is not is in ``curation_note``.
    """

    class Reason(models.TextChoices):
        WRONG_FACT = "wrong_fact", "Wrong fact"
        MISSING_FROM_KB = "missing_from_kb", "Missing from knowledge base"
        WRONG_CITATION = "wrong_citation", "Wrong citation"
        TONE = "tone", "Tone"
        SHOULD_HAVE_HANDED_OFF = "should_have_handed_off", "Should have handed off"

    class Status(models.TextChoices):
        PENDING = "pending", "Pending review"
        APPROVED = "approved", "Approved"
        REJECTED = "rejected", "Rejected"

    message = models.ForeignKey("chat.Message", on_delete=models.CASCADE, related_name="corrections")
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="corrections"
    )
    reason = models.CharField(max_length=40, choices=Reason.choices)
    corrected_answer = models.TextField()
    original_answer = models.TextField()
    question = models.TextField()
    history = models.JSONField(default=list, blank=True)
    shown_chunks = models.JSONField(default=list, blank=True)
    supporting_chunks = models.JSONField(default=list, blank=True)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PENDING, db_index=True)
    reviewer = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT, related_name="reviewed_corrections"
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)
    review_note = models.TextField(blank=True)
    stale = models.BooleanField(default=False, db_index=True)
    stale_reason = models.TextField(blank=True)
    # Built by ``manage.py seed_training_data`` from a question file with reference passages (no agent
    # wrote or reviewed it); a seeded correction is approved without an author or reviewer.
    seeded = models.BooleanField(default=False, db_index=True)
    # Seeded corrections: the question's id in its file (unique, so seeding twice adds nothing) and its
    # dialogue (the held-out split keeps a dialogue's turns together).
    seed_key = models.CharField(max_length=200, blank=True)
    seed_group = models.CharField(max_length=200, blank=True)
    # While approved and neither stale nor rejected: the curated answer it became in the knowledge base
    # (``tuning.services.correction_curate``); else why it is not one (``curation_note``).
    curated_answer = models.OneToOneField(
        "knowledge.CuratedAnswer", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    curation_note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            CheckConstraint(condition=~Q(reviewer=F("author")), name="correction_reviewer_not_author"),
            CheckConstraint(
                condition=Q(status="pending", reviewer__isnull=True)
                | (Q(status__in=["approved", "rejected"]) & Q(reviewer__isnull=False))
                | Q(seeded=True, status="approved", reviewer__isnull=True),
                name="correction_reviewed_iff_reviewer",
            ),
            CheckConstraint(condition=Q(author__isnull=False) | Q(seeded=True), name="correction_author_unless_seeded"),
            models.UniqueConstraint(fields=["seed_key"], condition=~Q(seed_key=""), name="correction_unique_seed_key"),
            CheckConstraint(condition=~Q(corrected_answer=""), name="correction_answer_not_empty"),
        ]

    def __str__(self) -> str:
        return f"correction {self.pk} of message {self.message_id} ({self.status})"


class TrainingDataset(models.Model):
    """An immutable, versioned snapshot of training examples built from approved corrections.

    ``version`` counts up from 1. ``recipe`` records how the examples were built (RAFT parameters,
    see ``tuning.datasets``): ``{"method": "raft", "sources_per_prompt", "gold_share", "holdout_share",
    "seed", "source_max_chars", "abstain_answer", ...}``. ``sha256`` is the digest of the examples'
    records in order (``TrainingExample.record``), so two snapshots with the same content are
    recognisable. Rows are written once by ``tuning.datasets.dataset_snapshot_create`` and never
    updated (the admin shows them read-only).
    """

    version = models.PositiveIntegerField(unique=True)
    recipe = models.JSONField(default=dict)
    sha256 = models.CharField(max_length=64)
    train_count = models.PositiveIntegerField(default=0)
    heldout_count = models.PositiveIntegerField(default=0)
    corrections_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-version"]

    def __str__(self) -> str:
        return f"dataset v{self.version} ({self.train_count} train / {self.heldout_count} held out)"


class TrainingExample(models.Model):
    """One example of a dataset snapshot: a chat record ``{"messages": [{"role", "content"}...],
    "metadata": {...}}`` whose last message is the assistant answer to learn.

    ``split`` is ``train`` or ``heldout`` (held-out corrections are never trained on: the split is a
    fixed function of the correction id, see ``tuning.datasets.correction_split``). ``has_gold``:
    the prompt's sources include a chunk that supports the answer (RAFT's "oracle" examples); without
    it the target is the abstention answer. ``gold_numbers`` are the 1-based source numbers of the
    supporting chunks in the prompt.
    """

    class Split(models.TextChoices):
        TRAIN = "train", "Train"
        HELDOUT = "heldout", "Held out"

    dataset = models.ForeignKey(TrainingDataset, on_delete=models.CASCADE, related_name="examples")
    correction = models.ForeignKey(Correction, null=True, on_delete=models.SET_NULL, related_name="examples")
    split = models.CharField(max_length=10, choices=Split.choices, db_index=True)
    has_gold = models.BooleanField(default=True)
    gold_numbers = models.JSONField(default=list, blank=True)
    record = models.JSONField()

    class Meta:
        ordering = ["dataset", "id"]


class FineTuneRun(models.Model):
    """One LoRA fine-tune of the base model on a dataset snapshot, its export, parity check,
    evaluation and gate decision.

    Status moves ``queued`` → ``training`` → ``exporting`` → ``evaluating`` → ``succeeded`` (a
    candidate, promoted or not: ``decision``) or ``failed`` (``error`` says why); ``promoted`` once
    its model version was made active. ``progress`` is 0..1 within the current stage.
    ``hyperparameters`` are ``tuning.training.LoraHyperparameters`` as a dict; ``loss_curve``
    ``[{"step", "epoch", "loss"}]``; ``parity`` the llama-cpp vs peft parity report; ``decision``
    ``{"promote": bool, "reason": str, ...}``. ``adapter_path`` is the exported adapter in the
    worker's scratch folder (``TUNING_DIR/runs/<id>/adapter.gguf``, on that host only); what is served
    is the published copy its ``model_version`` refers to (the artifact storage). At most one run is
    in progress at a time (a database constraint), so a re-queued or scheduled run cannot train twice.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        TRAINING = "training", "Training"
        EXPORTING = "exporting", "Exporting"
        EVALUATING = "evaluating", "Evaluating"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"
        PROMOTED = "promoted", "Promoted"

    IN_PROGRESS = ("queued", "training", "exporting", "evaluating")

    dataset = models.ForeignKey(TrainingDataset, on_delete=models.PROTECT, related_name="runs")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    trigger = models.CharField(max_length=20, default="manual")  # manual | schedule | command
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="fine_tune_runs"
    )
    base_model_path = models.CharField(max_length=1000)
    base_model_sha256 = models.CharField(max_length=64)
    hyperparameters = models.JSONField(default=dict)
    progress = models.FloatField(default=0.0)
    loss_curve = models.JSONField(default=list, blank=True)
    adapter_path = models.CharField(max_length=1000, blank=True)
    adapter_sha256 = models.CharField(max_length=64, blank=True)
    parity = models.JSONField(default=dict, blank=True)
    decision = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    model_version = models.ForeignKey(
        "chat.ModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="fine_tune_runs"
    )
    train_examples = models.PositiveIntegerField(default=0)
    peak_rss_mb = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_s = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                models.Value(True), condition=Q(status__in=["queued", "training", "exporting", "evaluating"]),
                name="finetunerun_one_in_progress",
            ),
        ]

    def __str__(self) -> str:
        return f"fine-tune run {self.pk} ({self.status})"


class ModelEvaluation(models.Model):
    """An evaluation of model versions on a dataset's held-out examples through the serving path.

    ``arms`` is ``{arm_name: {"version_id", "retrieval": bool, metrics...}}`` with the metrics of
    ``tuning.evaluation`` (token-F1, citation validity/precision, abstention accuracy, TTFT, tokens/s);
    ``rows`` the per-question answers; ``decision`` the promotion gate's verdict on them
    (``tuning.evaluation.gate_decide``: ``{"promote", "reason", "f1_gain", "f1_gain_interval", ...}``);
    ``report_html`` a self-contained HTML report with charts.
    """

    class Status(models.TextChoices):
        RUNNING = "running", "Running"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    run = models.ForeignKey(FineTuneRun, null=True, blank=True, on_delete=models.CASCADE, related_name="evaluations")
    dataset = models.ForeignKey(TrainingDataset, on_delete=models.PROTECT, related_name="evaluations")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.RUNNING)
    arms = models.JSONField(default=dict, blank=True)
    rows = models.JSONField(default=list, blank=True)
    decision = models.JSONField(default=dict, blank=True)
    report_html = models.TextField(blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]



class EmbedderRun(models.Model):
    """One fine-tune of the sentence-embedding model on approved corrections, and its comparison with
    the served embedder on held-out corrections (``tuning.embedder_runs``).

    The dataset is snapshotted into the run when it is queued and never changed: ``train_examples`` /
    ``heldout_examples`` are ``tuning.embedder_training.EmbedderExample`` records (``{"anchor",
    "positive", "negative", "positive_chunk_id", "negative_chunk_id", "correction_id", "group",
    "positive_source_id"}``), split by ``tuning.datasets.correction_split`` with ``holdout_share``;
    ``examples_sha256`` digests both. ``hyperparameters`` are ``EmbedderHyperparameters`` as a dict;
    ``loss_curve`` ``[{"step", "epoch", "loss"}]``. ``unanswerable_questions`` are the retrieval
    queries of the approved corrections without evidence chunks (questions agents marked unanswerable,
    and seeded out-of-scope ones; never trained on), for the gate's abstention check. Status moves
    ``queued`` → ``training`` → ``reembedding`` → ``evaluating`` → (``promoting``, while its winning
    candidate is switched in) → ``succeeded`` or ``failed`` (``error`` says why). The candidate
    model folder is ``model_path`` (its files' digest ``model_sha256``, vector ``dimension``), registered
    as ``embedding_version`` (``knowledge.models.EmbeddingModelVersion``) whose shadow vectors the run
    builds. ``evaluation`` is the gate's comparison through ``chunk_search`` (served vs candidate:
    passage-hit@1/5/10, document-hit@5, MRR@10; shadow re-embedding time) and ``decision`` the gate's
    (``tuning.embedder_evaluation.embedder_gate_decide``: promote or not, why, the paired interval);
    ``promoted`` whether the run activated its version. At most one embedder run is in progress at a
    time (a database constraint). A run changes what is served only by promoting a version that won.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        TRAINING = "training", "Training"
        REEMBEDDING = "reembedding", "Re-embedding (shadow)"
        EVALUATING = "evaluating", "Evaluating"
        PROMOTING = "promoting", "Promoting"
        SUCCEEDED = "succeeded", "Succeeded"
        FAILED = "failed", "Failed"

    IN_PROGRESS = ("queued", "training", "reembedding", "evaluating", "promoting")

    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    trigger = models.CharField(max_length=20, default="manual")  # manual | schedule | command
    requested_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="embedder_runs"
    )
    base_model_path = models.CharField(max_length=1000)
    base_model_sha256 = models.CharField(max_length=64)
    hyperparameters = models.JSONField(default=dict)
    holdout_share = models.FloatField()
    train_examples = models.JSONField(default=list)
    heldout_examples = models.JSONField(default=list)
    unanswerable_questions = models.JSONField(default=list, blank=True)
    examples_sha256 = models.CharField(max_length=64)
    train_count = models.PositiveIntegerField(default=0)
    heldout_count = models.PositiveIntegerField(default=0)
    corrections_count = models.PositiveIntegerField(default=0)
    progress = models.FloatField(default=0.0)
    loss_curve = models.JSONField(default=list, blank=True)
    model_path = models.CharField(max_length=1000, blank=True)
    model_sha256 = models.CharField(max_length=64, blank=True)
    dimension = models.PositiveIntegerField(null=True, blank=True)
    evaluation = models.JSONField(default=dict, blank=True)
    embedding_version = models.ForeignKey(
        "knowledge.EmbeddingModelVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    reembedding_progress = models.FloatField(default=0.0)
    decision = models.JSONField(default=dict, blank=True)
    promoted = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    peak_rss_mb = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    duration_s = models.FloatField(null=True, blank=True)
    training_s = models.FloatField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                models.Value(True),
                condition=Q(status__in=["queued", "training", "reembedding", "evaluating", "promoting"]),
                name="embedderrun_one_in_progress",
            ),
            CheckConstraint(condition=Q(holdout_share__gte=0) & Q(holdout_share__lt=1),
                            name="embedderrun_holdout_share_range"),
        ]

    def __str__(self) -> str:
        return f"embedder run {self.pk} ({self.status})"

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
    author = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="corrections")
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
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            CheckConstraint(condition=~Q(reviewer=F("author")), name="correction_reviewer_not_author"),
            CheckConstraint(
                condition=Q(status="pending", reviewer__isnull=True)
                | (Q(status__in=["approved", "rejected"]) & Q(reviewer__isnull=False)),
                name="correction_reviewed_iff_reviewer",
            ),
            CheckConstraint(condition=~Q(corrected_answer=""), name="correction_answer_not_empty"),
        ]

    def __str__(self) -> str:
        return f"correction {self.pk} of message {self.message_id} ({self.status})"

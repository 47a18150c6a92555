"""Conversations, their messages, and the registry of model versions the chat engine can serve.

A ``ModelVersion`` is a (base GGUF, optional LoRA adapter GGUF) pair; at most one is active (a partial
unique constraint), and the engine serves the active one. Every assistant ``Message`` records the
version that wrote it, its retrieval trace, its citations and its timings.
"""

from __future__ import annotations

import secrets
import uuid

from django.conf import settings
from django.db import models
from django.db.models import CheckConstraint, Q, UniqueConstraint
from pgvector.django import VectorField


def conversation_token() -> str:
    """A new conversation secret: 32 random bytes, URL-safe base64 (43 characters)."""
    return secrets.token_urlsafe(32)


def widget_identity_secret() -> str:
    """A new per-site identity secret (``WidgetSite.identity_secret``): 32 random bytes as 64 hex
    characters, what the host site keeps in its configuration to sign user ids (``chat.identity``)."""
    return secrets.token_hex(32)


# Longest external user id a verified customer may have (``Conversation.verified_user_id``).
USER_ID_MAX_CHARS = 255


class ModelVersion(models.Model):
    """A servable model: a base GGUF plus an optional LoRA adapter GGUF, identified by ``name``.

    ``base_model_path``/``adapter_path`` refer to each file either by a local path (the packaged base
    GGUF, ``LLM_MODEL_PATH``: needed at that path on every host that loads it) or by
    ``"artifacts:<storage name>"``, an object of the artifact storage (``STORAGES["artifacts"]``; a
    fine-tune's published adapter, ``"artifacts:models/<sha256>/adapter.gguf"``), which each host copies
    into its ``MODEL_CACHE_DIR`` before loading it (``chat.model_artifacts``).

    ``base_model_sha256``/``adapter_sha256`` are hex SHA-256 digests of the files (recorded at
    registration, so a later swap of a file under the same path is detectable). ``is_active`` marks the
    version the engine serves; the database allows at most one active row. ``refused_reason`` (and
    ``refused_at``): why the engine or an activation last refused it (a file's digest no longer
    matches); cleared when it is activated again with matching files.
    """

    name = models.CharField(max_length=200, unique=True)
    base_model_path = models.CharField(max_length=1000)
    base_model_sha256 = models.CharField(max_length=64)
    adapter_path = models.CharField(max_length=1000, blank=True)
    adapter_sha256 = models.CharField(max_length=64, blank=True)
    is_active = models.BooleanField(default=False)
    created_at = models.DateTimeField(auto_now_add=True)
    notes = models.TextField(blank=True)
    refused_reason = models.TextField(blank=True)
    refused_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            UniqueConstraint(fields=["is_active"], condition=Q(is_active=True), name="modelversion_one_active"),
        ]
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.name}{' (active)' if self.is_active else ''}"


class Conversation(models.Model):
    """A customer's chat. ``token`` is the secret that lets its starter read and write it; the
    ``id`` (a UUID) alone grants nothing. ``collection`` is the knowledge-base collection answers
    are retrieved from; ``origin`` the site that embedded the widget (blank when unknown);
    ``verified_user_id`` the host site's id of the signed-in customer who started it, set only when
    the site signed it (``chat.identity``; blank for an anonymous visitor), so that customer can list
    and resume it from another device (``chat.selectors.verified_conversation_list``)."""

    class Status(models.TextChoices):
        BOT = "bot", "Bot answering"
        NEEDS_HUMAN = "needs_human", "Needs a human"
        AGENT = "agent", "Agent answering"
        RESOLVED = "resolved", "Resolved"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    token = models.CharField(max_length=64, default=conversation_token, editable=False)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.BOT, db_index=True)
    collection = models.CharField(max_length=100, default="default")
    origin = models.CharField(max_length=300, blank=True)
    verified_user_id = models.CharField(max_length=USER_ID_MAX_CHARS, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Agent review dashboard: the agent who took the conversation over (set only while the status is
    # ``agent``, a database constraint), and when an agent marked it reviewed (``None``: unreviewed).
    assigned_agent = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.PROTECT,
        related_name="assigned_conversations",
    )
    reviewed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-updated_at"]
        constraints = [
            CheckConstraint(
                condition=Q(assigned_agent__isnull=True) | Q(status="agent"),
                name="conversation_assigned_only_while_agent",
            ),
            # A verified customer is verified for a site: the id means nothing without its origin.
            CheckConstraint(
                condition=Q(verified_user_id="") | ~Q(origin=""),
                name="conversation_verified_user_has_origin",
            ),
        ]
        indexes = [
            # The agents' inbox order (chat.agent_selectors.inbox_list): its newest rows are read from
            # here instead of sorting every conversation.
            models.Index(fields=["-updated_at", "-created_at"], name="conversation_inbox_order"),
            # A verified customer's conversations (chat.selectors.verified_conversation_list).
            models.Index(fields=["origin", "verified_user_id", "-updated_at"], name="conversation_verified_user",
                         condition=~Q(verified_user_id="")),
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class Message(models.Model):
    """One turn of a conversation. ``kind``: what a ``system`` message records (``Message.Kind``:
    ``handoff``, ``takeover``, ``hand_back``, ``resolved``); ``""`` for the other roles.

    For assistant messages: ``abstained`` is true when the bot declined to answer (weak retrieval);
    ``citations`` is ``[{"n", "chunk_id", "source_id", "source_title", "start", "end", "method"}]``
    (``n`` the 1-based source number the answer cited as ``[n]``, ``start``/``end`` character offsets
    into the source text, ``method`` ``"model"`` when the model wrote the marker and the check confirmed it, ``"check"``
    when the groundedness check cited the source that supports the sentence, ``"extractive"`` for a
    quoted source sentence, ``"curated"`` for the evidence of a curated answer); ``retrieval`` the retrieval trace ``[{"chunk_id", "source_id", "score",
    "vector_distance", "text_rank"}]`` (RRF score, cosine distance 0..2); ``timings``
    ``{"retrieval_ms", "ttft_ms", "first_text_ms", "generation_ms", "tokens", "tokens_per_s"}``;
    ``grounding`` the groundedness check's record: ``{"method": "generated"|"extractive"|"curated"|"conversational"|"declined",
    "reason", "query", "follow_up", "question_distance", "removed": int, "sentences": [{"text",
    "shown", "reason", "source", "coverage", "similarity"}]}`` (every sentence the model wrote, and
    why each removed one was removed; a curated answer adds ``"curated_id"``, ``"curated_question"``
    and ``"curated_distance"``; ``chat.services.ComposedAnswer``).
    """

    class Role(models.TextChoices):
        USER = "user", "Customer"
        ASSISTANT = "assistant", "Assistant"
        AGENT = "agent", "Agent"
        SYSTEM = "system", "System"

    class Kind(models.TextChoices):
        """What a ``system`` message records (``""`` for every other role)."""

        NONE = "", "—"
        HANDOFF = "handoff", "The customer asked for a person"
        TAKEOVER = "takeover", "An agent took the conversation over"
        HAND_BACK = "hand_back", "An agent handed it back to the assistant"
        RESOLVED = "resolved", "An agent resolved it"

    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    role = models.CharField(max_length=20, choices=Role.choices)
    # Read by analytics (handoffs) instead of the message's wording, which is for people and may change.
    kind = models.CharField(max_length=20, choices=Kind.choices, blank=True, default=Kind.NONE)
    text = models.TextField()
    abstained = models.BooleanField(default=False)
    citations = models.JSONField(default=list, blank=True)
    retrieval = models.JSONField(default=list, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    grounding = models.JSONField(default=dict, blank=True)
    model_version = models.ForeignKey(
        ModelVersion, null=True, blank=True, on_delete=models.SET_NULL, related_name="messages"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at", "id"]
        constraints = [
            # Every system message says what it records; no other message has a kind.
            CheckConstraint(condition=Q(role="system", kind__in=["handoff", "takeover", "hand_back", "resolved"])
                            | (~Q(role="system") & Q(kind="")), name="message_kind_only_on_system"),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.text[:60]}"


class QuestionEmbedding(models.Model):
    """The sentence embedding of a customer question (a ``user`` message) the assistant could not
    answer, so the analytics page groups unanswered questions by reading vectors instead of running
    the embedding model in its request (``chat.question_embeddings``).

    ``embedding``: the L2-normalised vector of ``embedding_model`` (``knowledge.embedding.model_id()``,
    ``"<name>@<dim>"``) for the question's stripped text, as retrieval computed it; declared without
    a dimension so a change of embedding model needs no schema change (rows of another model are
    ignored, then re-embedded). In a table of its own, not on ``Message``: the inbox and transcripts
    read messages all the time and never need the 1.5 kB vector."""

    message = models.OneToOneField(Message, on_delete=models.CASCADE, primary_key=True,
                                   related_name="question_embedding")
    embedding = VectorField()
    embedding_model = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"embedding of message {self.message_id} ({self.embedding_model})"


class AnswerFeedback(models.Model):
    """The customer's thumbs up or down (with an optional comment) on one assistant answer; one per
    answer (sending again replaces it)."""

    class Value(models.TextChoices):
        UP = "up", "Thumbs up"
        DOWN = "down", "Thumbs down"

    message = models.OneToOneField(Message, on_delete=models.CASCADE, related_name="feedback")
    value = models.CharField(max_length=4, choices=Value.choices)
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            CheckConstraint(condition=Q(value__in=["up", "down"]), name="answerfeedback_value_up_or_down"),
        ]

    def __str__(self) -> str:
        return f"{self.value} on message {self.message_id}"


class ConversationRating(models.Model):
    """The customer's end-of-conversation rating, 1 (bad) .. 5 (good), with an optional comment; one
    per conversation (rating again replaces it)."""

    conversation = models.OneToOneField(Conversation, on_delete=models.CASCADE, related_name="rating")
    rating = models.PositiveSmallIntegerField()
    comment = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            CheckConstraint(condition=Q(rating__gte=1, rating__lte=5), name="conversationrating_1_to_5"),
        ]

    def __str__(self) -> str:
        return f"{self.rating}/5 for {self.conversation_id}"


# What ``WidgetSite.origin`` and ``collection`` may hold (also database constraints): a browser's
# ``Origin`` (lower-case scheme and host, a port only when not the default) and a collection name.
WIDGET_ORIGIN_PATTERN = r"^https?://([a-z0-9.-]+|\[[0-9a-f:.]+\])(:[0-9]{1,5})?$"
COLLECTION_PATTERN = r"^[A-Za-z0-9_.-]{1,100}$"


class WidgetSite(models.Model):
    """A site that embeds the chat widget and the knowledge-base collection its conversations answer
    from: the collection comes from the site's ``Origin`` (the browser sets it; a page cannot forge
    it), not from the widget's ``data-collection`` attribute (``chat.origins.conversation_collection``).
    ``origin`` is stored as browsers send it (``https://shop.example.com``, ``http://localhost:8000``);
    the admin normalises what is typed (``chat.origins.origin_normalize``). Managed in the admin.

    ``identity_secret`` signs the site's signed-in customers' user ids (``chat.identity``): generated
    per site (unique, 64 hex digits), shown in the admin to paste into the host site's server
    configuration, rotated there (the old secret stops verifying at once). ``identity_required``
    ("enforce"): the site's widget is for signed-in customers only, so a conversation without a
    verified user id is refused."""

    origin = models.CharField(max_length=300, unique=True, help_text="scheme://host[:port], e.g. https://shop.example.com")
    collection = models.CharField(max_length=100, help_text="The knowledge-base collection this site's widget answers from.")
    identity_secret = models.CharField(
        max_length=64, unique=True, default=widget_identity_secret, editable=False,
        help_text="Signs the user ids of signed-in customers: user_hash = HMAC-SHA256(secret, user_id), hex. "
                  "Keep it on the host site's server, never in a page.",
    )
    identity_required = models.BooleanField(
        default=False, verbose_name="require identity verification",
        help_text="Enforce: refuse conversations without a verified user id (for a widget shown only to "
                  "signed-in customers). A user id without a valid hash is refused either way.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["origin"]
        constraints = [
            CheckConstraint(condition=Q(origin__regex=WIDGET_ORIGIN_PATTERN), name="widgetsite_origin_form"),
            CheckConstraint(condition=Q(collection__regex=COLLECTION_PATTERN), name="widgetsite_collection_form"),
            CheckConstraint(condition=Q(identity_secret__regex=r"^[0-9a-f]{64}$"), name="widgetsite_identity_secret_form"),
        ]

    def __str__(self) -> str:
        return f"{self.origin} -> {self.collection}"

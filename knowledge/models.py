"""Knowledge-base data: sources, their chunks (with embeddings and full-text vectors) and products.

A ``Source`` is one document (an uploaded or ingested file, a product entry, a page of a
``Website``, or a curated answer). Its extracted
``text`` is what chunk offsets and citations point into. The chunks of a source are replaced in one
transaction together with ``text`` and ``content_hash``, so readers always see one consistent version.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.indexes import GinIndex
from django.contrib.postgres.search import SearchVectorField
from django.db import models
from django.db.models import CheckConstraint, F, Q, UniqueConstraint
from pgvector.django import HnswIndex, VectorField

DEFAULT_COLLECTION = "default"


class Source(models.Model):
    """One document of the knowledge base, and the state of its latest ingestion.

    ``uri`` identifies the document inside its collection (a file path, an upload name, or
    ``product:<sku>``); ingesting the same ``uri`` again updates this row instead of adding one.
    """

    class Kind(models.TextChoices):
        FILE = "file", "File"
        FAQ = "faq", "FAQ sheet"
        PRODUCT = "product", "Product"
        PAGE = "page", "Web page"
        CURATED = "curated", "Curated answer"

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        PARSING = "parsing", "Parsing"
        EMBEDDING = "embedding", "Embedding"
        READY = "ready", "Ready"
        FAILED = "failed", "Failed"

    # An ingestion that has not finished (queued, or in a worker).
    UNFINISHED_STATUSES = (Status.QUEUED, Status.PARSING, Status.EMBEDDING)

    collection = models.CharField(max_length=100, default=DEFAULT_COLLECTION, db_index=True)
    uri = models.CharField(max_length=2000, help_text="Path, upload name, product:<sku>, a page's canonical URL "
                           "or curated:<key>.")
    kind = models.CharField(max_length=20, choices=Kind.choices, default=Kind.FILE)
    title = models.CharField(max_length=500, blank=True)
    # The raw bytes waiting to be ingested (uploads and products); files ingested from a path on
    # the server are read from ``uri``.
    pending_file = models.FileField(upload_to="sources/%Y/%m/", blank=True)
    # Which queued version is the newest: raised each time a new version is queued (an upload, a
    # product save, a path registered again). An ingestion claims the value it read at its start and
    # writes progress, failure or its chunks only while it is still current, so a slower ingestion
    # of an older version never overwrites, or deletes the file of, a newer one.
    pending_version = models.PositiveIntegerField(default=0)
    # Serving version: the extracted text the chunks point into, and the hash of the raw bytes.
    text = models.TextField(blank=True)
    content_hash = models.CharField(max_length=64, blank=True)
    # Latest ingestion attempt.
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True, help_text="Why the latest ingestion failed.")
    progress = models.PositiveSmallIntegerField(default=0, help_text="Percent, 0..100.")
    chunk_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    ingested_at = models.DateTimeField(null=True, blank=True)
    # Set when its ingestion task could not be sent (the task queue was unreachable; the source stays
    # queued): the periodic ``knowledge.send_unsent_sources`` sends it again (``force`` as asked).
    unsent_at = models.DateTimeField(null=True, blank=True)
    unsent_force = models.BooleanField(default=False)
    # Pages of a website (kind "page"): the website that found them, and the HTTP validators of the
    # serving version, sent back as If-None-Match / If-Modified-Since on the next sync.
    website = models.ForeignKey("Website", null=True, blank=True, on_delete=models.CASCADE, related_name="pages")
    http_etag = models.CharField(max_length=500, blank=True)
    http_last_modified = models.CharField(max_length=100, blank=True)

    class Meta:
        constraints = [
            UniqueConstraint(fields=["collection", "uri"], name="source_unique_uri_per_collection"),
            CheckConstraint(
                condition=Q(kind="page", website__isnull=False) | (~Q(kind="page") & Q(website__isnull=True)),
                name="source_page_has_website",
            ),
            CheckConstraint(condition=Q(progress__lte=100), name="source_progress_percent"),
        ]
        ordering = ["collection", "uri"]

    def __str__(self) -> str:
        return self.title or self.uri

    @property
    def public_url(self) -> str:
        """The link a customer may open for this source: a page's URL, else ``""`` (a file's ``uri``
        is a path on the server and is never shown)."""
        return self.uri if self.kind == self.Kind.PAGE else ""


class Website(models.Model):
    """A website whose pages are sources of ``collection``, found from ``url`` and kept in sync.

    ``mode`` says what ``url`` is: the page a crawl starts from (links followed up to ``max_depth``
    hops), or a sitemap (its pages, nested sitemaps followed). Only pages of the URL's own site are
    taken (same host, or the host with / without ``www.``); ``include_patterns`` /
    ``exclude_patterns`` are shell-style globs (``fnmatch``) matched against a page's path with its
    query (``/help/*``), one per line. ``resync_hours`` (0 = never) is the period of the
    django-celery-beat task in ``schedule``, which ``knowledge.websites.website_save`` keeps in step.
    """

    class Mode(models.TextChoices):
        CRAWL = "crawl", "Crawl from a start page"
        SITEMAP = "sitemap", "Pages of a sitemap"

    collection = models.CharField(max_length=100, default=DEFAULT_COLLECTION, db_index=True)
    url = models.URLField("URL", max_length=2000, help_text="Start page, or the sitemap's URL.")
    mode = models.CharField(max_length=20, choices=Mode.choices, default=Mode.CRAWL)
    include_patterns = models.TextField(
        blank=True, help_text="One glob per line on the page's path, e.g. /help/*. Empty: every page of the site."
    )
    exclude_patterns = models.TextField(blank=True, help_text="One glob per line, e.g. /help/archive/*.")
    page_limit = models.PositiveIntegerField(default=500, help_text="Most pages kept from this website.")
    max_depth = models.PositiveSmallIntegerField(
        default=3, help_text="Crawl: most links followed from the start page (0 = the start page only)."
    )
    resync_hours = models.PositiveIntegerField(
        "re-sync every (hours)", default=24, help_text="0 = only when asked."
    )
    schedule = models.OneToOneField(
        "django_celery_beat.PeriodicTask", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_synced_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            UniqueConstraint(fields=["collection", "url"], name="website_unique_url_per_collection"),
            CheckConstraint(condition=Q(page_limit__gte=1), name="website_page_limit_positive"),
        ]
        ordering = ["collection", "url"]

    def __str__(self) -> str:
        return self.url


class WebsiteSync(models.Model):
    """One sync run of a website and its report.

    The counters are pages by outcome; ``pages`` lists every page the run looked at as
    ``{"url": str, "outcome": "new"|"changed"|"unchanged"|"removed"|"failed"|"skipped", "reason": str}``
    in the order they were handled. ``done`` / ``total`` (pages handled / found so far) and
    ``current_url`` are updated after each page, so other connections see progress live.
    """

    class Status(models.TextChoices):
        QUEUED = "queued", "Queued"
        RUNNING = "running", "Running"
        FINISHED = "finished", "Finished"
        FAILED = "failed", "Failed"

    website = models.ForeignKey(Website, on_delete=models.CASCADE, related_name="syncs")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED)
    error = models.TextField(blank=True, help_text="Why the whole run failed (nothing was removed then).")
    new = models.PositiveIntegerField(default=0)
    changed = models.PositiveIntegerField(default=0)
    unchanged = models.PositiveIntegerField(default=0)
    removed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    skipped = models.PositiveIntegerField(default=0)
    done = models.PositiveIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)
    current_url = models.CharField(max_length=2000, blank=True)
    pages = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "website sync"

    def __str__(self) -> str:
        return f"sync #{self.pk} of {self.website}"


# The HNSW graph of the chunk embeddings. At 100k chunks (README, "Retrieval at 100k chunks"; Doc2Dial
# questions against an exact scan): ef_construction 64 gave recall@10 0.938 at ef_search 200 and 0.978
# even at 1,000, some queries finding none of their true top 10 (the greedy search stuck in a dense
# region); 128 gave 0.967-0.988 at ef_search 200 and 0.983 at 400 when built by CREATE INDEX (30-40 s),
# 0.963 at 200 when grown by inserts.
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 128


class Chunk(models.Model):
    """A passage of a source: ``source.text[start:end] == text``.

    ``heading_path`` is the list of headings above the passage (outermost first). ``embedding`` is
    the L2-normalised vector of ``embedding_model`` for the passage with its title and headings;
    ``search_vector`` is the Postgres full-text vector of the same.
    """

    source = models.ForeignKey(Source, on_delete=models.CASCADE, related_name="chunks")
    # Always its source's collection: database triggers set it when a chunk is inserted and follow a
    # source moved to another collection (migration 0005), so retrieval filters by collection inside
    # the full-text index instead of joining every matching chunk to its source.
    collection = models.CharField(max_length=100, default="", editable=False)
    ordinal = models.PositiveIntegerField(help_text="Position of the chunk in its source, from 0.")
    start = models.PositiveIntegerField(help_text="Character offset of the first character.")
    end = models.PositiveIntegerField(help_text="Character offset one past the last character.")
    text = models.TextField()
    heading_path = models.JSONField(default=list, blank=True)
    token_count = models.PositiveIntegerField(default=0)
    embedding = VectorField(dimensions=settings.EMBEDDING_DIM)
    embedding_model = models.CharField(max_length=200)
    search_vector = SearchVectorField(null=True)

    class Meta:
        constraints = [
            UniqueConstraint(fields=["source", "ordinal"], name="chunk_unique_ordinal"),
            CheckConstraint(condition=Q(end__gt=F("start")), name="chunk_nonempty_range"),
        ]
        indexes = [
            HnswIndex(
                name="chunk_embedding_hnsw",
                fields=["embedding"],
                m=HNSW_M,
                ef_construction=HNSW_EF_CONSTRUCTION,
                opclasses=["vector_cosine_ops"],
            ),
            # btree_gin: one GIN index answers "this collection's chunks holding this word"
            GinIndex(name="chunk_collection_search_gin", fields=["collection", "search_vector"]),
        ]
        ordering = ["source_id", "ordinal"]

    def __str__(self) -> str:
        return f"{self.source} #{self.ordinal} [{self.start}, {self.end})"


class LexemeFrequency(models.Model):
    """How many chunks of ``collection`` hold ``lexeme`` (a Postgres ``english`` lexeme of their
    full-text vectors): the document frequency the full-text leg of ``chunk_search`` reads instead of
    counting a common word's postings per query (a GIN bitmap of every posting: ~2-3 ms per word at
    100k chunks, most of that leg's time).

    Recomputed for a whole collection by ``knowledge.services.lexeme_frequencies_refresh`` after
    ingestion and deletion, so it can trail a write made outside those services (it then only
    re-weights words; a word it does not hold is counted at query time as before).
    """

    collection = models.CharField(max_length=100)
    lexeme = models.TextField()
    document_frequency = models.PositiveIntegerField()

    class Meta:
        constraints = [UniqueConstraint(fields=["collection", "lexeme"], name="lexeme_frequency_unique")]

    def __str__(self) -> str:
        return f"{self.collection}: {self.lexeme} ({self.document_frequency})"


class Product(models.Model):
    """A product entry, edited in the admin and retrievable like any document.

    Saving a product through ``knowledge.services.product_sync`` renders it as text and ingests it
    as the source ``product:<sku>`` of its collection.
    """

    collection = models.CharField(max_length=100, default=DEFAULT_COLLECTION)
    sku = models.CharField("SKU", max_length=100)
    name = models.CharField(max_length=300)
    price = models.DecimalField(max_digits=12, decimal_places=2)
    currency = models.CharField(max_length=3, default="USD")
    description = models.TextField(blank=True)
    attributes = models.JSONField(default=dict, blank=True, help_text='e.g. {"colour": "red"}')
    source = models.OneToOneField(
        Source, null=True, blank=True, on_delete=models.SET_NULL, related_name="product"
    )
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            UniqueConstraint(fields=["collection", "sku"], name="product_unique_sku_per_collection"),
            CheckConstraint(condition=Q(price__gte=0), name="product_price_not_negative"),
        ]
        ordering = ["name"]

    def __str__(self) -> str:
        return f"{self.name} ({self.sku})"


class CuratedAnswer(models.Model):
    """An approved answer to a question, kept as a source of kind ``curated`` of its collection.

    Its source holds one chunk: ``text`` the answer, the source's title the question, and the
    embedding of the question alone (``knowledge.services.embedding_text``), so the vector leg of
    ``chunk_search`` compares a new question with the curated question; the full-text leg reads the
    question (weight A) and the answer (B). ``key`` is the writer's reference (e.g. ``correction:17``;
    the knowledge base knows nothing of corrections). ``evidence`` are the passages that support the
    answer (``CuratedEvidence``), cited when it is served.

    ``retired_reason`` is set (and the chunk deleted, so it is neither served nor retrieved) when a
    source of its evidence changed or was deleted; the writer removes the entry itself later (see
    ``knowledge.services.curated_answer_delete``).
    """

    source = models.OneToOneField(Source, on_delete=models.CASCADE, related_name="curated")
    key = models.CharField(max_length=200, unique=True)
    question = models.TextField()
    answer = models.TextField()
    retired_reason = models.TextField(blank=True)
    edited_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [
            CheckConstraint(condition=~Q(question=""), name="curated_question_not_empty"),
            CheckConstraint(condition=~Q(answer=""), name="curated_answer_not_empty"),
        ]
        ordering = ["-updated_at", "-id"]

    def __str__(self) -> str:
        return f"curated answer {self.pk}: {self.question[:60]}"


class CuratedEvidence(models.Model):
    """One passage supporting a curated answer: ``source.text[start:end]`` as it was when the
    answer was curated (``content_hash`` the source's hash then). The passage is cited by the chunk
    of ``source`` with exactly this range; ``source`` is ``NULL`` once that source was deleted."""

    curated = models.ForeignKey(CuratedAnswer, on_delete=models.CASCADE, related_name="evidence")
    ordinal = models.PositiveSmallIntegerField()
    source = models.ForeignKey(Source, null=True, on_delete=models.SET_NULL, related_name="curated_evidence")
    start = models.PositiveIntegerField()
    end = models.PositiveIntegerField()
    content_hash = models.CharField(max_length=64)

    class Meta:
        constraints = [
            UniqueConstraint(fields=["curated", "ordinal"], name="curated_evidence_unique_ordinal"),
            CheckConstraint(condition=Q(end__gt=F("start")), name="curated_evidence_nonempty_range"),
        ]
        ordering = ["curated_id", "ordinal"]


class EmbeddingModelVersion(models.Model):
    """One sentence-embedding model the knowledge base can be searched with (blue/green vectors).

    Exactly one version is ``active`` (a partial unique index; the promotion swaps statuses in one
    transaction): its vectors are ``Chunk.embedding`` (``Chunk.embedding_model == model_id``) and every
    process embeds queries with its folder ``path``. Until the first version is written the settings'
    model (``EMBEDDING_MODEL``) is the implicit active one (``knowledge.embedding.active_embedding``);
    ``knowledge.services.embedding_version_bootstrap`` registers it as a row.

    A candidate is registered ``building``: ``knowledge.services.embedding_version_build`` writes its
    vector of every chunk into ``ChunkEmbedding`` (``progress`` 0..1, ``heartbeat_at``) and marks it
    ``ready``; ``failed`` (``reason`` says why) when the build stopped, ``rejected`` when the promotion
    gate refused it, its shadow vectors dropped either way. A
    promoted version is ``active`` (``promoted_at``); the version it replaced becomes ``retired``
    with its vectors kept in ``ChunkEmbedding`` (rollback needs no re-embedding). ``sha256`` is the
    folder's digest (``folder_sha256``), checked before the folder is loaded for serving.

    A promotion or rollback is requested (``knowledge.services.embedding_version_promotion_request``)
    and runs in a worker: the target is ``promoting`` from the request (a compare-and-set from
    ``ready`` / ``retired``, remembered in ``promoting_from``; at most one version is promoting, a
    partial unique index) until the worker made it ``active``; when the switch fails it goes back to
    ``promoting_from`` with the reason, and the active version kept serving throughout.

    ``abstain_max_distance`` / ``follow_up_max_distance``: this version's abstention thresholds
    (cosine distance, 0..2), fitted by the embedder run's gate so that it declines as the version it
    was compared with did (``calibration`` holds the fit's numbers); ``None`` means the settings'
    ``ABSTAIN_MAX_DISTANCE`` / ``FOLLOW_UP_MAX_DISTANCE`` (chosen on the settings' MiniLM). The
    pipeline reads the active version's (``knowledge.embedding.active_embedding``).
    ``curated_match_max_distance`` (question to question, 0..2) and ``follow_up_own_margin`` (a
    difference of distances, -2..2; negative: the rule is off) are fitted the same way; ``None``: the
    settings' ``CURATED_MATCH_MAX_DISTANCE`` / ``FOLLOW_UP_OWN_MARGIN``.
    """

    class Status(models.TextChoices):
        BUILDING = "building", "Building (shadow re-embed)"
        READY = "ready", "Ready (shadow vectors complete)"
        ACTIVE = "active", "Active (serving)"
        RETIRED = "retired", "Retired"
        REJECTED = "rejected", "Rejected by the gate"
        FAILED = "failed", "Failed"
        PROMOTING = "promoting", "Promoting (switch queued or running)"

    # Candidates: versions a build or the gate may still fail (their shadow vectors then dropped).
    CANDIDATE_STATUSES = (Status.BUILDING, Status.READY)
    # Versions whose vectors ingestion keeps up to date in ``ChunkEmbedding`` (besides the active one):
    # the candidates, and a version being promoted (its switch copies them into ``Chunk.embedding``).
    SHADOW_STATUSES = (Status.BUILDING, Status.READY, Status.PROMOTING)
    # What a promotion (or a rollback) may start from.
    ACTIVATABLE_STATUSES = (Status.READY, Status.RETIRED)

    name = models.CharField(max_length=200, unique=True, help_text="Recorded on chunks as <name>@<dimension>.")
    path = models.CharField(max_length=1000, help_text="sentence-transformers folder (or hub name) of the model.")
    sha256 = models.CharField(max_length=64, blank=True, help_text="Digest of the folder's files; empty for a hub name.")
    dimension = models.PositiveIntegerField()
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.BUILDING)
    reason = models.TextField(blank=True, help_text="Why the build failed, or the latest activation note.")
    progress = models.FloatField(default=0.0, help_text="Share of chunks with a shadow vector, 0..1.")
    chunks_total = models.PositiveIntegerField(default=0)
    chunks_done = models.PositiveIntegerField(default=0)
    note = models.CharField(max_length=300, blank=True, help_text="Where the version comes from (e.g. embedder run 4).")
    created_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    promoted_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    promoting_from = models.CharField(max_length=20, blank=True,
                                      help_text="While promoting: the status it goes back to if the switch fails.")
    promotion_requested_at = models.DateTimeField(null=True, blank=True)
    abstain_max_distance = models.FloatField(
        null=True, blank=True, help_text="Abstention threshold of this version (cosine distance 0..2); "
                                         "empty: the ABSTAIN_MAX_DISTANCE setting.")
    follow_up_max_distance = models.FloatField(
        null=True, blank=True, help_text="Follow-up threshold of this version (cosine distance 0..2); "
                                         "empty: the FOLLOW_UP_MAX_DISTANCE setting.")
    curated_match_max_distance = models.FloatField(
        null=True, blank=True, help_text="Curated-answer match threshold of this version (cosine distance "
                                         "0..2 between two questions); empty: the CURATED_MATCH_MAX_DISTANCE setting.")
    follow_up_own_margin = models.FloatField(
        null=True, blank=True, help_text="Own-words margin of this version (a difference of cosine distances; "
                                         "negative: off); empty: the FOLLOW_UP_OWN_MARGIN setting.")
    calibration = models.JSONField(default=dict, blank=True,
                                   help_text="How the thresholds were fitted (the embedder gate's numbers).")

    class Meta:
        constraints = [
            UniqueConstraint(fields=["status"], condition=Q(status="active"), name="embeddingversion_one_active"),
            UniqueConstraint(fields=["status"], condition=Q(status="promoting"), name="embeddingversion_one_promoting"),
            CheckConstraint(condition=Q(abstain_max_distance__isnull=True) | (Q(abstain_max_distance__gte=0)
                                                                                & Q(abstain_max_distance__lte=2)),
                            name="embeddingversion_abstain_distance_range"),
            CheckConstraint(condition=Q(curated_match_max_distance__isnull=True)
                            | (Q(curated_match_max_distance__gte=0) & Q(curated_match_max_distance__lte=2)),
                            name="embeddingversion_curated_distance_range"),
            CheckConstraint(condition=Q(follow_up_own_margin__isnull=True)
                            | (Q(follow_up_own_margin__gte=-2) & Q(follow_up_own_margin__lte=2)),
                            name="embeddingversion_own_margin_range"),
            CheckConstraint(condition=Q(progress__gte=0) & Q(progress__lte=1), name="embeddingversion_progress_range"),
            CheckConstraint(condition=Q(dimension__gte=1), name="embeddingversion_dimension_positive"),
        ]
        ordering = ["-created_at", "-id"]
        verbose_name = "embedding model version"

    def __str__(self) -> str:
        return f"{self.model_id} ({self.status})"

    @property
    def model_id(self) -> str:
        """The identity recorded on chunks: ``"<name>@<dimension>"``."""
        return f"{self.name}@{self.dimension}"

    @property
    def index_name(self) -> str:
        """The name of this version's partial HNSW index over ``ChunkEmbedding``."""
        return f"chunkembedding_v{self.pk}_hnsw"


class ChunkEmbedding(models.Model):
    """A chunk's vector under a non-active ``EmbeddingModelVersion``: a candidate's shadow vectors
    while it builds, or a retired version's kept vectors (for rollback).

    ``embedding`` is declared without a dimension so versions of any dimension share the table; each
    candidate gets a partial expression HNSW index ``((embedding::vector(D)) vector_cosine_ops) WHERE
    version_id = X`` (pgvector's way to index vectors of one dimension in such a column), created by
    the build. Rows leave with their chunk (cascade) or version.
    """

    chunk = models.ForeignKey(Chunk, on_delete=models.CASCADE, related_name="version_embeddings")
    version = models.ForeignKey(EmbeddingModelVersion, on_delete=models.CASCADE, related_name="chunk_embeddings")
    embedding = VectorField()

    class Meta:
        constraints = [UniqueConstraint(fields=["version", "chunk"], name="chunkembedding_unique_per_version")]

    def __str__(self) -> str:
        return f"chunk {self.chunk_id} under version {self.version_id}"

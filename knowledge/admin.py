"""Admin for the knowledge base: sources with ingestion status, multi-file upload, products, and
websites with their sync reports (live while a sync runs).

The upload page refuses a file over ``INGEST_MAX_FILE_BYTES`` while it is received
(``knowledge.upload_limits``) and again in its form, before anything is stored: the page shows which
files and why, and no file of that submission is stored. Accepted files are streamed to storage
(Django keeps them in a temporary file above ``FILE_UPLOAD_MAX_MEMORY_SIZE``), never read whole.
"""

from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html, format_html_join

from knowledge import crawler, services, upload_limits, websites
from knowledge.models import DEFAULT_COLLECTION, Chunk, EmbeddingModelVersion, Product, Source, Website, WebsiteSync
from knowledge.parsers import SUPPORTED_EXTENSIONS


class MultipleFileInput(forms.ClearableFileInput):
    allow_multiple_selected = True


class MultipleFileField(forms.FileField):
    """A file field that accepts several files (Django's documented multiple-upload recipe)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("widget", MultipleFileInput(attrs={"accept": ",".join(SUPPORTED_EXTENSIONS)}))
        super().__init__(*args, **kwargs)

    def clean(self, data, initial=None):
        single = super().clean
        if isinstance(data, (list, tuple)) and data:
            return [single(item, initial) for item in data]
        return [single(data, initial)]  # an empty list too, so "required" is enforced


class UploadForm(forms.Form):
    """The upload page's form. ``refused``: names of files already refused for their size while the
    request was received (they are not in ``files``); any refusal makes the whole form invalid, so a
    submission is stored whole or not at all."""

    files = MultipleFileField(
        help_text=f"Supported: {', '.join(SUPPORTED_EXTENSIONS)}. A CSV is an FAQ sheet with "
        "'question' and 'answer' columns. Uploading a file with the same name replaces it."
    )
    collection = forms.CharField(max_length=100, initial=DEFAULT_COLLECTION)

    def __init__(self, *args, refused: list[str] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.refused = list(refused)
        if self.refused:
            self.fields["files"].required = False  # say why they are missing, not "required"

    def clean_files(self):
        files = [upload for upload in self.cleaned_data["files"] if upload]
        refused = self.refused + [upload.name for upload in files if upload.size > settings.INGEST_MAX_FILE_BYTES]
        if refused:
            raise forms.ValidationError(
                [f"{name}: {services.too_large_reason()}." for name in refused]
                + ["Nothing was uploaded; choose the files again without the ones over the limit."]
            )
        return files


class ChunkInline(admin.TabularInline):
    model = Chunk
    fields = ("ordinal", "heading", "start", "end", "token_count", "excerpt")
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = False
    ordering = ("ordinal",)

    def has_add_permission(self, request, obj=None):
        return False

    @admin.display(description="headings")
    def heading(self, chunk: Chunk) -> str:
        return " › ".join(chunk.heading_path)

    @admin.display(description="text")
    def excerpt(self, chunk: Chunk) -> str:
        return chunk.text[:200] + ("…" if len(chunk.text) > 200 else "")


@admin.register(Source)
class SourceAdmin(admin.ModelAdmin):
    list_display = ("__str__", "collection", "kind", "status_badge", "progress", "chunk_count", "error_short", "updated_at")
    list_filter = ("status", "kind", "collection", "website")
    search_fields = ("title", "uri")
    readonly_fields = ("uri", "page_link", "website", "kind", "content_hash", "status", "error", "progress",
                       "chunk_count", "created_at", "updated_at", "ingested_at", "pending_file")
    fields = ("collection", "title", *readonly_fields)
    inlines = [ChunkInline]
    actions = ["reingest"]
    change_list_template = "admin/knowledge/source/change_list.html"

    def get_urls(self):
        return [
            path("upload/", upload_limits.refusing_oversized_uploads(self.admin_site.admin_view(self.upload_view)),
                 name="knowledge_source_upload"),
            *super().get_urls(),
        ]

    def has_add_permission(self, request):
        return False  # sources are added by upload, `manage.py ingest` or a website's sync

    def upload_view(self, request: HttpRequest):
        """Multi-file upload: each file becomes (or replaces) a source, and they are queued for
        ingestion together (``services.sources_upload``: batched ``knowledge.ingest_sources`` tasks)."""
        if not self.has_change_permission(request):
            return HttpResponseRedirect(reverse("admin:index"))
        form = UploadForm(request.POST or None, request.FILES or None, refused=upload_limits.refused_uploads(request))
        if request.method == "POST" and form.is_valid():
            files = [(upload.name, upload) for upload in form.cleaned_data["files"]]  # streamed to storage
            try:
                queued = len(services.sources_upload(files, collection=form.cleaned_data["collection"]))
            except services.UploadRefused as error:  # the service's own check; the form's came first
                self.message_user(request, f"{error}; nothing was uploaded.", messages.ERROR)
            else:
                self.message_user(request, f"{queued} file(s) queued for ingestion.")
            return HttpResponseRedirect(reverse("admin:knowledge_source_changelist"))
        context = {**self.admin_site.each_context(request), "form": form, "opts": self.model._meta,
                   "title": "Upload knowledge-base files"}
        return TemplateResponse(request, "admin/knowledge/source/upload.html", context)

    def changelist_view(self, request, extra_context=None):
        busy = Source.objects.filter(status__in=Source.UNFINISHED_STATUSES).exists()
        return super().changelist_view(request, {**(extra_context or {}), "ingestion_busy": busy})

    @admin.display(description="page")
    def page_link(self, source: Source) -> str:
        url = source.public_url
        return format_html('<a href="{}" rel="noopener noreferrer" target="_blank">{}</a>', url, url) if url else "—"

    @admin.display(description="status", ordering="status")
    def status_badge(self, source: Source) -> str:
        colours = {"ready": "#2e7d32", "failed": "#c62828"}
        return format_html('<b style="color:{}">{}</b>', colours.get(source.status, "#555"), source.get_status_display())

    @admin.display(description="reason")
    def error_short(self, source: Source) -> str:
        return source.error[:120]

    @admin.action(description="Re-ingest selected sources")
    def reingest(self, request, queryset):
        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(status=Source.Status.QUEUED, progress=0, error="")
        services.sources_enqueue(ids, force=True)
        self.message_user(request, f"{len(ids)} source(s) queued.", messages.SUCCESS)

    def delete_model(self, request, obj):
        services.source_delete(obj)

    def delete_queryset(self, request, queryset):
        services.sources_delete(queryset)


@admin.register(Product)
class ProductAdmin(admin.ModelAdmin):
    list_display = ("name", "sku", "price", "currency", "collection", "ingestion_status")
    search_fields = ("name", "sku", "description")
    list_filter = ("collection",)
    readonly_fields = ("source",)

    @admin.display(description="ingestion")
    def ingestion_status(self, product: Product) -> str:
        return product.source.get_status_display() if product.source else "—"

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        services.product_sync(obj)

    def delete_model(self, request, obj):
        services.product_delete(obj)

    def delete_queryset(self, request, queryset):
        for product in queryset:
            services.product_delete(product)


# --- websites -------------------------------------------------------------------------------------


class WebsiteForm(forms.ModelForm):
    url = forms.URLField(label="URL", max_length=2000, assume_scheme="https", widget=forms.URLInput(attrs={"size": 80}),
                         help_text="Start page, or the sitemap's URL.")

    class Meta:
        model = Website
        fields = ("url", "mode", "collection", "include_patterns", "exclude_patterns", "page_limit", "max_depth",
                  "resync_hours")
        widgets = {"include_patterns": forms.Textarea(attrs={"rows": 3}),
                   "exclude_patterns": forms.Textarea(attrs={"rows": 3})}

    def clean_url(self):
        try:
            return websites.website_clean_url(self.cleaned_data["url"])
        except crawler.AddressRefused as error:
            raise forms.ValidationError(str(error)) from None


class WebsiteSyncInline(admin.TabularInline):
    model = WebsiteSync
    fields = ("sync_link", "status", "new", "changed", "unchanged", "removed", "failed", "skipped", "progress",
              "created_at", "finished_at")
    readonly_fields = fields
    extra = 0
    max_num = 0
    can_delete = False
    ordering = ("-created_at",)
    verbose_name_plural = "sync reports (newest first)"

    def get_queryset(self, request):
        return super().get_queryset(request).defer("pages")

    @admin.display(description="report")
    def sync_link(self, run: WebsiteSync) -> str:
        return format_html('<a href="{}">#{}</a>', reverse("admin:knowledge_websitesync_change", args=[run.pk]), run.pk)

    @admin.display(description="pages handled")
    def progress(self, run: WebsiteSync) -> str:
        return f"{run.done} / {run.total}"


@admin.register(Website)
class WebsiteAdmin(admin.ModelAdmin):
    """Websites: adding one queues its first sync; "Sync now" queues another; the re-sync period is
    ``resync_hours`` (also editable, or pausable, in Periodic tasks)."""

    form = WebsiteForm
    list_display = ("url", "collection", "mode", "page_count", "last_sync", "resync_hours", "last_synced_at")
    list_filter = ("collection", "mode")
    search_fields = ("url",)
    readonly_fields = ("schedule", "last_synced_at", "created_at")
    inlines = [WebsiteSyncInline]
    actions = ["sync_now"]

    def get_inline_instances(self, request, obj=None):
        return super().get_inline_instances(request, obj) if obj is not None else []

    @admin.display(description="pages")
    def page_count(self, website: Website) -> str:
        url = reverse("admin:knowledge_source_changelist") + f"?website__id__exact={website.pk}"
        return format_html('<a href="{}">{}</a>', url, website.pages.count())

    @admin.display(description="last sync")
    def last_sync(self, website: Website) -> str:
        run = website.syncs.defer("pages").order_by("-created_at").first()
        if run is None:
            return "—"
        link = reverse("admin:knowledge_websitesync_change", args=[run.pk])
        return format_html('<a href="{}">{}</a> {}', link, run.get_status_display(), _counts(run))

    def save_model(self, request, obj, form, change):
        websites.website_save(obj, sync=not change)
        if not change:
            self.message_user(request, "The first sync is queued; its report shows progress live.", messages.SUCCESS)

    @admin.action(description="Sync selected websites now")
    def sync_now(self, request, queryset):
        runs = [websites.website_sync_queue(website) for website in queryset]
        self.message_user(request, f"{len(runs)} sync(s) queued; each report (below the website) shows "
                          "progress live.", messages.SUCCESS)

    def delete_model(self, request, obj):
        websites.website_delete(obj)

    def delete_queryset(self, request, queryset):
        for website in queryset:
            websites.website_delete(website)


def _counts(run: WebsiteSync) -> str:
    return (f"{run.new} new, {run.changed} changed, {run.unchanged} unchanged, {run.removed} removed, "
            f"{run.failed} failed, {run.skipped} skipped")


@admin.register(WebsiteSync)
class WebsiteSyncAdmin(admin.ModelAdmin):
    """Sync reports, read-only; a running sync's page refreshes itself every 2 seconds."""

    list_display = ("__str__", "status", "new", "changed", "unchanged", "removed", "failed", "skipped",
                    "progress", "created_at", "finished_at")
    list_filter = ("status", "website")
    fields = ("website", "status", "error", "summary", "progress", "current_url", "created_at", "started_at",
              "finished_at", "report")
    readonly_fields = fields
    change_form_template = "admin/knowledge/websitesync/change_form.html"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("website")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    @admin.display(description="pages handled")
    def progress(self, run: WebsiteSync) -> str:
        return f"{run.done} / {run.total}"

    @admin.display(description="counts")
    def summary(self, run: WebsiteSync) -> str:
        return _counts(run)

    @admin.display(description="pages")
    def report(self, run: WebsiteSync) -> str:
        rows = format_html_join(
            "", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            ((page.get("outcome", ""), page.get("url", ""), page.get("reason", "")) for page in run.pages),
        )
        return format_html("<table><thead><tr><th>outcome</th><th>URL</th><th>reason</th></tr></thead>"
                           "<tbody>{}</tbody></table>", rows)

    def changeform_view(self, request, object_id=None, form_url="", extra_context=None):
        run = WebsiteSync.objects.filter(pk=object_id).only("status").first() if str(object_id).isdigit() else None
        running = run is not None and run.status in (WebsiteSync.Status.QUEUED, WebsiteSync.Status.RUNNING)
        return super().changeform_view(request, object_id, form_url, {**(extra_context or {}), "sync_busy": running})


@admin.register(EmbeddingModelVersion)
class EmbeddingModelVersionAdmin(admin.ModelAdmin):
    """Embedding-model versions (read-only): which one serves, candidates' shadow re-embedding
    progress, and two actions: promote a ready (or retired) version, roll back to the previous one.
    Both are queued (``knowledge.services.embedding_version_promotion_request``: the version shows
    ``promoting`` until a worker has switched every process, ``knowledge.activate_embedding_version``),
    never run in the request; the page refreshes itself while a version builds or promotes."""

    list_display = ("name", "status", "dimension", "progress", "chunks_done", "chunks_total", "abstain_max_distance",
                    "curated_match_max_distance", "note", "reason", "created_at", "promoted_at", "retired_at")
    list_filter = ("status",)
    readonly_fields = [f.name for f in EmbeddingModelVersion._meta.fields]
    actions = ["promote", "roll_back"]
    change_list_template = "admin/knowledge/embeddingmodelversion/change_list.html"

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False

    def changelist_view(self, request, extra_context=None):
        busy = EmbeddingModelVersion.objects.filter(status__in=(EmbeddingModelVersion.Status.BUILDING,
                                                                EmbeddingModelVersion.Status.PROMOTING)).exists()
        return super().changelist_view(request, {**(extra_context or {}), "versions_busy": busy})

    @admin.action(description="Promote the selected version (queued: a worker switches every process)")
    def promote(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "select exactly one version to promote", messages.ERROR)
            return
        version = queryset.get()
        try:
            services.embedding_version_promotion_request(version.pk,
                                                         note=f"promoted by {request.user.get_username()}")
        except services.EmbeddingVersionError as error:
            self.message_user(request, f"not promoted: {error}", messages.ERROR)
        else:
            self.message_user(request, f"promotion of {version.model_id} queued: it is promoting, and serves once a "
                                       "worker has switched every process (this page refreshes itself)")

    @admin.action(description="Roll back to the previous version (queued; from its kept vectors)")
    def roll_back(self, request, queryset):
        try:
            version = services.embedding_version_rollback_request(
                note=f"rolled back by {request.user.get_username()}")
        except services.EmbeddingVersionError as error:
            self.message_user(request, f"not rolled back: {error}", messages.ERROR)
        else:
            self.message_user(request, f"rollback to {version.model_id} queued: it is promoting, and serves once a "
                                       "worker has switched every process (this page refreshes itself)")

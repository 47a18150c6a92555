"""Admin for the knowledge base: sources with ingestion status, multi-file upload, products."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages
from django.http import HttpRequest, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from knowledge import services
from knowledge.models import DEFAULT_COLLECTION, Chunk, Product, Source
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
    files = MultipleFileField(
        help_text=f"Supported: {', '.join(SUPPORTED_EXTENSIONS)}. A CSV is an FAQ sheet with "
        "'question' and 'answer' columns. Uploading a file with the same name replaces it."
    )
    collection = forms.CharField(max_length=100, initial=DEFAULT_COLLECTION)


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
    list_filter = ("status", "kind", "collection")
    search_fields = ("title", "uri")
    readonly_fields = ("uri", "kind", "content_hash", "status", "error", "progress", "chunk_count",
                       "created_at", "updated_at", "ingested_at", "pending_file")
    fields = ("collection", "title", *readonly_fields)
    inlines = [ChunkInline]
    actions = ["reingest"]
    change_list_template = "admin/knowledge/source/change_list.html"

    def get_urls(self):
        return [
            path("upload/", self.admin_site.admin_view(self.upload_view), name="knowledge_source_upload"),
            *super().get_urls(),
        ]

    def has_add_permission(self, request):
        return False  # sources are added by upload or `manage.py ingest`

    def upload_view(self, request: HttpRequest):
        """Multi-file upload: each file becomes (or replaces) a source and is queued for ingestion."""
        if not self.has_change_permission(request):
            return HttpResponseRedirect(reverse("admin:index"))
        form = UploadForm(request.POST or None, request.FILES or None)
        if request.method == "POST" and form.is_valid():
            collection = form.cleaned_data["collection"]
            for upload in form.cleaned_data["files"]:
                services.source_upload(filename=upload.name, data=upload.read(), collection=collection)
            self.message_user(request, f"{len(form.cleaned_data['files'])} file(s) queued for ingestion.")
            return HttpResponseRedirect(reverse("admin:knowledge_source_changelist"))
        context = {**self.admin_site.each_context(request), "form": form, "opts": self.model._meta,
                   "title": "Upload knowledge-base files"}
        return TemplateResponse(request, "admin/knowledge/source/upload.html", context)

    def changelist_view(self, request, extra_context=None):
        busy = Source.objects.filter(
            status__in=[Source.Status.QUEUED, Source.Status.PARSING, Source.Status.EMBEDDING]
        ).exists()
        return super().changelist_view(request, {**(extra_context or {}), "ingestion_busy": busy})

    @admin.display(description="status", ordering="status")
    def status_badge(self, source: Source) -> str:
        colours = {"ready": "#2e7d32", "failed": "#c62828"}
        return format_html('<b style="color:{}">{}</b>', colours.get(source.status, "#555"), source.get_status_display())

    @admin.display(description="reason")
    def error_short(self, source: Source) -> str:
        return source.error[:120]

    @admin.action(description="Re-ingest selected sources")
    def reingest(self, request, queryset):
        from django.db import transaction

        from knowledge.tasks import ingest_source

        ids = list(queryset.values_list("pk", flat=True))
        queryset.update(status=Source.Status.QUEUED, progress=0, error="")
        transaction.on_commit(lambda: [ingest_source.delay(pk, force=True) for pk in ids])
        self.message_user(request, f"{len(ids)} source(s) queued.", messages.SUCCESS)

    def delete_model(self, request, obj):
        services.source_delete(obj)

    def delete_queryset(self, request, queryset):
        for source in queryset:
            services.source_delete(source)


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

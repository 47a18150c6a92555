"""Admin for conversations (read-only transcripts), the model-version registry, and the sites that
embed the widget with the collection each answers from and the identity secret that signs their
signed-in customers' user ids (``chat.identity``)."""

from __future__ import annotations

from django import forms
from django.contrib import admin, messages

from chat import services
from chat.engine import EngineError
from chat.models import COLLECTION_PATTERN, Conversation, Message, ModelVersion, WidgetSite
from chat.origins import origin_normalize


@admin.register(ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ["name", "is_active", "base_model_path", "adapter_path", "created_at"]
    list_filter = ["is_active"]
    readonly_fields = ["base_model_sha256", "adapter_sha256", "is_active", "created_at"]
    actions = ["activate"]

    @admin.action(description="Serve this version (activate)")
    def activate(self, request, queryset):
        if queryset.count() != 1:
            self.message_user(request, "Select exactly one version to activate.", messages.ERROR)
            return
        version = queryset.get()
        try:
            version = services.model_version_activate(version)
        except (FileNotFoundError, EngineError, ModelVersion.DoesNotExist) as error:
            # refused (a file's SHA-256 differs: recorded on the version), a file missing here or in the
            # artifact storage, the storage failing, or the version deleted meanwhile: the active
            # version is unchanged, as with the dashboard's button and ``manage.py rollback_model``
            active = ModelVersion.objects.filter(is_active=True).first()
            self.message_user(request, f"{version.name} was not activated: {error}. "
                                       f"{active.name if active else 'No version'} is still served.", messages.ERROR)
            return
        self.message_user(request, f"{version.name} is now served; chats in progress finish on the old model.",
                          messages.SUCCESS)


class MessageInline(admin.TabularInline):
    model = Message
    extra = 0
    can_delete = False
    fields = ["created_at", "role", "text", "abstained", "citations", "timings", "model_version"]
    readonly_fields = fields

    def has_add_permission(self, request, obj=None):
        return False


@admin.register(Conversation)
class ConversationAdmin(admin.ModelAdmin):
    list_display = ["id", "status", "collection", "origin", "verified_user_id", "created_at", "updated_at"]
    list_filter = ["status", "collection"]
    search_fields = ["verified_user_id"]
    readonly_fields = ["id", "verified_user_id", "created_at", "updated_at"]
    exclude = ["token"]
    inlines = [MessageInline]


class WidgetSiteForm(forms.ModelForm):
    """Origins are stored as browsers send them (``chat.origins.origin_normalize``); a malformed
    origin or collection name is a form error, not a database error."""

    collection = forms.RegexField(regex=COLLECTION_PATTERN, max_length=100,
                                  help_text="Letters, digits, '_', '.' or '-' (the collection of its sources).")

    class Meta:
        model = WidgetSite
        fields = ["origin", "collection", "identity_required"]

    def clean_origin(self) -> str:
        try:
            return origin_normalize(self.cleaned_data["origin"])
        except ValueError as error:
            raise forms.ValidationError(str(error)) from None


@admin.register(WidgetSite)
class WidgetSiteAdmin(admin.ModelAdmin):
    """Which knowledge-base collection each embedding site's conversations answer from. The site must
    also be allowed to embed the widget (``WIDGET_ALLOWED_ORIGINS``)."""

    form = WidgetSiteForm
    list_display = ["origin", "collection", "identity_required", "updated_at"]
    search_fields = ["origin", "collection"]
    readonly_fields = ["identity_secret_shown"]
    actions = ["rotate_identity_secret"]

    @admin.display(description="identity secret")
    def identity_secret_shown(self, site: WidgetSite) -> str:
        """The secret on the change page (generated when the site is first saved); the host site's
        server signs user ids with it: user_hash = HMAC-SHA256(secret, user_id), hex."""
        if site.pk is None:
            return "Generated when the site is saved."
        return site.identity_secret

    @admin.action(description="Rotate identity secret (old hashes stop verifying at once)")
    def rotate_identity_secret(self, request, queryset):
        sites = [services.widget_site_identity_secret_rotate(site) for site in queryset]
        self.message_user(request, f"New identity secret for {', '.join(site.origin for site in sites)}: "
                                   "deploy it to the host site's server; hashes made with the old one are refused.")

"""Identity verification (chat.identity): a secret per widget site, the "enforce" switch, and the
verified user id of a conversation.

An ``AddField`` with a callable default evaluates it once for every existing row, which would give
every existing site the same secret (one site could then sign another's users); so the column is
added nullable, each row gets its own secret, and only then is it made unique and required.
"""

from django.db import migrations, models

import chat.models


def secrets_generate(apps, schema_editor):
    WidgetSite = apps.get_model("chat", "WidgetSite")
    for site in WidgetSite.objects.filter(identity_secret__isnull=True):
        site.identity_secret = chat.models.widget_identity_secret()
        site.save(update_fields=["identity_secret"])


class Migration(migrations.Migration):

    dependencies = [
        ("chat", "0005_modelversion_refused"),
    ]

    operations = [
        migrations.AddField(
            model_name="widgetsite",
            name="identity_secret",
            field=models.CharField(max_length=64, null=True, editable=False),
        ),
        migrations.RunPython(secrets_generate, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="widgetsite",
            name="identity_secret",
            field=models.CharField(
                default=chat.models.widget_identity_secret, editable=False, max_length=64, unique=True,
                help_text="Signs the user ids of signed-in customers: user_hash = HMAC-SHA256(secret, user_id), hex. "
                          "Keep it on the host site's server, never in a page.",
            ),
        ),
        migrations.AddField(
            model_name="widgetsite",
            name="identity_required",
            field=models.BooleanField(
                default=False, verbose_name="require identity verification",
                help_text="Enforce: refuse conversations without a verified user id (for a widget shown only to "
                          "signed-in customers). A user id without a valid hash is refused either way.",
            ),
        ),
        migrations.AddConstraint(
            model_name="widgetsite",
            constraint=models.CheckConstraint(
                condition=models.Q(("identity_secret__regex", "^[0-9a-f]{64}$")),
                name="widgetsite_identity_secret_form",
            ),
        ),
        migrations.AddField(
            model_name="conversation",
            name="verified_user_id",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddConstraint(
            model_name="conversation",
            constraint=models.CheckConstraint(
                condition=models.Q(("verified_user_id", ""), models.Q(("origin", ""), _negated=True), _connector="OR"),
                name="conversation_verified_user_has_origin",
            ),
        ),
        migrations.AddIndex(
            model_name="conversation",
            index=models.Index(
                condition=models.Q(("verified_user_id", ""), _negated=True),
                fields=["origin", "verified_user_id", "-updated_at"],
                name="conversation_verified_user",
            ),
        ),
    ]

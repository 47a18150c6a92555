"""Embedder runs snapshot the questions of the approved corrections without evidence chunks (marked
unanswerable) for the gate's abstention check."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tuning', '0007_embedder_run_promoting'),
    ]

    operations = [
        migrations.AddField(
            model_name='embedderrun',
            name='unanswerable_questions',
            field=models.JSONField(blank=True, default=list),
        ),
    ]

"""Embedder runs show "promoting" while their winning candidate is switched in (still one run in
progress at a time)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tuning', '0006_embedder_run_versions'),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='embedderrun',
            name='embedderrun_one_in_progress',
        ),
        migrations.AlterField(
            model_name='embedderrun',
            name='status',
            field=models.CharField(choices=[('queued', 'Queued'), ('training', 'Training'), ('reembedding', 'Re-embedding (shadow)'), ('evaluating', 'Evaluating'), ('promoting', 'Promoting'), ('succeeded', 'Succeeded'), ('failed', 'Failed')], db_index=True, default='queued', max_length=20),
        ),
        migrations.AddConstraint(
            model_name='embedderrun',
            constraint=models.UniqueConstraint(models.Value(True), condition=models.Q(('status__in', ['queued', 'training', 'reembedding', 'evaluating', 'promoting'])), name='embedderrun_one_in_progress'),
        ),
    ]

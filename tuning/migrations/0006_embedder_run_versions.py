"""Embedder runs register their candidate as an embedding-model version, re-embed into its shadow
vectors (status "reembedding"), and record the gate's decision and whether they promoted it."""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0009_embedding_versions'),
        ('tuning', '0005_modelevaluation_decision'),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name='embedderrun',
            name='embedderrun_one_in_progress',
        ),
        migrations.AlterField(
            model_name='embedderrun',
            name='status',
            field=models.CharField(choices=[('queued', 'Queued'), ('training', 'Training'), ('reembedding', 'Re-embedding (shadow)'), ('evaluating', 'Evaluating'), ('succeeded', 'Succeeded'), ('failed', 'Failed')], db_index=True, default='queued', max_length=20),
        ),
        migrations.AddField(
            model_name='embedderrun',
            name='embedding_version',
            field=models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='knowledge.embeddingmodelversion'),
        ),
        migrations.AddField(
            model_name='embedderrun',
            name='reembedding_progress',
            field=models.FloatField(default=0.0),
        ),
        migrations.AddField(
            model_name='embedderrun',
            name='decision',
            field=models.JSONField(blank=True, default=dict),
        ),
        migrations.AddField(
            model_name='embedderrun',
            name='promoted',
            field=models.BooleanField(default=False),
        ),
        migrations.AddConstraint(
            model_name='embedderrun',
            constraint=models.UniqueConstraint(models.Value(True), condition=models.Q(('status__in', ['queued', 'training', 'reembedding', 'evaluating'])), name='embedderrun_one_in_progress'),
        ),
    ]

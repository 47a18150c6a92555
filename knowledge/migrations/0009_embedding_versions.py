"""Embedding-model versions (blue/green vectors, one active) and the shadow vectors of non-active
versions (knowledge.models.EmbeddingModelVersion, ChunkEmbedding). No row is written here: until the
first version is registered, the settings' model is the implicit active one
(knowledge.embedding.active_embedding), so a flushed or fresh database needs no data migration."""

import django.db.models.deletion
import pgvector.django.vector
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0008_lexeme_frequency'),
    ]

    operations = [
        migrations.CreateModel(
            name='EmbeddingModelVersion',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('name', models.CharField(help_text='Recorded on chunks as <name>@<dimension>.', max_length=200, unique=True)),
                ('path', models.CharField(help_text='sentence-transformers folder (or hub name) of the model.', max_length=1000)),
                ('sha256', models.CharField(blank=True, help_text="Digest of the folder's files; empty for a hub name.", max_length=64)),
                ('dimension', models.PositiveIntegerField()),
                ('status', models.CharField(choices=[('building', 'Building (shadow re-embed)'), ('ready', 'Ready (shadow vectors complete)'), ('active', 'Active (serving)'), ('retired', 'Retired'), ('rejected', 'Rejected by the gate'), ('failed', 'Failed')], default='building', max_length=20)),
                ('reason', models.TextField(blank=True, help_text='Why the build failed, or the latest activation note.')),
                ('progress', models.FloatField(default=0.0, help_text='Share of chunks with a shadow vector, 0..1.')),
                ('chunks_total', models.PositiveIntegerField(default=0)),
                ('chunks_done', models.PositiveIntegerField(default=0)),
                ('note', models.CharField(blank=True, help_text='Where the version comes from (e.g. embedder run 4).', max_length=300)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('heartbeat_at', models.DateTimeField(blank=True, null=True)),
                ('ready_at', models.DateTimeField(blank=True, null=True)),
                ('promoted_at', models.DateTimeField(blank=True, null=True)),
                ('retired_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'verbose_name': 'embedding model version',
                'ordering': ['-created_at', '-id'],
                'constraints': [
                    models.UniqueConstraint(condition=models.Q(('status', 'active')), fields=('status',), name='embeddingversion_one_active'),
                    models.CheckConstraint(condition=models.Q(('progress__gte', 0), ('progress__lte', 1)), name='embeddingversion_progress_range'),
                    models.CheckConstraint(condition=models.Q(('dimension__gte', 1)), name='embeddingversion_dimension_positive'),
                ],
            },
        ),
        migrations.CreateModel(
            name='ChunkEmbedding',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('embedding', pgvector.django.vector.VectorField()),
                ('chunk', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='version_embeddings', to='knowledge.chunk')),
                ('version', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='chunk_embeddings', to='knowledge.embeddingmodelversion')),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('version', 'chunk'), name='chunkembedding_unique_per_version')],
            },
        ),
    ]

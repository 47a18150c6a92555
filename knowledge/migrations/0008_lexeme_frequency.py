"""Document frequencies of the full-text lexemes per collection (``LexemeFrequency``), filled here for
the chunks already stored; ``knowledge.services.lexeme_frequencies_refresh`` keeps them current."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0007_source_unsent'),
    ]

    operations = [
        migrations.CreateModel(
            name='LexemeFrequency',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('collection', models.CharField(max_length=100)),
                ('lexeme', models.TextField()),
                ('document_frequency', models.PositiveIntegerField()),
            ],
            options={
                'constraints': [models.UniqueConstraint(fields=('collection', 'lexeme'), name='lexeme_frequency_unique')],
            },
        ),
        migrations.RunSQL(
            """
            INSERT INTO knowledge_lexemefrequency (collection, lexeme, document_frequency)
            SELECT c.collection, l.lexeme, count(*)
            FROM knowledge_chunk c CROSS JOIN unnest(tsvector_to_array(c.search_vector)) AS l(lexeme)
            WHERE c.search_vector IS NOT NULL
            GROUP BY c.collection, l.lexeme
            """,
            migrations.RunSQL.noop,
        ),
    ]

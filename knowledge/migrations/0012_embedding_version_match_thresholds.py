"""Each embedding version may also carry its own curated-answer match threshold (cosine distance 0..2
between two questions) and own-words margin (a difference of distances, -2..2), fitted by the embedder
gate to its distance scale; empty means the settings' values."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0011_embedding_version_thresholds'),
    ]

    operations = [
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='curated_match_max_distance',
            field=models.FloatField(blank=True, help_text='Curated-answer match threshold of this version (cosine distance 0..2 between two questions); empty: the CURATED_MATCH_MAX_DISTANCE setting.', null=True),
        ),
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='follow_up_own_margin',
            field=models.FloatField(blank=True, help_text='Own-words margin of this version (a difference of cosine distances; negative: off); empty: the FOLLOW_UP_OWN_MARGIN setting.', null=True),
        ),
        migrations.AddConstraint(
            model_name='embeddingmodelversion',
            constraint=models.CheckConstraint(condition=models.Q(('curated_match_max_distance__isnull', True), models.Q(('curated_match_max_distance__gte', 0), ('curated_match_max_distance__lte', 2)), _connector='OR'), name='embeddingversion_curated_distance_range'),
        ),
        migrations.AddConstraint(
            model_name='embeddingmodelversion',
            constraint=models.CheckConstraint(condition=models.Q(('follow_up_own_margin__isnull', True), models.Q(('follow_up_own_margin__gte', -2), ('follow_up_own_margin__lte', 2)), _connector='OR'), name='embeddingversion_own_margin_range'),
        ),
    ]

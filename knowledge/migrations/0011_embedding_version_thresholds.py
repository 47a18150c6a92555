"""Each embedding version may carry its own abstention thresholds (cosine distance 0..2), fitted by the
embedder gate to its distance scale, and how they were fitted; empty means the settings' values."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0010_embedding_version_promotion'),
    ]

    operations = [
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='abstain_max_distance',
            field=models.FloatField(blank=True, help_text='Abstention threshold of this version (cosine distance 0..2); empty: the ABSTAIN_MAX_DISTANCE setting.', null=True),
        ),
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='follow_up_max_distance',
            field=models.FloatField(blank=True, help_text='Follow-up threshold of this version (cosine distance 0..2); empty: the FOLLOW_UP_MAX_DISTANCE setting.', null=True),
        ),
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='calibration',
            field=models.JSONField(blank=True, default=dict, help_text="How the thresholds were fitted (the embedder gate's numbers)."),
        ),
        migrations.AddConstraint(
            model_name='embeddingmodelversion',
            constraint=models.CheckConstraint(condition=models.Q(('abstain_max_distance__isnull', True), models.Q(('abstain_max_distance__gte', 0), ('abstain_max_distance__lte', 2)), _connector='OR'), name='embeddingversion_abstain_distance_range'),
        ),
    ]

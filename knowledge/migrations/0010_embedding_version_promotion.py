"""Promotion and rollback of an embedding version run in a worker: the target is "promoting" while the
switch is queued or running (at most one at a time; "promoting_from" is where a failed switch returns)."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0009_embedding_versions'),
    ]

    operations = [
        migrations.AlterField(
            model_name='embeddingmodelversion',
            name='status',
            field=models.CharField(choices=[('building', 'Building (shadow re-embed)'), ('ready', 'Ready (shadow vectors complete)'), ('active', 'Active (serving)'), ('retired', 'Retired'), ('rejected', 'Rejected by the gate'), ('failed', 'Failed'), ('promoting', 'Promoting (switch queued or running)')], default='building', max_length=20),
        ),
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='promoting_from',
            field=models.CharField(blank=True, help_text='While promoting: the status it goes back to if the switch fails.', max_length=20),
        ),
        migrations.AddField(
            model_name='embeddingmodelversion',
            name='promotion_requested_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
        migrations.AddConstraint(
            model_name='embeddingmodelversion',
            constraint=models.UniqueConstraint(condition=models.Q(('status', 'promoting')), fields=('status',), name='embeddingversion_one_promoting'),
        ),
    ]

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tuning', '0004_embedder_runs'),
    ]

    operations = [
        migrations.AddField(
            model_name='modelevaluation',
            name='decision',
            field=models.JSONField(blank=True, default=dict),
        ),
    ]

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('tuning', '0002_datasets_runs_evaluations'),
    ]

    operations = [
        migrations.AddField(
            model_name='modelevaluation',
            name='decision',
            field=models.JSONField(blank=True, default=dict),
        ),
    ]

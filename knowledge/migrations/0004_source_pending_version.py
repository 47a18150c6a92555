from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('knowledge', '0003_curated_answers'),
    ]

    operations = [
        migrations.AddField(
            model_name='source',
            name='pending_version',
            field=models.PositiveIntegerField(default=0),
        ),
    ]

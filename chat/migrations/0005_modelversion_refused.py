from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('chat', '0004_widgetsite'),
    ]

    operations = [
        migrations.AddField(
            model_name='modelversion',
            name='refused_reason',
            field=models.TextField(blank=True),
        ),
        migrations.AddField(
            model_name='modelversion',
            name='refused_at',
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]

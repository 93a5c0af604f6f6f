import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("mailbox", "0001_initial"),
    ]

    operations = [
        migrations.RemoveIndex(
            model_name="message",
            name="message_queue",
        ),
        migrations.AlterField(
            model_name="message",
            name="mailbox",
            field=models.ForeignKey(
                db_index=False,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="messages",
                to="mailbox.mailbox",
            ),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(
                condition=models.Q(("acked_at__isnull", True)),
                fields=["mailbox", "seq"],
                name="message_queue",
            ),
        ),
    ]

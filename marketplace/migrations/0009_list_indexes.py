# Indexes for the list reads (a buyer's tasks, open tasks, a device's bids and work).

from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("marketplace", "0008_device_asking_prices"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.AddIndex(
            model_name="bid",
            index=models.Index(fields=["device"], name="bid_by_device"),
        ),
        migrations.AddIndex(
            model_name="selectednode",
            index=models.Index(fields=["device"], name="selected_by_device"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(fields=["buyer", "chain_task_id"], name="task_buyer_by_id"),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                fields=["buyer", "state", "chain_task_id"], name="task_buyer_state_by_id"
            ),
        ),
        migrations.AddIndex(
            model_name="task",
            index=models.Index(
                condition=models.Q(("state", "bidding")),
                fields=["bidding_ends", "chain_task_id"],
                name="task_open_by_deadline",
            ),
        ),
        migrations.AddIndex(
            model_name="update",
            index=models.Index(fields=["trainer"], name="update_by_trainer"),
        ),
    ]

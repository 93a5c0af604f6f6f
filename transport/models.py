"""What the transport stores: action replies, for idempotent retries."""

from django.db import models


class ActionRecord(models.Model):
    """The reply to one action id of one session, kept for the dedupe window.

    A row is claimed (`reply` null) before the handler runs, so a retry that
    arrives while the first attempt still runs waits for it instead of
    running the handler again.
    """

    session_id = models.CharField(max_length=40)
    action_id = models.CharField(max_length=140)
    action = models.CharField(max_length=100)
    created_at = models.DateTimeField(db_index=True)
    reply = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session_id", "action_id"], name="action_once"),
        ]

    def __str__(self) -> str:
        return f"{self.session_id}:{self.action_id}"

"""A mailbox per session, and the messages queued in it."""

from django.db import models


class Mailbox(models.Model):
    """One client session and the state of its queue.

    Invariants, kept by every writer under the mailbox's row lock (the
    write transaction on SQLite, SELECT ... FOR UPDATE on PostgreSQL):
    - `last_seq` is the highest sequence number ever allocated; numbers are
      never reused, so it only grows.
    - `queued` equals the number of its messages with `acked_at` unset.
    - `lost_seq` is the highest seq of a durable message dropped before the
      client acknowledged it; a cursor below it has a gap.
    """

    session_id = models.CharField(max_length=40, primary_key=True)
    created_at = models.DateTimeField()
    last_seen_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)

    last_seq = models.BigIntegerField(default=0)
    acked_seq = models.BigIntegerField(default=0)
    lost_seq = models.BigIntegerField(default=0)
    queued = models.IntegerField(default=0)
    high_water = models.IntegerField(default=0)

    # Open WebSockets and a lease renewed while they live: a server killed
    # without closing them leaves the count behind, the lease runs out.
    ws_connections = models.IntegerField(default=0)
    ws_until = models.DateTimeField(null=True, blank=True)
    rest_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name_plural = "mailboxes"

    def __str__(self) -> str:
        return self.session_id


class Message(models.Model):
    """One message in a mailbox; queued until acknowledged or dropped."""

    class Source(models.TextChoices):
        ROUTER = "router"
        SYSTEM = "system"

    # No index of its own: the unique (mailbox, seq) index leads with it.
    mailbox = models.ForeignKey(
        Mailbox, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    seq = models.BigIntegerField()
    message_type = models.CharField(max_length=200)
    payload = models.JSONField()
    source = models.CharField(max_length=10, choices=Source.choices, default=Source.SYSTEM)
    durable = models.BooleanField(default=True)
    sent_at = models.DateTimeField()
    expires_at = models.DateTimeField(db_index=True)
    acked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["mailbox", "seq"], name="message_unique_seq"),
        ]
        # The queue: only unacknowledged messages, so it stays as small as
        # the queues are, and an ack takes a message out of it.
        indexes = [
            models.Index(
                fields=["mailbox", "seq"],
                name="message_queue",
                condition=models.Q(acked_at__isnull=True),
            )
        ]

    def __str__(self) -> str:
        return f"{self.mailbox_id}#{self.seq}"

"""Signals the mailbox sends at each event of the telemetry plan.

Every signal is sent after the transaction that caused it commits, so a
rolled-back deliver() is never counted. Receivers live in the telemetry app.
"""

from django.dispatch import Signal

# use_caching: receivers are looked up once per sender, not on every send of
# the hot path; connecting or disconnecting one clears the cache.

# session_id, seq, message_type, source ("router" or "system"), durable
message_enqueued = Signal(use_caching=True)

# session_id, transport ("ws", "rest", "mailbox"), messages (list of
# (seq, message_type) pairs)
messages_delivered = Signal(use_caching=True)

# session_id, reason ("ttl", "overflow", "transport-closed"), count,
# message_type (None when a batch of several types was dropped)
messages_dropped = Signal(use_caching=True)

# session_id, high_water: the mailbox emptied, or was removed while holding
# messages; its high-water mark since it last drained is final.
mailbox_drained = Signal(use_caching=True)

# session_id: a session and its mailbox were created.
session_created = Signal(use_caching=True)

# session_id, count of queued messages it held: removed by expiry.
session_expired = Signal(use_caching=True)

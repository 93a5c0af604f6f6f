"""Signals the transport sends at each event of the telemetry plan.

Receivers live in the telemetry app; transport code only sends.
"""

from django.dispatch import Signal

# use_caching: receivers are looked up once per sender, not on every send of
# the hot path; connecting or disconnecting one clears the cache.

# session_id, transport ("ws", "rest", "mailbox")
session_opened = Signal(use_caching=True)
session_closed = Signal(use_caching=True)

# session_id, transport, action (the registered name, or "unknown"),
# payload (for debug traces only; never logged above debug)
action_received = Signal(use_caching=True)

# session_id, transport, action, ok, duration_ms (receive to worker reply)
action_answered = Signal(use_caching=True)

# session_id, outcome ("messages", "timeout", "error"), duration_ms
poll_completed = Signal(use_caching=True)

# transport, network (the client's prefix, e.g. "192.0.2.0/24"), retry_after
rate_limited = Signal(use_caching=True)

# transport, size: bytes of one frame or response body sent to a client
payload_sent = Signal(use_caching=True)

# session_id (or None before hello), transport, code: a malformed frame or body
bad_input = Signal(use_caching=True)

"""Signals the transport sends at each event of the telemetry plan.

Receivers live in the telemetry app; transport code only sends.
"""

from django.dispatch import Signal

# session_id, transport ("ws", "rest", "mailbox")
session_opened = Signal()
session_closed = Signal()

# session_id, transport, action (the registered name, or "unknown"),
# payload (for debug traces only; never logged above debug)
action_received = Signal()

# session_id, transport, action, ok, duration_ms (receive to worker reply)
action_answered = Signal()

# session_id, outcome ("messages", "timeout", "error"), duration_ms
poll_completed = Signal()

# transport, network (the client's prefix, e.g. "192.0.2.0/24"), retry_after
rate_limited = Signal()

# transport, size: bytes of one frame or response body sent to a client
payload_sent = Signal()

# session_id (or None before hello), transport, code: a malformed frame or body
bad_input = Signal()

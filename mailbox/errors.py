"""Errors raised by the mailbox API, each carrying the offending value."""


class MailboxError(Exception):
    """Base class of every mailbox error."""


class MailboxNotFound(MailboxError):
    """No live mailbox has this session id (never created, or expired)."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no such session: {session_id!r}")
        self.session_id = session_id


class InvalidMessage(MailboxError):
    """A message to deliver has a bad type, payload or TTL."""

    def __init__(self, field: str, value: object, reason: str) -> None:
        super().__init__(f"invalid {field} {value!r}: {reason}")
        self.field = field
        self.value = value

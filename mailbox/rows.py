"""Read and write the rows of every message's path with statements prepared once.

Every message costs a locked read of its mailbox and a write of its
counters, on deliver and again on ack, and every fetch a read of the queue.
Built by the ORM's query compiler, each of those cost several times the
statement itself (about 0.3 ms on a 2-core machine), so the SQL is built
once per database and only the values go through the fields' own
converters and adapters: the model instances are the ORM's own.
"""

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any, Generic, TypeVar

from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from django.db.models import Field, Model
from django.db.models.expressions import Col

from mailbox.models import Mailbox, Message

M = TypeVar("M", bound=Model)


def database() -> BaseDatabaseWrapper:
    """Return this thread's default connection, looked up once for several uses.

    Each attribute of django.db.connection looks the thread's connection up
    again; on the message path that was a tenth of the Python time.
    """
    return connections[DEFAULT_DB_ALIAS]


Converter = Callable[[Any, Any, Any], Any]


class Select(Generic[M]):
    """A SELECT of some fields of a model, its SQL and converters built once per database."""

    def __init__(self, model: type[M], names: Sequence[str], clauses: str) -> None:
        self.model = model
        # In the model's own order: from_db() fills the fields left out by it.
        self.fields: list[Field[Any, Any]] = [
            field for field in model._meta.concrete_fields if field.name in names
        ]
        self.names = [field.attname for field in self.fields]
        self.clauses = clauses

    @cache  # noqa: B019 - a handful of module-level statements, kept for the process
    def _prepared(self, vendor: str) -> tuple[str, list[tuple[Col, list[Converter]]]]:
        quote = connection.ops.quote_name
        table = self.model._meta.db_table
        columns = ", ".join(quote(field.column) for field in self.fields)
        converters = []
        for field in self.fields:
            column = Col(table, field)
            # get_db_converters is missing from django-stubs, present on every Field.
            own = field.get_db_converters(connection)  # type: ignore[attr-defined]
            converters.append((column, connection.ops.get_db_converters(column) + own))
        return f"SELECT {columns} FROM {quote(table)} WHERE {self.clauses}", converters

    def rows(self, params: Sequence[Any], suffix: str = "") -> list[M]:
        """Run the SELECT (with `suffix` appended) and return model instances."""
        db = database()
        sql, converters = self._prepared(db.vendor)
        with db.cursor() as cursor:
            cursor.execute(sql + suffix, params)
            found = cursor.fetchall()

        instances = []
        for row in found:
            values = list(row)
            for index, (column, convert_all) in enumerate(converters):
                for convert in convert_all:
                    values[index] = convert(values[index], column, db)
            instances.append(self.model.from_db(db.alias, self.names, values))
        return instances


_MAILBOX = Select(
    Mailbox, [field.name for field in Mailbox._meta.concrete_fields], "session_id = %s"
)


def read_mailbox(session_id: str, *, lock: bool = False) -> Mailbox | None:
    """Return a session's mailbox, locked until the transaction ends if `lock`."""
    # SQLite has no FOR UPDATE: its transactions begin IMMEDIATE, so the
    # write lock is already held.
    locking = lock and database().features.has_select_for_update
    found = _MAILBOX.rows([session_id], " FOR UPDATE" if locking else "")
    return found[0] if found else None


_QUEUED = Select(
    Message,
    ["id", "seq", "message_type", "payload", "sent_at", "expires_at", "durable"],
    "mailbox_id = %s AND seq > %s AND acked_at IS NULL ORDER BY seq LIMIT %s",
)


def queued_after(session_id: str, after: int, limit: int) -> list[Message]:
    """Return up to `limit` unacknowledged messages with seq > `after`, in seq order."""
    return _QUEUED.rows([session_id, after, limit])


_MAILBOX_FIELDS = {field.attname: field for field in Mailbox._meta.concrete_fields}


@cache
def _update(vendor: str, names: tuple[str, ...]) -> str:
    quote = connection.ops.quote_name
    columns = (_MAILBOX_FIELDS[name].column for name in names)
    assignments = ", ".join(f"{quote(column)} = %s" for column in columns)
    return f"UPDATE {quote(Mailbox._meta.db_table)} SET {assignments} WHERE session_id = %s"


def save_mailbox(box: Mailbox, names: Sequence[str]) -> None:
    """Write the named fields of a mailbox, as save(update_fields=names) would."""
    db = database()
    values = [_MAILBOX_FIELDS[name].get_db_prep_save(getattr(box, name), db) for name in names]
    with db.cursor() as cursor:
        cursor.execute(_update(db.vendor, tuple(names)), [*values, box.session_id])

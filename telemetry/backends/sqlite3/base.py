"""SQLite, with its statements counted and timed."""

from typing import Any

from django.db.backends.sqlite3 import base

from telemetry.backends.measured import MeasuredConnection, measured_cursor


class DatabaseWrapper(MeasuredConnection, base.DatabaseWrapper):
    _cursor_class: type | None = None

    def create_cursor(self, name: Any = None) -> Any:
        if self._cursor_class is None:
            self._cursor_class = measured_cursor(base.SQLiteCursorWrapper, self.alias, self.vendor)
        return self.connection.cursor(factory=self._cursor_class)

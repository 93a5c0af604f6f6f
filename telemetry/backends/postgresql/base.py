"""PostgreSQL, with its statements counted and timed."""

from typing import Any

from django.db.backends.postgresql import base

from telemetry.backends.measured import MeasuredConnection, measured_cursor


class DatabaseWrapper(MeasuredConnection, base.DatabaseWrapper):
    def get_connection_params(self) -> dict[str, Any]:
        # psycopg builds every cursor of the connection from this class.
        params: dict[str, Any] = super().get_connection_params()
        params["cursor_factory"] = measured_cursor(
            params["cursor_factory"], self.alias, self.vendor
        )
        return params

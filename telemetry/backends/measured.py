"""The instrumented cursor and connection shared by the SQLite and PostgreSQL engines."""

from collections.abc import Sequence
from time import perf_counter
from typing import Any

from django_prometheus.db import (
    connection_errors_total,
    connections_total,
    errors_total,
    execute_many_total,
    execute_total,
    query_duration_seconds,
)


def measured_cursor(cursor_class: type, alias: str, vendor: str) -> type:
    """Return a subclass of `cursor_class` that counts and times every statement."""
    executed = execute_total.labels(alias, vendor)
    executed_many = execute_many_total.labels(alias, vendor)
    duration = query_duration_seconds.labels(alias, vendor)

    # SQLite's wrapper converts "%s" to "?" on every execute; the DB-API
    # cursor below it runs a query converted once (execute_each) as it is.
    convert = getattr(cursor_class, "convert_query", None)
    below: Any = cursor_class.__mro__[1] if convert else cursor_class

    def failed(exc: BaseException) -> None:
        errors_total.labels(alias, vendor, type(exc).__name__).inc()

    class MeasuredCursor(cursor_class):
        def execute(self, *args: Any, **kwargs: Any) -> Any:
            executed.inc()
            started = perf_counter()
            try:
                return super().execute(*args, **kwargs)
            except BaseException as exc:
                failed(exc)
                raise
            finally:
                duration.observe(perf_counter() - started)

        def executemany(self, query: Any, param_list: Any, *args: Any, **kwargs: Any) -> Any:
            # A generator has no len(): read it into a list first.
            rows = param_list if hasattr(param_list, "__len__") else list(param_list)
            executed.inc(len(rows))
            executed_many.inc(len(rows))
            started = perf_counter()
            try:
                return super().executemany(query, rows, *args, **kwargs)
            except BaseException as exc:
                failed(exc)
                raise
            finally:
                duration.observe(perf_counter() - started)

        def execute_each(self, statements: Sequence[tuple[str, Sequence[Any]]]) -> list[int]:
            """Run statements one by one; return the rowcount of each.

            For a batch whose statements need a rowcount each, which
            executemany does not give. Django's wrapping of every statement
            (placeholder conversion, error mapping, these metrics) cost more
            CPU than SQLite's own work on a short INSERT: here each distinct
            query is converted once, and the batch counts as executemany
            does, its statements and one duration. The caller maps errors
            (connection.wrap_database_errors).
            """
            converted: dict[str, str] = {}
            counts: list[int] = []
            executed.inc(len(statements))
            executed_many.inc(len(statements))
            started = perf_counter()
            try:
                for query, params in statements:
                    ready = converted.get(query)
                    if ready is None:
                        ready = converted[query] = convert(self, query) if convert else query
                    below.execute(self, ready, params)
                    counts.append(self.rowcount)
                return counts
            except BaseException as exc:
                failed(exc)
                raise
            finally:
                duration.observe(perf_counter() - started)

    return MeasuredCursor


class MeasuredConnection:
    """Count new connections and the failures to open one (a DatabaseWrapper mixin)."""

    alias: str
    vendor: str

    def get_new_connection(self, *args: Any, **kwargs: Any) -> Any:
        connections_total.labels(self.alias, self.vendor).inc()
        try:
            return super().get_new_connection(*args, **kwargs)  # type: ignore[misc]
        except Exception:
            connection_errors_total.labels(self.alias, self.vendor).inc()
            raise

"""Spans around the mailbox's entry points, by the names of the telemetry plan."""

import functools
from collections.abc import Callable
from typing import Any, TypeVar

from opentelemetry import trace

tracer = trace.get_tracer("mailbox")

F = TypeVar("F", bound=Callable[..., Any])


def traced(name: str) -> Callable[[F], F]:
    """Run the decorated store function in a span named `name`.

    The first argument of every store entry point is the session id; it is
    the one attribute every span of the mailbox carries.
    """

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(session_id: str, *args: Any, **kwargs: Any) -> Any:
            with tracer.start_as_current_span(name) as span:
                span.set_attribute("transport.session_id", session_id)
                return fn(session_id, *args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate

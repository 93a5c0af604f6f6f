"""State kept per event loop: group-commit writers, made on first use.

Tests run each case on an event loop of its own, and a future or task of
one loop cannot be awaited on another; the state goes with its loop.
"""

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class PerLoop(Generic[T]):
    """One T for each running event loop."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._made: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        # A server has one loop: its T is found without the weak dict's
        # lookup, which every action and ack would otherwise pay, twice.
        self._last: tuple[weakref.ref[asyncio.AbstractEventLoop], T] | None = None

    def get(self) -> T:
        """Return the running loop's T, making it the first time."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0]() is loop:
            return last[1]
        found = self._made.get(loop)
        if found is None:
            found = self._made[loop] = self._factory()
        self._last = (weakref.ref(loop), found)
        return found

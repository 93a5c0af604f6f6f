"""Keep sessions with an open WebSocket on `ws`: one renewal for the whole process.

A session counts as `ws` while its lease (mailbox.store.WS_LEASE) runs.
One task per process renews the leases of every session it holds open in
one statement, a third of a lease apart, so one late renewal does not flap
a session to `mailbox`. A task and an UPDATE per connection would grow the
server's memory and the database's writes with every idle connection.
"""

import asyncio
import contextlib
import logging
from collections import Counter

from channels.db import database_sync_to_async
from django.db import Error as DatabaseError

from mailbox import store

logger = logging.getLogger(__name__)


class Leases:
    """The sessions this process holds open, and the task renewing them."""

    def __init__(self) -> None:
        self.open: Counter[str] = Counter()
        self.task: asyncio.Task[None] | None = None

    def hold(self, session_id: str) -> None:
        """Renew a session's lease from now on (called when it is welcomed)."""
        self.open[session_id] += 1
        loop = asyncio.get_running_loop()
        # A task of another, finished event loop (tests run one per test) is
        # forgotten, not reused.
        if self.task is None or self.task.done() or self.task.get_loop() is not loop:
            self.task = loop.create_task(self._renew_forever())

    def release(self, session_id: str) -> None:
        """Stop renewing for one closed connection of a session."""
        self.open[session_id] -= 1
        if self.open[session_id] <= 0:
            del self.open[session_id]
        if not self.open and self.task is not None:
            # Nothing to renew: stop, and start again with the next connection.
            if not self.task.get_loop().is_closed():
                self.task.cancel()
            self.task = None

    async def _renew_forever(self) -> None:
        interval = store.WS_LEASE.total_seconds() / 3
        while True:
            await asyncio.sleep(interval)
            with contextlib.suppress(DatabaseError):
                await database_sync_to_async(store.ws_renewed)(*self.open)


leases = Leases()

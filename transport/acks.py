"""WebSocket acknowledgements of one event loop, stored in group commits.

Each connection folds its own acks that arrive during a write into one;
this folds those of all connections. A client acking every message would
otherwise cost a transaction and a trip to the database thread per
message, and on SQLite each such write queues for the lock against the
site's own deliver() calls. Whatever queues while a batch is written goes
in the next one: no added delay when idle.
"""

import asyncio

from channels.db import database_sync_to_async

from mailbox import store
from transport.loops import PerLoop


class AckWriter:
    """The acknowledgements waiting to be stored, and the task storing them."""

    def __init__(self) -> None:
        self.pending: dict[str, int] = {}
        self.waiting: list[asyncio.Future[None]] = []
        self.flusher: asyncio.Task[None] | None = None

    async def store(self, session_id: str, seq: int) -> None:
        """Store an ack, with the others queued meanwhile; raise what the write raised."""
        self.pending[session_id] = max(seq, self.pending.get(session_id, 0))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush())
        await future

    async def _flush(self) -> None:
        while self.pending:
            acks, self.pending = self.pending, {}
            waiting, self.waiting = self.waiting, []
            try:
                await database_sync_to_async(store.ack_many)(list(acks.items()))
            except Exception as exc:
                for future in waiting:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for future in waiting:
                if not future.done():
                    future.set_result(None)


_writers = PerLoop(AckWriter)


def writer() -> AckWriter:
    """Return the ack writer of the running event loop."""
    return _writers.get()

"""WebSocket acknowledgements of one event loop, stored in group commits.

Each connection folds its own acks that arrive during a write into one;
this folds those of all connections. A client acking every message would
otherwise cost a transaction and a trip to the database thread per
message, and on SQLite each such write queues for the lock against the
site's own deliver() calls.
"""

from channels.db import database_sync_to_async

from mailbox import store as mailbox_store
from mailbox.loops import GroupCommit, PerLoop


async def _write(acks: list[tuple[str, int]]) -> list[None]:
    """Store a batch of acks, the highest of each session only."""
    highest: dict[str, int] = {}
    for session_id, seq in acks:
        highest[session_id] = max(seq, highest.get(session_id, 0))
    await database_sync_to_async(mailbox_store.ack_many)(list(highest.items()))
    return [None] * len(acks)


# A writer that wrote less than this long ago gathers acks this long before
# it writes again. Under a steady flow of messages (a thousand a second),
# writes that start at once hold only an ack or two each, and every one of
# them takes SQLite's write lock from the site's deliver() calls. The wait
# costs nothing the client sees: the window and the push go by acks as
# received, not as stored. A quiet connection's ack is written at once.
LINGER = 0.02

_writers = PerLoop(lambda: GroupCommit(_write, linger=LINGER))


async def store(session_id: str, seq: int) -> None:
    """Store an ack, with the others queued meanwhile; raise what the write raised."""
    await _writers.get().put((session_id, seq))

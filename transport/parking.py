"""One parked long-poll per session in this process.

A client needs one poll in flight. A second one of the same session (a
retry after a proxy cut the first, a second tab, a scripted flood) takes
the place of the first, which answers at once with what it has: so each
session holds at most one parked request and one waiter per server
process, however many polls it sends.

TODO: the rule is per process. Behind a balancer that spreads one
session's polls over N servers, it may park up to N polls; a session-wide
rule would need a supersede message through the channel layer.
"""

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

from mailbox.wakeup import Waiter


@dataclass
class Parked:
    """A parked poll: its waiter, and whether a newer poll took its place."""

    waiter: Waiter
    superseded: bool = False


class ParkedPolls:
    """The parked poll of each session, in this process's event loop."""

    def __init__(self) -> None:
        self._polls: dict[str, Parked] = {}

    @contextlib.contextmanager
    def park(self, session_id: str, waiter: Waiter) -> Iterator[Parked]:
        """Park a poll for the block, answering the session's earlier one now.

        The flag is set before the wake-up, so the earlier poll sees it
        whenever it wakes, even mid-fetch.
        """
        earlier = self._polls.get(session_id)
        if earlier is not None:
            earlier.superseded = True
            earlier.waiter.wake()
        parked = self._polls[session_id] = Parked(waiter)
        try:
            yield parked
        finally:
            if self._polls.get(session_id) is parked:
                del self._polls[session_id]

    def __len__(self) -> int:
        return len(self._polls)


parked_polls = ParkedPolls()

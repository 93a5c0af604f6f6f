"""Channels' `runworker`, kept alive through a channel layer outage."""

import asyncio
import logging

from channels.management.commands import runworker
from channels.worker import Worker

logger = logging.getLogger(__name__)

# Pause between attempts to receive while the channel layer is unreachable.
RETRY_DELAY = 1.0


class ResilientWorker(Worker):
    """A worker whose listeners retry when receiving fails.

    Channels' own worker exits on the first error from the layer, so a
    Redis restart would take every worker process down with it.
    """

    async def listener(self, channel: str) -> None:
        while True:
            try:
                await super().listener(channel)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.warning("receive on %s failed; retrying", channel, exc_info=True)
                await asyncio.sleep(RETRY_DELAY)


class Command(runworker.Command):
    help = (
        "Run jobs from channel-layer channels (`transport-worker` for actions); "
        "survives a Redis restart."
    )
    worker_class = ResilientWorker

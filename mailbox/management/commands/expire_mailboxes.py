"""Drop expired messages and sessions; meant to run from cron."""

import signal
import time
from types import FrameType
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError

from mailbox import expiry


class Command(BaseCommand):
    help = (
        "Drop expired messages (counted as ttl, or transport-closed when ephemeral), "
        "purge acknowledged ones and remove sessions idle past TRANSPORT_SESSION_TTL. "
        "Meant for cron: safe to run twice at once and beside live traffic; on SIGTERM "
        "it finishes the current batch and exits. Prints one summary line."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch-size",
            type=int,
            default=expiry.DEFAULT_BATCH_SIZE,
            help=f"messages per transaction, 1 to {expiry.MAX_BATCH_SIZE}",
        )
        parser.add_argument(
            "--dry-run",
            action="store_true",
            help="count what would be dropped and change nothing",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        size = options["batch_size"]
        if not 1 <= size <= expiry.MAX_BATCH_SIZE:
            raise CommandError(f"--batch-size {size} is not in 1..{expiry.MAX_BATCH_SIZE}")
        dry_run = options["dry_run"]
        verbose = options["verbosity"] >= 2

        stopping = False

        def stop(signum: int, frame: FrameType | None) -> None:
            nonlocal stopping
            stopping = True

        def progress(batch: expiry.SweepResult, total: expiry.SweepResult) -> None:
            if verbose:
                self.stdout.write(f"batch {total.batches}: {batch.summary(dry_run)}")

        previous = signal.signal(signal.SIGTERM, stop)
        started = time.monotonic()
        try:
            result = expiry.sweep(
                batch_size=size,
                dry_run=dry_run,
                should_stop=lambda: stopping,
                progress=progress,
            )
        except DatabaseError as exc:
            raise CommandError(
                f"database unreachable or not migrated (check DATABASE_URL): {exc}"
            ) from exc
        finally:
            signal.signal(signal.SIGTERM, previous)

        elapsed = time.monotonic() - started
        prefix = "expire_mailboxes (dry run)" if dry_run else "expire_mailboxes"
        self.stdout.write(f"{prefix}: {result.summary(dry_run)} in {elapsed:.2f}s")

"""Measure `manage.py expire_mailboxes` dropping a million expired messages.

Fills a fresh, migrated SQLite file with expired durable messages spread
over mailboxes, then runs the command as cron would, in its own process,
and reports its wall time and peak resident memory beside the peak of the
same command on an empty database (the cost of Django itself). Run it as

    .venv/bin/python -m bench.expire_bench [--messages N] [--per-mailbox M]
"""

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tests.helpers import ROOT, migrated_sqlite

DEFAULT_MESSAGES = 1_000_000
# The default mailbox capacity: every mailbox full, as after a long outage.
DEFAULT_PER_MAILBOX = 1000
# The command's own default (mailbox.expiry.DEFAULT_BATCH_SIZE); importing it
# would need Django set up in this process, which only seeds with sqlite3.
DEFAULT_BATCH_SIZE = 1000


def seed(path: Path, messages: int, per_mailbox: int) -> int:
    """Insert expired messages, `per_mailbox` to a mailbox; return the mailbox count."""
    boxes = -(-messages // per_mailbox)
    stamp = "%Y-%m-%d %H:%M:%S.%f"
    now = datetime.now(UTC)
    past = (now - timedelta(minutes=1)).strftime(stamp)
    future = (now + timedelta(days=1)).strftime(stamp)

    def rows() -> Iterator[tuple[str, int, str, str]]:
        for n in range(messages):
            yield (f"s_{n // per_mailbox:07d}", n % per_mailbox + 1, past, past)

    with sqlite3.connect(path) as db:
        db.executemany(
            "INSERT INTO mailbox_mailbox (session_id, created_at, last_seen_at, expires_at,"
            " last_seq, acked_seq, lost_seq, queued, high_water, ws_connections)"
            " VALUES (?, ?, ?, ?, ?, 0, 0, ?, ?, 0)",
            (
                (f"s_{b:07d}", past, past, future, n, n, n)
                for b in range(boxes)
                for n in [min(per_mailbox, messages - b * per_mailbox)]
            ),
        )
        db.executemany(
            "INSERT INTO mailbox_message (mailbox_id, seq, message_type, payload, source,"
            " durable, sent_at, expires_at)"
            " VALUES (?, ?, 'order.shipped', '{\"order\": 42}', 'system', 1, ?, ?)",
            rows(),
        )
    return boxes


def expire(env: dict[str, str], batch_size: int) -> tuple[float, int, str]:
    """Run the command once; return its wall time, peak RSS in MiB and its summary."""
    with tempfile.TemporaryFile("w+") as out:
        started = time.monotonic()
        proc = subprocess.Popen(
            [sys.executable, "manage.py", "expire_mailboxes", "--batch-size", str(batch_size)],
            cwd=ROOT,
            # Drop logs go to stdout, a line per mailbox and batch; keep them
            # out of the figures, as cron would send them to a log file.
            env={**os.environ, **env, "LOG_LEVEL": "ERROR"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        # wait4 reports the peak RSS of this one child, not of every child.
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    if proc.returncode != 0:
        raise SystemExit(f"expire_mailboxes failed: {output}")
    summary = next(line for line in output.splitlines() if line.startswith("expire_mailboxes"))
    return elapsed, round(usage.ru_maxrss / 1024), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=DEFAULT_MESSAGES)
    parser.add_argument("--per-mailbox", type=int, default=DEFAULT_PER_MAILBOX)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.sqlite3"
        env = migrated_sqlite(path)
        _, baseline, _ = expire(env, args.batch_size)

        started = time.monotonic()
        boxes = seed(path, args.messages, args.per_mailbox)
        print(f"seeded {args.messages} expired messages in {boxes} mailboxes", end="")
        print(f" in {time.monotonic() - started:.1f}s")

        elapsed, peak, summary = expire(env, args.batch_size)
        with sqlite3.connect(path) as db:
            (left,) = db.execute("SELECT count(*) FROM mailbox_message").fetchone()

    print(summary)
    print(
        f"expired {args.messages} messages in {elapsed:.1f}s of wall time with process start"
        f" ({args.messages / elapsed:,.0f} messages/s), batch size {args.batch_size};"
        f" peak RSS {peak} MiB (empty database: {baseline} MiB); {left} messages left"
    )


if __name__ == "__main__":
    main()

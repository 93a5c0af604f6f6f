"""Measure mailbox cycles a second: deliver, fetch, ack, one after another.

Runs in a process of its own against DATABASE_URL (a migrated database),
as a view or a task calls the mailbox API, without any server. One cycle
is three transactions: deliver() one message, fetch() it, ack() it.
Prints one JSON line. Started by `python -m bench`; by hand:

    DATABASE_URL=... .venv/bin/python -m bench.mailbox_throughput [--cycles N]
"""

import argparse
import json
import os
import time


def measure(cycles: int, sessions: int) -> dict[str, float]:
    """Run the cycles round-robin over `sessions` mailboxes; return the figures."""
    from mailbox import api, store

    boxes = [store.create_session().session_id for _ in range(sessions)]
    acked = dict.fromkeys(boxes, 0)
    spent = {"deliver": 0.0, "fetch": 0.0, "ack": 0.0}
    cpu, started = time.process_time(), time.perf_counter()
    for i in range(cycles):
        session_id = boxes[i % sessions]

        t0 = time.perf_counter()
        seq = api.deliver(session_id, "bench.cycle", {"i": i})
        t1 = time.perf_counter()
        batch = api.fetch(session_id, after=acked[session_id])
        t2 = time.perf_counter()
        if seq is None or [m.seq for m in batch.messages] != [seq]:
            raise AssertionError(f"cycle {i}: fetched {batch.messages!r}, delivered {seq}")
        api.ack(session_id, seq)
        t3 = time.perf_counter()

        acked[session_id] = seq
        spent["deliver"] += t1 - t0
        spent["fetch"] += t2 - t1
        spent["ack"] += t3 - t2
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "cycles_s": round(cycles / wall),
        "us_per_cycle": round(wall / cycles * 1e6, 1),
        **{f"{op}_us": round(s / cycles * 1e6, 1) for op, s in spent.items()},
        "cpu_us_per_cycle": round(cpu / cycles * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3000)
    parser.add_argument("--sessions", type=int, default=50)
    args = parser.parse_args()

    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    print(json.dumps(measure(args.cycles, args.sessions)))


if __name__ == "__main__":
    main()

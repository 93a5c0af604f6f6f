"""Clear stale prometheus_client multiprocess files when a server starts.

prometheus_client names each file after the process that writes it
(`counter_1234.db`). The files of a process that has exited must stay while
the deployment runs: its counters (a finished cron run, a restarted server)
are part of the totals, and removing them would make the totals go back.

So files are cleared only when the first server process of a deployment
starts: when no process named in the directory is alive but this one. Then
everything left is from a previous deployment, and counters start again
from zero, which Prometheus reads as the counter reset it is. A server
started beside running siblings clears nothing but the live-gauge files of
dead processes (prometheus_client's mark_process_dead). The check holds an
exclusive lock, so two servers starting together do not both clear.
"""

import contextlib
import fcntl
import logging
import os
import re
from pathlib import Path

from prometheus_client import multiprocess

logger = logging.getLogger(__name__)

_PID = re.compile(r"_(\d+)\.db$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clear_stale(directory: str) -> int:
    """Remove the files of a previous deployment; return how many were removed."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    me = os.getpid()
    with (root / ".clear.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        files = {
            path: int(m.group(1)) for path in root.glob("*.db") if (m := _PID.search(path.name))
        }
        dead = {pid for pid in files.values() if pid != me and not _alive(pid)}
        siblings = {pid for pid in files.values() if pid != me} - dead
        if siblings:
            for pid in dead:
                multiprocess.mark_process_dead(pid, directory)
            return 0
        removed = 0
        for path, pid in files.items():
            if pid != me:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
    if removed:
        logger.info("cleared stale metrics files", extra={"files": removed, "path": directory})
    return removed


def clear_stale_at_start() -> None:
    """Clear a previous deployment's files when PROMETHEUS_MULTIPROC_DIR is set."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        clear_stale(directory)

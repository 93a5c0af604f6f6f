"""The servers under test: start one on loopback, probe its CPU and memory, stop it."""

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"  # loopback only, by design

# The bare Channels echo consumer of the peer baseline, run from its own
# folder by this project's daphne or uvicorn: the ceiling of our stack.
# Its python-socketio server runs there too, under uvicorn, when the
# development requirements are installed.
PEERS = Path(os.environ.get("BENCH_PEERS", ROOT.parent / "shared" / "peers"))
BARE_CHANNELS = PEERS / "servers"

# Start-up bound on a loaded 2-core machine; Django needs 1 to 3 s.
START_TIMEOUT = 60.0

# Environment of every run of ours: no rate limits, and no cap on WebSockets
# per client network, since every benchmark client comes from 127.0.0.1.
OUR_ENV = {
    "TRANSPORT_RATE_LIMITS": "off",
    "TRANSPORT_WS_MAX_CONNECTIONS_PER_NETWORK": "1000000",
    "TRANSPORT_EXTRA_APPS": "bench",
}


class ServerFailed(RuntimeError):
    """A server exited, or did not listen in time."""

    def __init__(self, name: str, why: str, log: Path) -> None:
        super().__init__(f"{name}: {why} (log: {log})")


@dataclass
class Target:
    """One server to measure: ours or the bare Channels consumer, on one ASGI server."""

    kind: str  # "transport" (ours), "channels" (the bare consumer) or "socketio"
    server: str  # "daphne" or "uvicorn"
    env: dict[str, str] = field(default_factory=dict)
    label: str = ""

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.server}{self.label}"

    def command(self, port: int) -> tuple[list[str], Path]:
        """Return the command line and working directory of this server."""
        if self.kind == "transport":
            serve = ["manage.py", "serve", "--server", self.server, "--port", str(port)]
            return [sys.executable, *serve], ROOT
        app = "bare_channels.asgi:application" if self.kind == "channels" else "sio_app:app"
        if self.server == "daphne":
            daphne = [str(BIN / "daphne"), "-v", "0", "-b", HOST, "-p", str(port)]
            return [*daphne, app], BARE_CHANNELS
        uvicorn = [str(BIN / "uvicorn"), "--host", HOST, "--port", str(port)]
        options = ["--ws", "websockets", "--lifespan", "off", "--log-level", "warning"]
        return [*uvicorn, *options, "--no-access-log", app], BARE_CHANNELS


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def migrated_template(folder: Path) -> Path:
    """Migrate one SQLite file; each run gets a fresh copy of it."""
    path = folder / "template.sqlite3"
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{path}"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    return path


class Running:
    """A started server process: its port and PID, and how to stop it."""

    def __init__(self, target: Target, template: Path, folder: Path, log_level: str) -> None:
        self.target = target
        self.port = free_port()
        self.log = folder / f"{target.name}.log"
        command, cwd = target.command(self.port)
        env = {**os.environ}
        env.pop("DJANGO_SETTINGS_MODULE", None)
        if target.kind == "transport":
            db = folder / f"{target.name}.sqlite3"
            for suffix in ("-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
            shutil.copyfile(template, db)
            env.update(OUR_ENV, DATABASE_URL=f"sqlite:///{db}", LOG_LEVEL=log_level)
        env.update(target.env)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.pid = self.proc.pid
        self._wait_listening()

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerFailed(self.target.name, f"exited {self.proc.returncode}", self.log)
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise ServerFailed(self.target.name, "did not listen", self.log)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """Stop this server, by its own PID only."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


def cpu_seconds(pid: int) -> float:
    """Return the utime + stime of a process, in seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """Return a memory figure of a process from /proc (VmRSS, VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


def open_files_limit(pid: int) -> int:
    """Return the soft limit of open files of a process."""
    with open(f"/proc/{pid}/limits") as limits:
        for line in limits:
            if line.startswith("Max open files"):
                return int(line.split()[3])
    raise LookupError("Max open files")

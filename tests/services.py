"""Real Redis, PostgreSQL and worker processes for the tests, on loopback.

Each service runs from its own binary in a temporary directory and is
stopped afterwards. A missing binary fails the test under CI=true (CI
installs it, see .ci/run) and skips it elsewhere, naming the package.
"""

import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import redis

from tests.helpers import ROOT, free_port, manage

# Start-up bound for a loaded 2-core machine; each service usually needs
# well under a second.
START_TIMEOUT = 30.0

# The tests' own actions (tests/testapp/actions.py), loaded by every server
# and worker process through this setting.
TEST_APPS = {"TRANSPORT_EXTRA_APPS": "tests.testapp"}


def find_binary(name: str) -> str | None:
    """Return the path of a binary, looking in PostgreSQL's versioned dirs too."""
    found = shutil.which(name)
    if found:
        return found
    for bindir in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (bindir / name).is_file():
            return str(bindir / name)
    return None


def require_binary(name: str, package: str) -> str:
    """Return a binary's path; fail under CI=true, else skip, when it is missing."""
    path = find_binary(name)
    if path is not None:
        return path
    hint = f"{name} not found: install it with `sudo apt-get install {package}`"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(hint)
    pytest.skip(hint)


def _wait_until(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not answer within {START_TIMEOUT} s")


class RedisServer:
    """A `redis-server` on a loopback port, without persistence.

    Nothing is saved to disk, so a restart loses every key, as a crashed
    cache without persistence would: the harshest case for the channel layer.
    """

    def __init__(self, workdir: Path) -> None:
        self.binary = require_binary("redis-server", "redis-server")
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def start(self) -> "RedisServer":
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.workdir)]
        with (self.workdir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        _wait_until(self._answers, f"redis-server on {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {self.proc.returncode}")
        try:
            return bool(self.client().ping())
        except redis.RedisError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)

    def restart(self) -> None:
        """Stop and start again on the same port, with every key lost."""
        self.stop()
        self.start()

    def flush(self) -> None:
        self.client().flushall()


def _service_user() -> str | None:
    """Return the user PostgreSQL runs as when the tests run as root (it refuses root)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root, and neither user postgres nor nobody exists")


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a loopback port.

    Durability is off (fsync, synchronous_commit): a test cluster trades
    crash safety for speed, which changes no locking behaviour.
    """

    def __init__(self) -> None:
        self.initdb = require_binary("initdb", "postgresql")
        self.pg_ctl = require_binary("pg_ctl", "postgresql")
        self.user = _service_user()
        # Not under pytest's tmp_path: its parents are private to root, and
        # the server may run as another user.
        self.dir = Path(tempfile.mkdtemp(prefix="transport-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        if self.user is not None:
            account = pwd.getpwnam(self.user)
            os.chown(self.dir, account.pw_uid, account.pw_gid)
        self._run(
            self.initdb, "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "-E", "UTF8", "--no-sync", "--no-instructions",
        )  # fmt: skip

    def _run(self, *args: str) -> None:
        command = list(args)
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {result.stderr[-2000:]}")

    def url(self, database: str) -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> "PostgresCluster":
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        self._run(
            self.pg_ctl, "-D", str(self.data), "-l", str(self.dir / "server.log"),
            "-o", options, "-w", "-t", str(int(START_TIMEOUT)), "start",
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(self.pg_ctl, "-D", str(self.data), "-m", "fast", "-w", "stop")

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def connect(self, database: str = "postgres") -> psycopg.Connection[tuple[object, ...]]:
        return psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=database, autocommit=True
        )

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database (a copy of `template` if given); return its URL."""
        clause = f" TEMPLATE {template}" if template else ""
        with self.connect() as conn:
            conn.execute(f"CREATE DATABASE {name}{clause}")
        return self.url(name)

    def migrated_template(self, name: str = "transport_template") -> str:
        """Create and migrate the database every test copies; return its name."""
        url = self.create_database(name)
        result = manage("migrate", "--noinput", env={"DATABASE_URL": url})
        assert result.returncode == 0, result.stderr
        return name


class Worker:
    """A real `manage.py runworker transport-worker` process."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env = {**os.environ, **TEST_APPS, **env}
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> "Worker":
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "runworker", "transport-worker"],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

"""Helpers for tests: WebSocket conversations and real server processes."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from channels.testing import WebsocketCommunicator
from django.dispatch import Signal

ROOT = Path(__file__).resolve().parent.parent

# Screenshots and other files a person looks at after a run (gitignored).
ARTIFACTS = ROOT / "test-artifacts"

# Debian's Chromium, driven by Playwright (which downloads no browser here).
CHROMIUM = Path("/usr/bin/chromium")
# Everything a headless run on a CI box without a desktop session needs, and
# nothing that would reach past loopback (updates, sync, component fetches).
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


async def send(comm: WebsocketCommunicator, frame: dict[str, Any] | str) -> None:
    await comm.send_to(text_data=frame if isinstance(frame, str) else json.dumps(frame))


async def recv(comm: WebsocketCommunicator, timeout: float = 3) -> dict[str, Any]:
    frame: dict[str, Any] = json.loads(await comm.receive_from(timeout))
    return frame


async def hello(comm: WebsocketCommunicator, **fields: Any) -> dict[str, Any]:
    """Send hello and return the welcome."""
    await send(comm, {"type": "hello", **fields})
    welcome = await recv(comm)
    assert welcome["type"] == "welcome", welcome
    return welcome


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def manage(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a management command in a fresh process, as an operator would."""
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
    )


class Server:
    """A real `manage.py serve` (daphne) process on a loopback port."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.env = {**os.environ, "TRANSPORT_RATE_LIMITS": "off", **env}
        self.env.pop("DJANGO_SETTINGS_MODULE", None)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = Path(env.get("SERVER_LOG", f"/tmp/transport-server-{self.port}.log"))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/transport/"

    def start(self) -> "Server":
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "manage.py", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"server did not listen on {self.port}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=15)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def migrated_sqlite(path: Path) -> dict[str, str]:
    """Create and migrate a SQLite database; return the env that selects it."""
    env = {"DATABASE_URL": f"sqlite:///{path}"}
    result = manage("migrate", "--noinput", env=env)
    assert result.returncode == 0, result.stderr
    return env


@contextmanager
def recording(*watched: Signal) -> Iterator[list[list[dict[str, Any]]]]:
    """Collect the keyword arguments of every send of each watched signal, in order."""
    sent: list[list[dict[str, Any]]] = [[] for _ in watched]
    receivers = []
    for source, log in zip(watched, sent, strict=True):

        def receiver(sender: Any, _log: list[dict[str, Any]] = log, **kwargs: Any) -> None:
            kwargs.pop("signal", None)
            _log.append(kwargs)

        source.connect(receiver, weak=False)
        receivers.append((source, receiver))
    try:
        yield sent
    finally:
        for source, receiver in receivers:
            source.disconnect(receiver)


def fields(events: list[dict[str, Any]], *names: str) -> list[dict[str, Any]]:
    """Return the named arguments of recorded sends, ignoring any others a signal gained."""
    return [{name: event.get(name) for name in names} for event in events]

"""Run the benchmark: start each server on loopback, load it, report side by side.

Each run of each scenario gets a freshly started server (so memory figures
start clean) on a fresh copy of a migrated SQLite database. The bare
Channels echo consumer runs in the same pass on the same ASGI server, and
every figure of ours is also given as a ratio to it. Runs are interleaved
(for each repetition, each scenario, each server) so that a noisy moment
of the machine spreads over all of them.
"""

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import uvloop

from bench import load
from bench.procs import BARE_CHANNELS, ROOT, Running, ServerFailed, Target, migrated_template

RESULTS = Path(__file__).resolve().parent / "results"
Scenario_fn = Callable[..., Coroutine[Any, Any, load.Figures]]

# Bound of one scenario run, server start excluded. A full run of the
# largest takes 10 to 20 s on a 2-core machine.
TIME_LIMIT = 180.0

# Load per run, at most: the counts of the scenarios finish well within it
# on the bare consumer; a slower server is measured over this window.
WINDOW = 20.0
QUICK_WINDOW = 5.0

# Idle connections, plus the client's own sockets: above the usual 1,024.
OPEN_FILES = 16384


@dataclass(frozen=True)
class Scenario:
    name: str
    group: int  # the numbered scenario of the README it belongs to
    run: Scenario_fn
    full: tuple[int, ...]
    quick: tuple[int, ...]
    figures: tuple[str, ...]
    # The peers that run it too: the bare consumer, python-socketio.
    peers: frozenset[str] = frozenset({"channels", "socketio"})
    # The peers' scenario our figure is compared with.
    reference: str | None = None


ECHO = ("rt_s", "p50_ms", "p95_ms", "p99_ms", "srv_us_per_rt", "errors")
HTTP = ("rt_s", "p50_ms", "p99_ms", "srv_us_per_rt")
SCENARIOS = [
    Scenario("echo-50x1", 1, load.echo, (50, 200, 1), (10, 20, 1), ECHO),
    Scenario("echo-500x1", 1, load.echo, (500, 20, 1), (20, 5, 1), ECHO),
    Scenario("echo-50x8", 1, load.echo, (50, 400, 8), (10, 32, 8), ECHO),
    Scenario(
        "deliver-500",
        2,
        load.delivery,
        (500, 1000, 5),
        (20, 200, 1),
        ("sent", "received", "enqueued_s", "p50_ms", "p95_ms", "p99_ms", "srv_us_per_msg"),
        peers=frozenset(),
    ),
    Scenario(
        "lp-wake-500",
        3,
        load.lp_wake,
        (500,),
        (20,),
        ("woken", "p50_ms", "p99_ms", "fanout_s"),
        peers=frozenset({"channels"}),
    ),
    # 5,000 round trips: at 1,000 (about a second of REST load on uvicorn)
    # these two swung by a third from run to run.
    Scenario("lp-loop-20", 3, load.lp_loop, (20, 250), (4, 5), HTTP),
    Scenario(
        "rest-echo-20",
        3,
        load.rest_echo,
        (20, 250),
        (4, 10),
        HTTP,
        peers=frozenset(),
        reference="lp-loop-20",
    ),
    Scenario("idle-2000", 4, load.idle, (2000,), (50,), ("kib_per_conn", "rss_mib", "hwm_mib")),
]
BY_NAME = {s.name: s for s in SCENARIOS}
MAILBOX = ("cycles_s", "us_per_cycle", "deliver_us", "fetch_us", "ack_us", "cpu_us_per_cycle")
TELEMETRY_SCENARIO = "echo-50x1"
PACKAGES = ["django", "channels", "daphne", "uvicorn", "uvloop", "websockets", "aiohttp"]


def selected(spec: str) -> tuple[list[Scenario], set[int]]:
    """Read --scenarios: group numbers (1-6) and scenario names, comma-separated."""
    groups: set[int] = set()
    names: set[str] = set()
    for item in filter(None, (part.strip() for part in spec.split(","))):
        if item.isdigit() and 1 <= int(item) <= 6:
            groups.add(int(item))
        elif item in BY_NAME:
            names.add(item)
        else:
            raise SystemExit(f"unknown scenario {item!r}: use 1-6 or one of {', '.join(BY_NAME)}")
    scenarios = [s for s in SCENARIOS if s.group in groups or s.name in names]
    if 6 in groups and TELEMETRY_SCENARIO not in {s.name for s in scenarios}:
        scenarios.insert(0, BY_NAME[TELEMETRY_SCENARIO])
    return scenarios, groups


def targets_for(scenario: Scenario, server: str, telemetry: bool, peers: set[str]) -> list[Target]:
    """Return the servers one scenario runs against, on one ASGI server."""
    targets = [Target("transport", server)]
    if "channels" in peers and "channels" in scenario.peers:
        targets.append(Target("channels", server))
    # The peer baseline runs python-socketio under uvicorn only.
    if "socketio" in peers and "socketio" in scenario.peers and server == "uvicorn":
        targets.append(Target("socketio", server))
    if telemetry and scenario.name == TELEMETRY_SCENARIO:
        off = {"TRANSPORT_TELEMETRY": "off"}
        targets.append(Target("transport", server, off, "-telemetry-off"))
    return targets


def run_one(
    scenario: Scenario,
    target: Target,
    sizes: tuple[int, ...],
    window: float,
    folder: Path,
    log_level: str,
) -> load.Figures | dict[str, str]:
    """Start the target, run one scenario against it under a time bound, stop it."""
    try:
        server = Running(target, folder / "template.sqlite3", folder, log_level)
    except ServerFailed as exc:
        return {"error": str(exc)}
    try:
        time.sleep(0.5)  # let the server finish starting up before the clock starts

        async def bounded() -> load.Figures:
            async with asyncio.timeout(TIME_LIMIT):
                return await scenario.run(server, *sizes, window=window)

        try:
            figures = uvloop.run(bounded())
        except Exception as exc:  # a failed run is recorded, never a hang or a crash
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        if not server.alive():
            return {"error": f"server exited (log: {server.log})"}
        return figures
    finally:
        server.stop()


def mailbox_runs(reps: int, quick: bool, folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Scenario 5 on SQLite, and on a throwaway PostgreSQL cluster if one can start."""
    cycles = "200" if quick else "3000"
    runs: dict[str, list[dict[str, Any]]] = {"mailbox-sqlite": [], "mailbox-postgres": []}
    for rep in range(reps):
        db = folder / f"mailbox-{rep}.sqlite3"
        shutil.copyfile(folder / "template.sqlite3", db)
        runs["mailbox-sqlite"].append(_mailbox_once(f"sqlite:///{db}", cycles))

    from tests.services import PostgresCluster, find_binary

    if find_binary("initdb") is None or find_binary("pg_ctl") is None:
        runs["mailbox-postgres"].append({"error": "initdb/pg_ctl not found (apt-get postgresql)"})
        return runs
    cluster = PostgresCluster().start()
    try:
        template = cluster.migrated_template()
        for rep in range(reps):
            url = cluster.create_database(f"bench_{rep}", template)
            runs["mailbox-postgres"].append(_mailbox_once(url, cycles))
    finally:
        cluster.destroy()
    return runs


def _mailbox_once(database_url: str, cycles: str) -> dict[str, Any]:
    env = {**os.environ, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
    env.pop("DJANGO_SETTINGS_MODULE", None)
    done = subprocess.run(
        [sys.executable, "-m", "bench.mailbox_throughput", "--cycles", cycles],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIME_LIMIT,
    )
    try:
        figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {"error": f"rc={done.returncode}: {done.stderr.strip()[-300:]}"}
    return figures


def median(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Return the median of each figure over the runs that did not fail."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {}
    keys = [k for k in ok[0] if all(isinstance(r.get(k), int | float) for r in ok)]
    return {k: round(statistics.median(r[k] for r in ok), 3) for k in keys}


# Counts and settings, not performance: no ratio.
NOT_RATIOS = {"errors", "trips", "sent", "received", "woken", "server_fd_limit"}


def ratios(ours: dict[str, float], reference: dict[str, float]) -> dict[str, float]:
    """Return ours / reference for each figure both have (throughput: higher is better)."""
    return {
        k: round(v / reference[k], 3)
        for k, v in ours.items()
        if reference.get(k) and k not in NOT_RATIOS
    }


PEER_COLUMNS = {"channels": "vs_bare_channels", "socketio": "vs_socketio"}


def summarise(results: dict[str, Any], servers: list[str]) -> dict[str, Any]:
    """Compute the ratios to each peer and the cost of telemetry."""
    summary: dict[str, Any] = {}
    for server in servers:
        ours = results.get(f"transport-{server}", {})
        off = results.get(f"transport-{server}-telemetry-off", {})
        per: dict[str, Any] = {}
        for kind, key in PEER_COLUMNS.items():
            peer = results.get(f"{kind}-{server}", {})
            per[key] = {
                name: ratios(entry["median"], peer[_reference(name)]["median"])
                for name, entry in ours.items()
                if _reference(name) in peer
            }
        on = ours.get(TELEMETRY_SCENARIO, {}).get("median", {})
        without = off.get(TELEMETRY_SCENARIO, {}).get("median", {})
        if on.get("rt_s") and without.get("rt_s"):
            per["telemetry_cost"] = {
                "throughput_pct": round((1 - on["rt_s"] / without["rt_s"]) * 100, 1),
                "cpu_pct": round((on["srv_us_per_rt"] / without["srv_us_per_rt"] - 1) * 100, 1),
            }
        summary[server] = per
    return summary


def _reference(name: str) -> str:
    scenario = BY_NAME.get(name)
    return (scenario.reference or name) if scenario else name


def table(results: dict[str, Any], summary: dict[str, Any], servers: list[str]) -> str:
    """Render one markdown table per ASGI server: ours, each peer and ours as a ratio to it."""
    out = []
    for server in servers:
        ours = results.get(f"transport-{server}", {})
        peers = [k for k in PEER_COLUMNS if f"{k}-{server}" in results]
        off = results.get(f"transport-{server}-telemetry-off", {})
        names = {"channels": "bare Channels", "socketio": "python-socketio"}
        head = "".join(f" {names[k]} | ratio |" for k in peers)
        out += [
            f"\n### {server}\n",
            f"| scenario | figure | ours |{head} telemetry off |",
            "|---|---|---|" + "---|---|" * len(peers) + "---|",
        ]
        for scenario in SCENARIOS:
            if scenario.name not in ours:
                continue
            med = ours[scenario.name]["median"]
            without = off.get(scenario.name, {}).get("median", {})
            failed = _failures(ours[scenario.name])
            for figure in scenario.figures:
                cells = [_cell(med.get(figure))]
                for kind in peers:
                    peer = results[f"{kind}-{server}"].get(scenario.reference or scenario.name)
                    ratio = summary[server][PEER_COLUMNS[kind]].get(scenario.name, {})
                    value = peer["median"].get(figure) if peer else None
                    cells += [_cell(value), _cell(ratio.get(figure))]
                cells.append(_cell(without.get(figure)))
                out.append(f"| {scenario.name}{failed} | {figure} | " + " | ".join(cells) + " |")
        for name in ("mailbox-sqlite", "mailbox-postgres"):
            entry = results.get("mailbox", {}).get(name)
            if entry:
                blank = " — |" * (2 * len(peers) + 1)
                for figure in MAILBOX:
                    value = _cell(entry["median"].get(figure))
                    out.append(f"| {name}{_failures(entry)} | {figure} | {value} |{blank}")
        cost = summary.get(server, {}).get("telemetry_cost")
        if cost:
            out.append(
                f"\nTelemetry costs {cost['throughput_pct']} % of {TELEMETRY_SCENARIO} throughput"
                f" and {cost['cpu_pct']} % more server CPU per round trip."
            )
    return "\n".join(out) + "\n"


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:g}"


def _failures(entry: dict[str, Any]) -> str:
    failed = sum("error" in r for r in entry["runs"])
    return f" ({failed}/{len(entry['runs'])} failed)" if failed else ""


def available_peers() -> set[str]:
    """Return the peers this machine can run: the bare consumer, python-socketio."""
    peers = set()
    if (BARE_CHANNELS / "bare_channels").is_dir():
        peers.add("channels")
    else:
        print(f"no bare Channels consumer in {BARE_CHANNELS} (set BENCH_PEERS): ours only")
    if (BARE_CHANNELS / "sio_app.py").is_file() and importlib.util.find_spec("socketio"):
        peers.add("socketio")
    return peers


def raise_open_files() -> int:
    """Raise this process's open-files limit; the servers it starts inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = OPEN_FILES if hard == resource.RLIM_INFINITY else min(OPEN_FILES, hard)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return max(soft, wanted)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", default="1,2,3,4,5,6", help="1-6 and/or scenario names")
    parser.add_argument("--servers", default="daphne,uvicorn")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--no-bare", action="store_true", help="measure ours alone, no peers")
    parser.add_argument(
        "--window", type=float, help=f"seconds of load per run at most (default {WINDOW:g})"
    )
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of our servers")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/<time>.json)")
    parser.add_argument("--table", type=Path, help="print the table of an earlier JSON file")
    args = parser.parse_args(argv)
    if args.table:
        earlier = json.loads(args.table.read_text())
        servers = list(earlier["summary"])
        print(table(earlier["results"], summarise(earlier["results"], servers), servers))
        return

    scenarios, groups = selected(args.scenarios)
    servers = [s for s in args.servers.split(",") if s]
    if unknown := set(servers) - {"daphne", "uvicorn"}:
        raise SystemExit(f"unknown servers {sorted(unknown)}: use daphne and/or uvicorn")
    peers = set() if args.no_bare else available_peers()
    window = args.window or (QUICK_WINDOW if args.quick else WINDOW)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "python": platform.python_version(),
        "load_before": os.getloadavg(),
        "open_files": raise_open_files(),
        "quick": args.quick,
        "reps": args.reps,
        "log_level": args.log_level,
        "window_s": window,
        "versions": {p: version(p) for p in PACKAGES},
    }

    out = args.out or RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="transport-bench-") as tmp:
        folder = Path(tmp)
        migrated_template(folder)
        for rep in range(args.reps):
            for scenario in scenarios:
                sizes = scenario.quick if args.quick else scenario.full
                for server in servers:
                    for target in targets_for(scenario, server, 6 in groups, peers):
                        started = time.monotonic()
                        figures = run_one(scenario, target, sizes, window, folder, args.log_level)
                        entry = results.setdefault(target.name, {}).setdefault(
                            scenario.name, {"runs": []}
                        )
                        entry["runs"].append(figures)
                        took = time.monotonic() - started
                        print(
                            f"[{rep + 1}/{args.reps}] {target.name:32} {scenario.name:13}"
                            f" {took:5.1f}s {json.dumps(figures)}",
                            flush=True,
                        )
            write(out, meta, results, servers)  # a run cut short keeps what it measured
        if 5 in groups:
            for name, runs in mailbox_runs(args.reps, args.quick, folder).items():
                results.setdefault("mailbox", {})[name] = {"runs": runs}
                print(f"{name:46} {json.dumps(runs)}", flush=True)
        _keep_logs(folder, out.parent / "logs")

    summary = write(out, meta, results, servers)
    print(table(results, summary, servers))
    print(f"load average before {meta['load_before']}, after {meta['load_after']}; wrote {out}")


def write(out: Path, meta: dict[str, Any], results: dict[str, Any], servers: list[str]) -> Any:
    """Take the medians of the runs so far, write them all as JSON; return the summary."""
    for by_scenario in results.values():
        for entry in by_scenario.values():
            entry["median"] = median(entry["runs"])
    meta["load_after"] = os.getloadavg()
    summary = summarise(results, servers)
    out.write_text(json.dumps({"meta": meta, "results": results, "summary": summary}, indent=1))
    return summary


def _keep_logs(folder: Path, logs: Path) -> None:
    """Copy the servers' logs beside the results, for a failed run's post-mortem."""
    logs.mkdir(exist_ok=True)
    for log in folder.glob("*.log"):
        shutil.copyfile(log, logs / log.name)

"""The benchmark runs end to end: a quick pass of scenario 1 against daphne.

It checks that every figure is produced, never how fast: speed is what the
benchmark reports, not what a test on a shared machine can assert.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.process

ECHO_FIGURES = {"rt_s", "p50_ms", "p95_ms", "p99_ms", "srv_us_per_rt", "errors", "hwm_mib"}


def test_a_quick_run_of_scenario_one_writes_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["--quick", "--reps", "1", "--scenarios", "1", "--servers", "daphne", "--no-bare"]
    done = subprocess.run(
        [sys.executable, "-m", "bench", *args, "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads(out.read_text())["results"]
    assert set(results) == {"transport-daphne"}
    ours = results["transport-daphne"]
    assert set(ours) == {"echo-50x1", "echo-500x1", "echo-50x8"}
    for name, entry in ours.items():
        [run] = entry["runs"]
        assert set(run) >= ECHO_FIGURES, (name, run)
        assert run["errors"] == 0, (name, run)
        assert run["rt_s"] > 0 and run["srv_us_per_rt"] > 0, (name, run)
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"], (name, run)
        assert entry["median"]["rt_s"] == run["rt_s"]
    assert "| echo-50x8 | rt_s |" in done.stdout
    assert (tmp_path / "logs" / "transport-daphne.log").exists()

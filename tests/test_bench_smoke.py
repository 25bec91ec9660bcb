"""The benchmark harness (bench/) runs end to end in a tiny mode and reports figures.

This proves the harness works: it sets up PostgreSQL, Redis, the development IdM and tokenvend,
drives them, prints its tables and writes its JSON. It asserts nothing about timing: the targets
of issue 6 are the benchmark's business (`make bench`), not the test suite's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.services import require_postgres, require_redis

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = 10
PER_CREDENTIAL = 5


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_cold_path_run_prints_and_records_its_figures(tmp_path: Path) -> None:
    require_postgres()
    require_redis()
    output = tmp_path / "latest.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--quick",
            "--only",
            "cold",
            "--cold-credentials",
            str(CREDENTIALS),
            "--cold-per-credential",
            str(PER_CREDENTIAL),
            "--output",
            str(output),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Cold path" in done.stdout
    assert "exchanges at the IdM:" in done.stdout
    assert "Targets (issue 6)" in done.stdout

    results = json.loads(output.read_text())
    assert results["meta"]["parts"] == ["cold"]
    cold = results["cold"]
    assert cold["credentials"] == CREDENTIALS
    assert cold["requests"] == CREDENTIALS * PER_CREDENTIAL
    assert sum(cold["statuses"].values()) == CREDENTIALS * PER_CREDENTIAL
    assert isinstance(cold["exchanges"], int)
    assert cold["all_answered_s"] > 0
    assert {v["result"] for v in results["verdicts"]} <= {"PASS", "FAIL", "n/a"}
    assert len(results["verdicts"]) == 2

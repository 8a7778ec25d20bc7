"""Smoke test of benchmarks/run.py: it runs end to end and reports what it promises.

No timing is asserted: only the JSON layout and the accuracy of the alignment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).resolve().parents[1] / "benchmarks" / "run.py"

pytestmark = pytest.mark.skipif(not RUN.exists(), reason="benchmarks/ is not in this checkout")


def test_benchmark_smoke(tmp_path):
    env = dict(os.environ)
    # same isolation as conftest's autouse fixture, for the subprocesses
    env["ASTROMETRIC_CATALOG_URL"] = "http://127.0.0.1:9"
    env["ROMAN_TWEAKREG_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, str(RUN), "--exposures", "1", "--detectors", "2", "--repeat", "1",
         "--workdir", str(tmp_path / "work")],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert {"machine", "arguments", "results"} <= set(report)
    (result,) = report["results"]
    assert result["images"] == 2
    assert result["sources"] > 0
    assert "romancal" not in result
    ours = result["ours"]
    for key in ("call_s", "process_s", "import_s", "peak_rss_mb", "peak_rss_before_call_mb",
                "max_error_mas", "median_error_mas", "phases_s", "status_counts"):
        assert key in ours, key
    assert ours["call_s"] > 0
    assert ours["peak_rss_mb"] >= ours["peak_rss_before_call_mb"] > 0
    # the step's own phase timings, saving included (as strun users run it)
    assert list(ours["stages_s"]) == ["catalogs", "relative", "absolute", "update", "save", "other"]
    assert ours["stages_s"]["relative"] == 0.0  # one exposure: no relative phase
    assert ours["stages_s"]["save"] > 0
    assert ours["align_s"] == pytest.approx(sum(
        ours["stages_s"][p] for p in ("catalogs", "relative", "absolute", "update")))
    assert result["save"] is True
    assert ours["images_without_wcs"] == []
    assert ours["status_counts"] == {"COMPLETE": 2}
    assert ours["max_error_mas"] < 1.0

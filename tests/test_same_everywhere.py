"""The same call gives the same files, statuses, fits and log lines in a plain process,
in a process with an idle thread, and inside a Dask worker (a real LocalCluster), and
with its per-image jobs on that cluster (its executor given to the step, from here and
from inside a task)."""

from __future__ import annotations

import json
import logging
import os
import re
import threading

import distributed
import pytest
from roman_datamodels import datamodels as rdm

from conftest import make_data, refcat_at
from roman_tweakreg import per_image_executor
from roman_tweakreg.testing import simulate

DETECTORS = ("WFI01", "WFI02", "WFI10")
#: log lines that carry a time or a process: not the same from run to run
_CLOCK = re.compile(r"elapsed|done in|obtained in|\d+\.\d\d s\b|worker process")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("everywhere")
    exposures, stars = make_data(1, detectors=DETECTORS, max_sources=200)
    asn = simulate.write_dataset(exposures, stars[:3000], folder)
    refcat_at(stars, exposures[0].epoch).write(folder / "ref.ecsv")
    return str(asn), str(folder / "ref.ecsv")


def run_step(asn: str, ref: str, out: str) -> dict:
    """Run the step (saving, with a report) and return what a user sees of it."""
    from roman_tweakreg import TweakRegStep

    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            if record.levelno >= logging.INFO:
                lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")

    keep = Keep(logging.DEBUG)
    logger = logging.getLogger("roman_tweakreg")
    level = logger.level
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    try:
        step = TweakRegStep(abs_refcat=ref, output_dir=out, save_results=True,
                            report="r.json", processes=2)  # fmt: skip
        library = step.run(asn)
    finally:
        logger.removeHandler(keep)
        logger.setLevel(level)
    outcome = []
    with library:
        for i in range(len(library)):
            model = library.borrow(i)
            fit = dict(model.meta.wcs_fit_results)
            outcome.append((str(model.meta.cal_step.tweakreg), fit["status"] if "status" in fit
                            else None, fit.get("nmatches"), [float(v) for v in fit["shift"]]))
            library.shelve(model, i, modify=False)
    report = json.loads((Path(out) / "r.json").read_text())
    return {
        "outcome": outcome,
        "files": sorted(os.listdir(out)),
        "report": {"outputs": report["outputs"], "images": report["images"]},
        "log": [line.replace(out, "<out>") for line in lines if not _CLOCK.search(line)],
    }


from pathlib import Path  # noqa: E402  (used by run_step in Dask workers too)


def run_step_on_the_cluster(asn: str, ref: str, out: str) -> dict:
    """:func:`run_step` in a Dask task, its per-image jobs tasks of the cluster."""
    from roman_tweakreg import per_image_executor

    with distributed.worker_client() as client, per_image_executor(
        client.get_executor(pure=False), workers=2
    ) as use:
        result = run_step(asn, ref, out)
    return {**result, "jobs": dict(use.jobs)}


def _idle_thread():
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, daemon=True)
    thread.start()
    return stop, thread


def _parts(path: Path) -> tuple[list[bytes], bytes]:
    """A file's YAML lines but those with the date of the write, and its binary blocks."""
    data = path.read_bytes()
    yaml, blocks = data.split(b"\n...\n", 1)
    return [x for x in yaml.split(b"\n") if b"date:" not in x], blocks


def _without_history(lines: list[bytes]) -> list[bytes]:
    """The YAML lines from the ``roman`` tree on (the history before it lists extensions)."""
    start = next(k for k, line in enumerate(lines) if line.startswith(b"roman:"))
    return lines[start:]


@pytest.fixture(scope="module")
def runs(dataset, tmp_path_factory):
    asn, ref = dataset
    base = tmp_path_factory.mktemp("runs")
    out = {"plain": run_step(asn, ref, str(base / "plain"))}
    stop, thread = _idle_thread()
    try:
        assert threading.active_count() > 1
        out["idle thread"] = run_step(asn, ref, str(base / "idle thread"))
    finally:
        stop.set()
        thread.join()
    env = {"ASTROMETRIC_CATALOG_URL": "http://127.0.0.1:9",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=":0", env=env) as cluster, \
            distributed.Client(cluster) as client:  # fmt: skip
        future = client.submit(run_step, asn, ref, str(base / "dask"), pure=False)
        out["dask"] = future.result(timeout=300)
        with per_image_executor(client.get_executor(pure=False), workers=2) as use:
            out["dask executor"] = {**run_step(asn, ref, str(base / "dask executor")),
                                    "jobs": dict(use.jobs)}  # fmt: skip
        future = client.submit(run_step_on_the_cluster, asn, ref, str(base / "dask task"),
                               pure=False)  # fmt: skip
        out["dask task"] = future.result(timeout=300)
    return base, out


@pytest.mark.parametrize("where", ["idle thread", "dask", "dask executor", "dask task"])
def test_same_files_results_and_logs_everywhere(runs, where):
    base, out = runs
    plain, other = out["plain"], out[where]
    assert len(plain["outcome"]) == 3
    assert [o[0] for o in plain["outcome"]] == ["COMPLETE"] * 3
    assert other["outcome"] == plain["outcome"]  # statuses, match counts, shifts exactly
    assert other["files"] == plain["files"]
    assert len([f for f in plain["files"] if f.endswith(".asdf")]) == 6
    assert other["report"] == {**plain["report"], "images": other["report"]["images"]}
    assert [i["output"].replace(str(base / where), "") for i in other["report"]["images"]] == [
        i["output"].replace(str(base / "plain"), "") for i in plain["report"]["images"]
    ]
    # the same lines; a job's lines are logged when it ends here, or when its result is
    # taken from a worker, so only the order of the per-image saving lines may differ
    assert sorted(other["log"]) == sorted(plain["log"])
    saved = "INFO roman_tweakreg.outputs: Saved model in"
    assert [x for x in other["log"] if not x.startswith(saved)] == [
        x for x in plain["log"] if not x.startswith(saved)
    ]
    assert sum(x.startswith(saved) for x in plain["log"]) == 6
    assert any(line.startswith("INFO roman_tweakreg.step: Absolute fit") for line in plain["log"])
    if "jobs" in other:  # 3 catalogs, 3 corrected WCSs, 3 saves; some on Dask workers
        assert sum(other["jobs"].values()) == 9, other["jobs"]
        assert any(k.startswith("tcp://127.0.0.1:") for k in other["jobs"]), other["jobs"]
    for name in plain["files"]:
        if name.endswith(".asdf"):
            a, b = base / "plain" / name, base / where / name
            (yaml_a, blocks_a), (yaml_b, blocks_b) = _parts(a), _parts(b)
            assert blocks_a == blocks_b, name  # every array's bytes
            # the same YAML lines; only the order in which asdf lists the extensions
            # used in the history depends on what the writing process wrote before
            assert sorted(yaml_a) == sorted(yaml_b), name
            assert _without_history(yaml_a) == _without_history(yaml_b), name
            if name.endswith("_tweakregstep.asdf"):
                with rdm.open(a) as ma, rdm.open(b) as mb:
                    assert simulate.wcs_difference_mas(ma.meta.wcs, mb.meta.wcs) == 0.0

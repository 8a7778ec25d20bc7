"""Benchmark the batch's source detection: one task per image vs the association's task.

Usage::

    git archive <commit before> src | tar -x -C /tmp/before     # the version to compare to
    python benchmarks/batch_detection.py --workdir /tmp/bench_det --before-src /tmp/before/src

What it does:

1. Writes once, under ``<workdir>/data/``, one association of ``--images`` images of
   ``--size`` x ``--size`` pixels without catalogs (``--images / 2`` exposures of
   WFI01 and WFI02, stars of a dense field rendered with noise:
   :func:`roman_tweakreg.testing.pixels.write_pixel_association`, seed 7).
2. For each configuration (``before``, when ``--before-src`` names the ``src`` folder of
   an earlier version, then ``after``, this checkout), a fresh subprocess with that
   version first on ``PYTHONPATH`` starts a ``LocalCluster`` of ``--workers`` processes
   (``roman_tweakreg.batch.local_cluster``) and runs ``align_associations`` on the
   association.  ``wall_s`` is ``align_associations`` alone (the cluster started and the
   package imported on the workers before); ``cpu_s`` the CPU time of every worker
   process over it (all threads), which depends little on what else runs.
3. The WCSs of the two configurations' outputs are compared (they must be equal).

``uptime``'s load is recorded with each run: the wall times are only comparable on a
quiet machine.  JSON goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"


def _cpu_s() -> float:
    return time.process_time()


def child(spec_path: Path) -> int:
    """Run the batch once (in a fresh process); write its figures as JSON."""
    import logging

    from distributed import Client

    from roman_tweakreg.batch import align_associations, local_cluster

    logging.basicConfig(level=logging.WARNING)
    spec = json.loads(spec_path.read_text())
    result: dict = {"loadavg_before": os.getloadavg()}
    env = {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    with local_cluster(spec["workers"], env=env) as cluster, Client(cluster) as client:
        client.run(lambda: __import__("roman_tweakreg.batch") and None)
        cpu0 = client.run(_cpu_s)
        t0 = time.perf_counter()
        table = align_associations(
            [spec["asn"]], spec["out"], client=client, progress=False, abs_refcat=spec["refcat"]
        )
        result["wall_s"] = time.perf_counter() - t0
        cpu1 = client.run(_cpu_s)
    result["cpu_s"] = sum(cpu1[w] - cpu0[w] for w in cpu1)
    result["status"] = str(table["status"][0])
    result["seconds"] = float(table["seconds"][0])
    if "detect_seconds" in table.colnames:
        result["detect_seconds"] = float(table["detect_seconds"][0])
    result["loadavg_after"] = os.getloadavg()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run(label: str, src: Path, asn: Path, work: Path, workers: int) -> dict:
    out = work / f"out_{label}"
    spec = {
        "asn": str(asn),
        "refcat": str(asn.parent / "gaia.ecsv"),
        "out": str(out),
        "workers": workers,
        "result": str(work / f"{label}.json"),
    }
    spec_path = work / f"{label}_spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(src), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)]
    subprocess.run(cmd, env=env, check=True)
    result = json.loads(Path(spec["result"]).read_text())
    result["config"] = label
    result["outputs"] = str(out / asn.stem)
    return result


def _wcs_difference_mas(a: Path, b: Path) -> float:
    from roman_datamodels import datamodels as rdm

    from roman_tweakreg.testing import simulate

    worst = 0.0
    for fa in sorted(a.glob("*_tweakregstep.asdf")):
        with rdm.open(fa) as ma, rdm.open(b / fa.name) as mb:
            worst = max(worst, simulate.wcs_difference_mas(ma.meta.wcs, mb.meta.wcs))
    return worst


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench_batch_detection"))
    parser.add_argument("--images", type=int, default=4, help="images (an even number)")
    parser.add_argument("--size", type=int, default=1024, help="pixels on a side")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--before-src", type=Path, help="src folder of the version before")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child)
    sys.path.insert(0, str(SRC))
    from roman_tweakreg.testing.pixels import write_pixel_association

    work = args.workdir.resolve()
    data = work / "data" / f"px{args.images}x{args.size}"
    asn = data / f"{data.name}.json"
    if not asn.exists():
        write_pixel_association(
            data,
            shape=(args.size, args.size),
            n_exposures=args.images // 2,
            keep_catalog=0,
        )
    results = []
    if args.before_src:
        results.append(run("before", args.before_src.resolve(), asn, work, args.workers))
    results.append(run("after", SRC, asn, work, args.workers))
    report = {"images": args.images, "size": args.size, "workers": args.workers}
    report["cpus"] = os.cpu_count()
    report["results"] = results
    if len(results) == 2:
        report["wcs_difference_mas"] = _wcs_difference_mas(
            Path(results[0]["outputs"]), Path(results[1]["outputs"])
        )
        report["wall_ratio_before_over_after"] = results[0]["wall_s"] / results[1]["wall_s"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark the batch: a serial loop of TweakRegStep.call vs ``align_associations``.

Usage::

    python benchmarks/batch.py --associations 200 --workers 1,2 --workdir /tmp/bench_batch
    python benchmarks/batch.py --associations 6 --sources 200      # a quick check

What it does:

1. Simulates one dithered set of exposures (``--exposures`` x ``--detectors``, seed 7,
   at most ``--sources`` sources per detector catalog) with ``roman_tweakreg.testing.simulate``
   and writes it once under ``<workdir>/data/`` with a reference catalog at the
   observation epoch (``ref_at_epoch.ecsv``).  ``--associations`` association files
   (``asn0000.json``...) under ``<workdir>/asns/`` list those members, so every task
   reads, aligns and writes the same amount of data.
2. ``serial``: one fresh subprocess runs ``TweakRegStep.call`` on each association in
   turn (``processes=1``, outputs saved), as a shell loop of ``strun`` calls would, but
   without paying the interpreter start-up each time.
3. ``batch-N`` for each N of ``--workers``: one fresh subprocess starts a
   ``LocalCluster`` of N worker processes (one thread each) and runs
   ``roman_tweakreg.batch.align_associations`` over all associations.  The wall time
   includes starting the cluster; ``tasks_s`` is from the first task submitted to the
   last finished (``align_associations`` alone).  Each worker's peak RSS is read before
   the cluster closes.  The workers run with ``roman_tweakreg.batch.WORKER_CONFIG`` (Dask's
   statistical profiler off), as ``align_associations``'s own cluster does;
   ``--dask-profiler`` keeps it on.

CPU time per association (``cpu_s_per_association``) is that of the serial process, or of
every thread of every worker process, over the tasks: unlike wall time it barely depends
on what else runs on the machine, so it is what compares the configurations on a shared
machine.

Throughput is images per second over the wall time.  ``uptime``'s load is recorded:
the figures are only comparable on a quiet machine.  JSON goes to stdout (and
``--json-out``), a table to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import peak_rss_mb

HERE = Path(__file__).resolve().parent
SEED = 7


def prepare(work: Path, n_asn: int, n_exp: int, n_det: int, sources: int) -> tuple[list, Path]:
    """Write the dataset once and ``n_asn`` association files listing its members."""
    from astropy.table import Table

    from roman_tweakreg.testing import simulate

    data = work / "data"
    spec = {"exposures": n_exp, "detectors": n_det, "sources": sources, "seed": SEED}
    marker = data / "dataset.json"
    if not (marker.exists() and json.loads(marker.read_text()) == spec):
        shutil.rmtree(data, ignore_errors=True)
        exposures, stars = simulate.make_dataset(
            n_exp, detectors=simulate.DETECTORS[:n_det], seed=SEED, max_sources=sources
        )
        asn = simulate.write_dataset(exposures, stars, data)
        epoch = exposures[0].epoch
        ra, dec = simulate.propagate(stars, epoch, simulate.l2_observer(epoch))
        Table({"RA": ra, "DEC": dec}).write(data / "ref_at_epoch.ecsv", overwrite=True)
        asn.rename(data / "members.json")
        marker.write_text(json.dumps(spec))
    members = json.loads((data / "members.json").read_text())["products"][0]["members"]
    asns = work / "asns"
    shutil.rmtree(asns, ignore_errors=True)
    asns.mkdir(parents=True)
    paths = []
    for k in range(n_asn):
        asn = {
            "asn_type": "image",
            "asn_pool": "benchmark",
            "products": [
                {
                    "name": f"asn{k:04d}",
                    "members": [
                        {"expname": f"../data/{m['expname']}", "exptype": "science"}
                        for m in members
                    ],
                }
            ],
        }
        path = asns / f"asn{k:04d}.json"
        path.write_text(json.dumps(asn))
        paths.append(str(path))
    return paths, data / "ref_at_epoch.ecsv"


def _cpu_s() -> float:
    """CPU seconds (user + system, all threads) of this process so far."""
    return time.process_time()


def child(spec_path: Path) -> int:
    """Run one configuration (in a fresh process); write its figures as JSON."""
    spec = json.loads(spec_path.read_text())
    import logging

    logging.basicConfig(level=logging.WARNING)
    t0 = time.perf_counter()
    out = Path(spec["out"])
    result: dict = {"loadavg_before": os.getloadavg()}
    if spec["mode"] == "serial":
        from roman_tweakreg import TweakRegStep

        t1, c1 = time.perf_counter(), time.process_time()
        for path in spec["asns"]:
            TweakRegStep.call(
                path,
                output_dir=str(out / Path(path).stem),
                save_results=True,
                processes=1,
                abs_refcat=spec["refcat"],
            )
        result["tasks_s"] = time.perf_counter() - t1
        result["tasks_cpu_s"] = time.process_time() - c1
        result["worker_peak_rss_mb"] = [peak_rss_mb()]
    else:
        import dask
        from distributed import Client, LocalCluster

        from roman_tweakreg.batch import WORKER_CONFIG, align_associations

        config = {} if spec["dask_profiler"] else WORKER_CONFIG  # as align_associations does
        with (
            dask.config.set(config),
            LocalCluster(
                n_workers=spec["workers"],
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",
            ) as cluster,
            Client(cluster) as client,
        ):
            client.run(lambda: __import__("roman_tweakreg.step") and None)
            cpu0 = client.run(_cpu_s)
            t1, c1 = time.perf_counter(), time.process_time()
            table = align_associations(
                spec["asns"], out, client=client, progress=False, abs_refcat=spec["refcat"]
            )
            result["tasks_s"] = time.perf_counter() - t1
            result["client_tasks_cpu_s"] = time.process_time() - c1
            cpu1 = client.run(_cpu_s)
            # every thread of each worker process: the task's, the event loop's, monitors'
            result["tasks_cpu_s"] = sum(cpu1[w] - cpu0[w] for w in cpu1)
            result["worker_peak_rss_mb"] = sorted(client.run(peak_rss_mb).values())
        result["statuses"] = sorted(set(table["status"]))
    result["wall_s"] = time.perf_counter() - t0
    result["cpu_s_per_association"] = result["tasks_cpu_s"] / len(spec["asns"])
    result["loadavg_after"] = os.getloadavg()
    result["client_peak_rss_mb"] = peak_rss_mb()
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def run(
    mode: str,
    workers: int,
    asns: list,
    refcat: Path,
    work: Path,
    n_images: int,
    dask_profiler: bool = False,
) -> dict:
    tag = mode if mode == "serial" else f"batch-{workers}{'-profiler' if dask_profiler else ''}"
    out = work / "out" / tag
    shutil.rmtree(out, ignore_errors=True)
    spec = {
        "mode": mode,
        "workers": workers,
        "asns": asns,
        "refcat": str(refcat),
        "dask_profiler": dask_profiler,
        "out": str(out),
        "result": str(work / f"{tag}.json"),
    }
    spec_path = work / f"{tag}.spec.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]]
    )
    t0 = time.perf_counter()
    with (work / f"{tag}.log").open("w") as log:
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
            check=True,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    res = json.loads(Path(spec["result"]).read_text())
    res.update(
        config=tag,
        process_s=time.perf_counter() - t0,
        images=n_images,
        images_per_s=n_images / res["wall_s"],
        images_per_s_tasks=n_images / res["tasks_s"],
    )
    return res


def rst_table(report: dict) -> str:
    """The results as a reStructuredText list-table, ready for docs/performance.rst."""
    head = ("Configuration", "Load (1 min)", "Wall (s)", "Tasks (s)", "Images/s",
            "CPU s per association", "Peak RSS per worker (MB)")  # fmt: skip
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines += [("   * - " if k == 0 else "     - ") + h for k, h in enumerate(head)]
    names = {"serial": "serial loop", "batch-1": "batch, 1 worker"}
    for r in report["results"]:
        cells = (
            names.get(r["config"], r["config"].replace("batch-", "batch, ") + " workers"),
            f"{r['loadavg_before'][0]:.1f} - {r['loadavg_after'][0]:.1f}",
            f"{r['wall_s']:.1f}",
            f"{r['tasks_s']:.1f}",
            f"{r['images_per_s']:.2f}",
            f"{r['cpu_s_per_association']:.2f}",
            f"{max(r['worker_peak_rss_mb']):.0f}",
        )
        lines += [("   * - " if k == 0 else "     - ") + c for k, c in enumerate(cells)]
    if "speedup_2_vs_1" in report:
        lines += ["", f"2 workers / 1 worker: {report['speedup_2_vs_1']:.2f}x"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", type=int, default=200)
    parser.add_argument("--exposures", type=int, default=1, help="exposures per association")
    parser.add_argument("--detectors", type=int, default=18, help="detectors per exposure")
    parser.add_argument("--sources", type=int, default=1000, help="max sources per catalog")
    parser.add_argument("--workers", default="1,2", help="comma list of local worker counts")
    parser.add_argument("--no-serial", action="store_true", help="skip the serial loop")
    parser.add_argument(
        "--dask-profiler",
        action="store_true",
        help="keep Dask's statistical profiler on in the workers (align_associations turns "
        "it off in its own LocalCluster; this shows what it costs)",
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(Path(args.child))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_batch_"))
    work.mkdir(parents=True, exist_ok=True)
    asns, refcat = prepare(work, args.associations, args.exposures, args.detectors, args.sources)
    n_images = args.associations * args.exposures * args.detectors
    load = os.getloadavg()
    results = []
    if not args.no_serial:
        results.append(run("serial", 1, asns, refcat, work, n_images))
    for n in [int(w) for w in args.workers.split(",") if w.strip()]:
        results.append(run("batch", n, asns, refcat, work, n_images, args.dask_profiler))
    report = {
        "associations": args.associations,
        "images_per_association": args.exposures * args.detectors,
        "sources": args.sources,
        "cpus": os.cpu_count(),
        "loadavg_before": load,
        "loadavg_after": os.getloadavg(),
        "results": results,
    }
    by = {r["config"]: r for r in results}
    if "batch-1" in by and "batch-2" in by:
        report["speedup_2_vs_1"] = by["batch-2"]["images_per_s"] / by["batch-1"]["images_per_s"]
    text = json.dumps(report, indent=1)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(
        f"{'config':<10} {'wall s':>8} {'tasks s':>8} {'img/s':>7} {'cpu s/asn':>9} "
        f"{'peak MB/worker':>15} {'load':>11}",
        file=sys.stderr,
    )
    for r in results:
        print(
            f"{r['config']:<10} {r['wall_s']:8.1f} {r['tasks_s']:8.1f} {r['images_per_s']:7.2f} "
            f"{r['cpu_s_per_association']:9.2f} {max(r['worker_peak_rss_mb']):15.0f} "
            f"{r['loadavg_before'][0]:5.1f}-{r['loadavg_after'][0]:<5.1f}",
            file=sys.stderr,
        )
    print(rst_table(report), file=sys.stderr)
    print(f"load average before/after: {load} / {report['loadavg_after']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

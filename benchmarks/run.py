"""Benchmark roman_tweakreg's TweakRegStep end to end, as a user runs it; print JSON.

Usage::

    python benchmarks/run.py --exposures 2 --detectors 18 --repeat 3
    python benchmarks/run.py --exposures 1,2 --compare-romancal        # side by side
    python benchmarks/run.py --exposures 1 --full-arrays --repeat 1    # 4088 x 4088 arrays

What it does, per size (``--exposures`` may be a comma-separated list):

1. Simulates N exposures x D detectors with ``roman_tweakreg.testing.simulate.make_dataset``
   (seeded; at most ``--sources`` catalog sources per detector) and writes them with
   ``simulate.write_dataset``: one L2 ASDF file per detector, its catalog file
   (``<root>_cat.ecsv``, named in ``meta.source_catalog.tweakreg_catalog_name``), an
   association ``asn.json``, and a reference catalog ``ref_at_epoch.ecsv`` (RA/DEC of the
   stars propagated to the observation epoch, no proper motions) that both implementations
   read.  A written dataset is reused when ``<workdir>/<size>/dataset.json`` matches.
   Each model gets ``meta.group_id = <visit_id>_<exposure>`` and both implementations run
   on ``asn_group_ids.json``, the association with the same ``group_id`` per member:
   romancal 1.1.0 otherwise takes the group from ``meta.observation.observation_id``,
   which all simulated exposures share, and aligns them as one rigid group (see
   ``prepare``).  ``--no-group-ids`` keeps the files and ``asn.json`` as
   ``simulate.write_dataset`` writes them.
2. Runs ``TweakRegStep(abs_refcat=ref_at_epoch.ecsv, ...).run(asn)`` ``--repeat`` times,
   each in a fresh subprocess (``run.py --worker``) so that the peak RSS of one run is not
   inherited from another or from the data generation.  The worker times the ``run``
   (wall clock), takes its phases from the step's own clock (``step.timings``: catalogs,
   relative, absolute, update, save; the same figures the step logs and writes in its
   report; ``other`` is the rest of the run), reads its own peak RSS (``VmHWM`` of
   ``/proc/self/status``; ``ru_maxrss`` elsewhere, see ``_rss.peak_rss_mb``) and writes every
   output WCS to an ASDF file.  This (parent) process compares those WCS with the true
   ones: the accuracy is the largest RMS sky distance (mas) over the images, on a 9 x 9
   pixel grid (``simulate.wcs_difference_mas``).
3. With ``--compare-romancal`` runs ``benchmarks/romancal_run.py`` with another Python
   (one that has romancal; ours must not be importable there) on the same association,
   with the same subprocess / RSS / WCS protocol.

The medians over ``--repeat`` runs are reported (wall time, phases, peak RSS); the error
is the worst over all runs.  Both implementations write their output files, as ``strun``
users run them (``save_results``), and the saving is timed; ``--no-save`` leaves it out.
Our step's time is also given per phase (``stages_s``: catalogs, relative, absolute,
update, save and other, from ``step.timings``).

The JSON goes to stdout (and ``--json-out``); a summary table goes to stderr.  Step logs of
every run are kept in ``<workdir>/<size>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _rss import peak_rss_mb

_T_START = time.perf_counter()  # before the heavy imports: the worker reports its import time

HERE = Path(__file__).resolve().parent
DEFAULT_ROMANCAL_PYTHON = "/root/.pyenv/versions/3.11.7/bin/python"
SEED = 7

#: The alignment phases of the step's clock (``step.timings``), to compare saving with.
ALIGN_PHASES = ("catalogs", "relative", "absolute", "update")


def _version() -> str:
    import roman_tweakreg

    return str(getattr(roman_tweakreg, "__version__", "?"))


def _src_digest() -> str:
    """SHA-256 (12 hex digits) of the package's .py files: which source state was timed."""
    import hashlib

    import roman_tweakreg

    digest = hashlib.sha256()
    root = Path(roman_tweakreg.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def dump_wcs(library, path: Path) -> dict:
    """Write ``{filename: wcs}`` of every model of ``library`` to ``path``; return statuses."""
    import asdf

    wcs, status = {}, {}
    with library:
        for index in range(len(library)):
            model = library.borrow(index)
            name = str(model.meta.filename)
            wcs[name] = model.meta.wcs
            status[name] = str(model.meta.cal_step.tweakreg)
            library.shelve(model, index, modify=False)
    asdf.AsdfFile({"wcs": wcs}).write_to(path)
    return status


def _descendants_cpu_s() -> float | None:
    """CPU seconds of this process's descendants still known (the fork server, with the
    workers it has reaped, which ``RUSAGE_CHILDREN`` of this process never counts: they
    are the server's children); None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
        except psutil.Error:  # ended meanwhile
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def worker(spec_path: Path) -> int:
    """Run our step once as described by the JSON ``spec_path``; write the result JSON."""
    spec = json.loads(spec_path.read_text())
    import logging

    from roman_tweakreg import TweakRegStep

    # the step's log in this run's log file, as stpipe's default configuration shows it
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s - %(name)s - %(levelname)s - %(message)s")
    kwargs = dict(abs_refcat=spec["refcat"], save_results=spec["save"])
    if spec["save"]:
        kwargs["output_dir"] = spec["output_dir"]
    kwargs.update(spec.get("pars", {}))
    import_s = time.perf_counter() - _T_START
    rss_before = peak_rss_mb()
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    import resource

    idle = None
    if spec.get("idle_thread"):  # a process with another thread (a kernel, an application)
        import threading

        idle = threading.Event()
        threading.Thread(target=idle.wait, daemon=True).start()
    load_before = os.getloadavg()[0]
    c0 = time.process_time()
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    step = TweakRegStep(**kwargs)
    result = step.run(spec["asn"])
    call_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    if idle is not None:
        idle.set()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # forked workers, once ended
    cpu_workers_s = (children.ru_utime + children.ru_stime) - (
        children0.ru_utime + children0.ru_stime
    )
    cpu_tree_s = _descendants_cpu_s()
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    peak = peak_rss_mb()
    status = dump_wcs(result, Path(spec["wcs_out"]))
    # the step's own clock; a phase the run did not have (relative, one group) counts 0 s
    phases = {p: step.timings.get(p, 0.0) for p in (*ALIGN_PHASES, "save")}
    phases["other"] = call_s - sum(phases.values())
    out = {
        "implementation": "roman_tweakreg",
        "version": _version(),
        "src_digest": _src_digest(),
        "call_s": call_s,
        "cpu_s": cpu_s,
        "cpu_workers_s": cpu_workers_s,
        "cpu_descendants_s": cpu_tree_s,
        "loadavg_1min_before": load_before,
        "import_s": import_s,
        "phases_s": phases,
        "stages_s": phases,
        "peak_rss_mb": peak,
        "peak_rss_before_call_mb": rss_before,
        # largest forked worker; its RSS includes the pages it shares with this process
        "peak_rss_workers_mb": children.ru_maxrss / 1024 if children.ru_maxrss else 0.0,
        "status": status,
        "profile": spec.get("profile"),
    }
    Path(spec["result"]).write_text(json.dumps(out, indent=2))
    return 0


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def prepare(work: Path, n_exp: int, n_det: int, sources: int, full: bool,
            group_ids: bool = True):
    """Simulate (and write, unless a matching dataset is on disk) one dataset.

    Returns the association path, the reference catalog path, ``{filename: true wcs}``,
    the number of catalog sources and the timings.
    """
    import numpy as np
    from astropy.table import Table

    from roman_tweakreg.testing import simulate

    inputs = work / "inputs"
    manifest = work / "dataset.json"
    params = {"exposures": n_exp, "detectors": n_det, "sources": sources,
              "full_arrays": full, "seed": SEED, "group_ids": group_ids, "format": 2}
    reuse = manifest.exists() and json.loads(manifest.read_text()).get("params") == params
    # The truth does not depend on the array shape: simulate small arrays when reusing.
    shape = simulate.DETECTOR_SHAPE if (full and not reuse) else (8, 8)
    t0 = time.perf_counter()
    exposures, stars = simulate.make_dataset(
        n_exp, detectors=simulate.DETECTORS[:n_det], seed=SEED, data_shape=shape,
        max_sources=sources,
    )
    simulate_s = time.perf_counter() - t0
    truths = {
        m.meta.filename: w for e in exposures for m, w in zip(e.models, e.true_wcs, strict=True)
    }
    n_sources = int(sum(len(c) for e in exposures for c in e.catalogs))
    groups = {
        m.meta.filename: f"{m.meta.observation.visit_id}_{int(m.meta.observation.exposure):04d}"
        for e in exposures for m in e.models
    }
    if group_ids:
        # romancal 1.1.0 takes each image's alignment group from meta.group_id, else from
        # meta.observation.observation_id, which all exposures of an observation share (an
        # association member's group_id is not used for that).  Without meta.group_id it
        # aligns all exposures as one rigid group.  Ours derives the same groups from
        # meta.observation (visit_id + exposure); with meta.group_id it uses that.
        for e in exposures:
            for m in e.models:
                m.meta["group_id"] = groups[m.meta.filename]
    write_s = None
    if reuse and json.loads(manifest.read_text()).get("sources_total") == n_sources:
        _log(f"reusing the dataset in {inputs}")
    else:
        if inputs.exists():
            shutil.rmtree(inputs)
        manifest.unlink(missing_ok=True)
        t0 = time.perf_counter()
        simulate.write_dataset(exposures, stars, inputs)
        write_s = time.perf_counter() - t0
        epoch = exposures[0].epoch
        ra, dec = simulate.propagate(stars, epoch, simulate.l2_observer(epoch))
        Table({"RA": np.asarray(ra), "DEC": np.asarray(dec)}).write(
            inputs / "ref_at_epoch.ecsv", overwrite=True)
        manifest.write_text(json.dumps({"params": params, "sources_total": n_sources,
                                        "write_s": write_s}, indent=2))
        _log(f"wrote {len(truths)} images in {write_s:.1f} s to {inputs}")
    asn = inputs / "asn.json"
    if group_ids:
        # The same association with each member's group_id: both libraries then skip
        # reading every file's metadata to find the groups.
        data = json.loads(asn.read_text())
        for member in data["products"][0]["members"]:
            member["group_id"] = groups[member["expname"]]
        asn = inputs / "asn_group_ids.json"
        asn.write_text(json.dumps(data, indent=2))
    del exposures
    return (asn, inputs / "ref_at_epoch.ecsv", truths, n_sources,
            {"simulate_s": simulate_s, "write_s": write_s})


def wcs_errors(wcs_file: Path, truths: dict) -> dict[str, float]:
    import asdf

    from roman_tweakreg.testing import simulate

    with asdf.open(wcs_file, lazy_load=False) as af:
        return {name: simulate.wcs_difference_mas(wcs, truths[name])
                for name, wcs in af["wcs"].items()}


def _run_child(cmd, env, log_path: Path, timeout: float) -> float:
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=timeout, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{cmd[:3]} exited with {proc.returncode}; log {log_path}:\n{tail}")
    return wall


def _key_value(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    for convert in (int, float):
        try:
            return key, convert(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def run_ours(work: Path, asn: Path, refcat: Path, k: int, args) -> dict:
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    spec = {
        "asn": str(asn), "refcat": str(refcat), "save": args.save,
        "output_dir": str(runs / f"ours_out{k}"),
        "wcs_out": str(runs / f"ours_wcs{k}.asdf"), "result": str(runs / f"ours{k}.json"),
        "profile": str(runs / f"ours{k}.prof") if args.profile else None,
        "pars": dict(_key_value(p) for p in args.par),
        "idle_thread": args.idle_thread,
    }
    spec_path = runs / f"ours_spec{k}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    process_s = _run_child([sys.executable, str(Path(__file__).resolve()), "--worker",
                            str(spec_path)], env, work / "logs" / f"ours{k}.log", args.timeout)
    out = json.loads(Path(spec["result"]).read_text())
    out["process_s"] = process_s
    out["wcs_out"] = spec["wcs_out"]
    return out


def romancal_env() -> dict:
    """Environment for romancal: never contact CRDS (see romancal_run.py)."""
    env = dict(os.environ)
    env.pop("CRDS_SERVER_URL", None)
    env["STPIPE_DISABLE_CRDS_STEPPARS"] = "true"  # stpipe accepts true/yes/t/y, not "1"
    env["CRDS_PATH"] = tempfile.mkdtemp(prefix="crds-empty-")
    env.pop("PYTHONPATH", None)
    return env


def run_romancal(work: Path, asn: Path, refcat: Path, k: int, args) -> dict:
    runs = work / "runs"
    runs.mkdir(exist_ok=True)
    result = runs / f"romancal{k}.json"
    cmd = [args.romancal_python, str(HERE / "romancal_run.py"), str(asn),
           "--abs-refcat", str(refcat), "--wcs-out", str(runs / f"romancal_wcs{k}.asdf"),
           "--json-out", str(result)]
    if args.save:
        cmd += ["--output-dir", str(runs / f"romancal_out{k}")]
    for par in args.romancal_par:
        cmd += ["--par", par]
    process_s = _run_child(cmd, romancal_env(), work / "logs" / f"romancal{k}.log", args.timeout)
    out = json.loads(result.read_text())
    out["process_s"] = process_s
    out["wcs_out"] = str(runs / f"romancal_wcs{k}.asdf")
    return out


def summarize(runs: list[dict], truths: dict) -> dict:
    errors = {}
    for r in runs:
        for name, err in wcs_errors(Path(r["wcs_out"]), truths).items():
            errors[name] = max(err, errors.get(name, 0.0))
    missing = sorted(set(truths) - set(errors))
    first = runs[0]
    out = {
        "implementation": first["implementation"],
        "call_s": statistics.median(r["call_s"] for r in runs),
        "call_s_runs": [round(r["call_s"], 3) for r in runs],
        "cpu_s": statistics.median(r.get("cpu_s", float("nan")) for r in runs),
        "cpu_workers_s": statistics.median(r.get("cpu_workers_s", 0.0) for r in runs),
        "cpu_descendants_s": statistics.median(r.get("cpu_descendants_s") or 0.0 for r in runs),
        "loadavg_1min_before_runs": [r.get("loadavg_1min_before") for r in runs],
        "process_s": statistics.median(r["process_s"] for r in runs),
        "import_s": statistics.median(r["import_s"] for r in runs),
        "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in runs),
        "peak_rss_before_call_mb": statistics.median(r["peak_rss_before_call_mb"] for r in runs),
        "peak_rss_workers_mb": statistics.median(r.get("peak_rss_workers_mb", 0.0) for r in runs),
        "max_error_mas": max(errors.values()) if errors else None,
        "median_error_mas": statistics.median(errors.values()) if errors else None,
        # SKIPPED images keep their input WCS (e.g. no sources in the simulated field)
        "max_error_complete_mas": max(
            (e for n, e in errors.items() if first["status"].get(n) == "COMPLETE"), default=None),
        "images_without_wcs": missing,
        "status_counts": {s: list(first["status"].values()).count(s)
                          for s in sorted(set(first["status"].values()))},
    }
    for key in ("phases_s", "stages_s"):
        if key in first:
            names = list(dict.fromkeys(p for r in runs for p in r[key]))
            out[key] = {p: statistics.median(r[key].get(p, 0.0) for r in runs) for p in names}
    if "stages_s" in out:  # the alignment itself, to compare saving with
        out["align_s"] = sum(out["stages_s"].get(k, 0.0) for k in ALIGN_PHASES)
    for key in ("version", "src_digest", "parameters", "profile"):
        if key in first:
            out[key] = first[key]
    return out


def bench_size(n_exp: int, args, root: Path) -> dict:
    n_det = args.detectors
    work = root / (f"{n_exp}x{n_det}_{args.sources}src{'_full' if args.full_arrays else ''}"
                   f"{'_nogroups' if args.no_group_ids else ''}")
    (work / "logs").mkdir(parents=True, exist_ok=True)
    asn, refcat, truths, n_sources, prep = prepare(work, n_exp, n_det, args.sources,
                                                   args.full_arrays, not args.no_group_ids)
    result = {"exposures": n_exp, "detectors": n_det, "images": n_exp * n_det,
              "association": asn.name,
              "sources": n_sources, "full_arrays": args.full_arrays, "save": args.save,
              "repeat": args.repeat, "prepare_s": prep, "workdir": str(work)}
    ours, theirs = [], []
    for k in range(args.repeat):
        if not args.skip_ours:
            ours.append(run_ours(work, asn, refcat, k, args))
            _log(f"{n_exp * n_det} images, ours run {k}: {ours[-1]['call_s']:.2f} s, "
                 f"{ours[-1]['peak_rss_mb']:.0f} MB")
        if args.compare_romancal:
            theirs.append(run_romancal(work, asn, refcat, k, args))
            _log(f"{n_exp * n_det} images, romancal run {k}: {theirs[-1]['call_s']:.2f} s, "
                 f"{theirs[-1]['peak_rss_mb']:.0f} MB")
    if ours:
        result["ours"] = summarize(ours, truths)
    if theirs:
        result["romancal"] = summarize(theirs, truths)
    if ours and theirs:
        result["romancal_over_ours"] = result["romancal"]["call_s"] / result["ours"]["call_s"]
    if not args.keep_outputs:
        for r in ours + theirs:
            for key in ("wcs_out",):
                Path(r[key]).unlink(missing_ok=True)
        for d in (work / "runs").glob("*_out*"):
            shutil.rmtree(d, ignore_errors=True)
    return result


def _table(results: list[dict]) -> str:
    head = (f"{'images':>6} {'ours s':>8} {'romancal s':>10} {'ratio':>6} "
            f"{'ours MB':>8} {'romancal MB':>11} {'ours mas':>9} {'romancal mas':>12} "
            f"{'ours cpu s':>10} {'romancal cpu s':>14} {'ours align s':>12} {'ours save s':>11}")
    lines = [head]
    for r in results:
        o, t = r.get("ours", {}), r.get("romancal", {})

        def f(d, key, fmt):
            return format(d[key], fmt) if d.get(key) is not None else "-"

        ratio = format(r["romancal_over_ours"], ".2f") if "romancal_over_ours" in r else "-"
        lines.append(f"{r['images']:>6} {f(o, 'call_s', '8.2f'):>8} {f(t, 'call_s', '10.2f'):>10} "
                     f"{ratio:>6} {f(o, 'peak_rss_mb', '8.0f'):>8} "
                     f"{f(t, 'peak_rss_mb', '11.0f'):>11} {f(o, 'max_error_mas', '9.3f'):>9} "
                     f"{f(t, 'max_error_mas', '12.3f'):>12} {f(o, 'cpu_s', '10.2f'):>10} "
                     f"{f(t, 'cpu_s', '14.2f'):>14} {f(o, 'align_s', '12.2f'):>12} "
                     f"{f(o.get('stages_s', {}), 'save', '11.2f'):>11}")
    return "\n".join(lines)


def rst_table(results: list[dict]) -> str:
    """Our figures per size as a reStructuredText list-table, ready for docs/performance.rst."""
    head = ("Images", "Load (1 min)", "Wall (s)", "CPU (s)", "Catalogs (s)", "Relative (s)",
            "Absolute (s)", "Update (s)", "Save (s)", "Peak RSS (MB)", "Worst error (mas)",
            "Median error (mas)")
    lines = [".. list-table::", "   :header-rows: 1", ""]
    lines += [("   * - " if k == 0 else "     - ") + h for k, h in enumerate(head)]
    for r in results:
        o = r.get("ours")
        if not o:
            continue
        stages = o.get("stages_s", {})
        loads = [x for x in o.get("loadavg_1min_before_runs", []) if x is not None]
        cells = [f"{r['images']} ({r['exposures']} x {r['detectors']})",
                 f"{min(loads):.1f} - {max(loads):.1f}" if loads else "-",
                 f"{o['call_s']:.2f}", f"{o['cpu_s'] + o.get('cpu_workers_s', 0.0):.2f}"]
        cells += [f"{stages[k]:.2f}" if k in stages else "-"
                  for k in ("catalogs", "relative", "absolute", "update", "save")]
        cells += [f"{o['peak_rss_mb']:.0f}",
                  *(f"{o[k]:.3f}" if o.get(k) is not None else "-"
                    for k in ("max_error_mas", "median_error_mas"))]
        lines += [("   * - " if k == 0 else "     - ") + c for k, c in enumerate(cells)]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]),
    )
    parser.add_argument("--exposures", default="2",
                        help="exposures per dataset; a comma-separated list runs several sizes "
                             "(default 2)")
    parser.add_argument("--detectors", type=int, default=18,
                        help="detectors per exposure, 1-18 (default 18)")
    parser.add_argument("--sources", type=int, default=1000,
                        help="at most this many (brightest) catalog sources per detector; the "
                             "simulated field has about 1000 per detector (default 1000)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs per implementation and size; medians are reported")
    parser.add_argument("--full-arrays", action="store_true",
                        help="write realistic 4088 x 4088 pixel arrays (slow to write; the "
                             "dataset is reused by later runs with the same --workdir)")
    parser.add_argument("--no-save", action="store_false", dest="save",
                        help="do not write output files (by default both implementations "
                             "write them, as strun does, and the saving is timed)")
    parser.add_argument("--workdir", default=None,
                        help="folder for datasets, logs and outputs (default: a new temp dir)")
    parser.add_argument("--compare-romancal", nargs="?", const=DEFAULT_ROMANCAL_PYTHON,
                        default=None, metavar="PYTHON", dest="romancal_python",
                        help="also run romancal's TweakRegStep with this Python (default "
                             f"{DEFAULT_ROMANCAL_PYTHON}); see benchmarks/romancal_run.py")
    parser.add_argument("--romancal-par", action="append",
                        default=["fitgeometry=rshift", "abs_fitgeometry=rshift"],
                        help="romancal step parameter key=value (repeatable); by default the "
                             "fit geometries are set to ours (rshift)")
    parser.add_argument("--par", action="append", default=[],
                        help="our step parameter key=value (repeatable; integers, floats and "
                             "true/false are converted), e.g. --par processes=1")
    parser.add_argument("--profile", action="store_true",
                        help="run our step under cProfile (slower) and keep "
                             "<workdir>/<size>/runs/ours<k>.prof; read it with "
                             "python -m pstats or snakeviz")
    parser.add_argument("--no-group-ids", action="store_true",
                        help="no meta.group_id in the files and no group_id in the "
                             "association (as simulate.write_dataset writes them); romancal "
                             "1.1.0 then aligns all exposures of the observation as one group")
    parser.add_argument("--idle-thread", action="store_true",
                        help="start an idle thread in our step's process before the call (a "
                             "process with threads, like a Jupyter kernel or a Dask worker)")
    parser.add_argument("--skip-ours", action="store_true", help="run romancal only")
    parser.add_argument("--keep-outputs", action="store_true",
                        help="keep the output WCS files and saved models")
    parser.add_argument("--timeout", type=float, default=3600.0,
                        help="seconds allowed per run (default 3600)")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(Path(args.worker))
    args.compare_romancal = args.romancal_python is not None
    if not 1 <= args.detectors <= 18:
        parser.error("--detectors must be within 1-18")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")
    sizes = [int(s) for s in str(args.exposures).split(",") if s.strip()]

    root = Path(args.workdir or tempfile.mkdtemp(prefix="tweakreg-bench-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    results = [bench_size(n, args, root) for n in sizes]
    report = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "processor": platform.processor()},
        "arguments": {k: v for k, v in vars(args).items() if k != "worker"},
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json_out:
        Path(args.json_out).write_text(text + "\n")
    print(_table(results), file=sys.stderr)
    print(rst_table(results), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

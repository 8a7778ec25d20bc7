"""Benchmark TweakRegStep end to end, as a user runs it, and print JSON.

Usage::

    python benchmarks/run.py --exposures 2 --detectors 18 --repeat 3 [--full-arrays]

Generates N exposures x D detectors with ``roman_tweakreg.simulate`` (about 1000 sources
per detector), writes them as L2 ASDF files with catalogs, an association and a reference
catalog at the observation epoch, then runs ``TweakRegStep.call`` on the association.
Prints wall time per phase (from the step's log), total, peak RSS and the accuracy
against the true WCS: the median over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from astropy.table import Table


class _PhaseClock(logging.Handler):
    """Time stamps of the step's log messages, to split the wall time into phases."""

    MARKS = {
        "images to align": "catalogs",
        "Relative alignment": "relative",
        "Absolute alignment": "absolute",
        "Saved model": "save",
    }

    def __init__(self):
        super().__init__(logging.INFO)
        self.first = {}

    def emit(self, record):
        msg = record.getMessage()
        for key, phase in self.MARKS.items():
            if key in msg and phase not in self.first:
                self.first[phase] = time.perf_counter()


def run_once(asn: Path, refcat: Path, out: Path, truths) -> dict:
    import roman_datamodels.datamodels as rdm

    from roman_tweakreg import TweakRegStep, simulate

    clock = _PhaseClock()
    logging.getLogger().addHandler(clock)
    t0 = time.perf_counter()
    TweakRegStep.call(str(asn), abs_refcat=str(refcat), output_dir=str(out), save_results=True)
    total = time.perf_counter() - t0
    logging.getLogger().removeHandler(clock)
    errors = []
    for path, truth in zip(sorted(out.glob("*_tweakregstep.asdf")), truths):
        with rdm.open(path) as model:
            errors.append(simulate.wcs_difference_mas(model.meta.wcs, truth))
    marks = sorted(clock.first.items(), key=lambda kv: kv[1])
    phases, prev_t, prev_name = {}, t0, "load"
    for name, t in marks:
        phases[prev_name] = t - prev_t
        prev_t, prev_name = t, name
    phases[prev_name] = t0 + total - prev_t
    return {"total_s": total, "phases_s": phases, "max_error_mas": max(errors)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exposures", type=int, default=2)
    parser.add_argument("--detectors", type=int, default=18)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--full-arrays", action="store_true",
                        help="write realistic 4088 x 4088 pixel arrays")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args(argv)

    from roman_tweakreg import simulate

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tweakreg-bench-"))
    shape = simulate.DETECTOR_SHAPE if args.full_arrays else (8, 8)
    exposures, stars = simulate.make_dataset(
        args.exposures, detectors=simulate.DETECTORS[: args.detectors], seed=7, data_shape=shape
    )
    asn = simulate.write_dataset(exposures, stars, work / "inputs")
    ra, dec = simulate.propagate(stars, exposures[0].epoch)
    refcat = work / "inputs" / "ref_at_epoch.ecsv"
    Table({"RA": ra, "DEC": dec}).write(refcat, overwrite=True)
    truths = [w for e in exposures for w in e.true_wcs]
    runs = [run_once(asn, refcat, work / f"out{k}", truths) for k in range(args.repeat)]
    phases = sorted({p for r in runs for p in r["phases_s"]})
    report = {
        "images": args.exposures * args.detectors,
        "sources": sum(len(c) for e in exposures for c in e.catalogs),
        "full_arrays": args.full_arrays,
        "repeat": args.repeat,
        "total_s": statistics.median(r["total_s"] for r in runs),
        "phases_s": {p: statistics.median(r["phases_s"].get(p, 0.0) for r in runs)
                     for p in phases},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "max_error_mas": max(r["max_error_mas"] for r in runs),
    }
    json.dump(report, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())

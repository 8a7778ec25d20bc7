"""How the step's phases grow with the number of exposure groups (in memory, no files).

Usage::

    python benchmarks/groups.py --exposures 10,30,55 --detectors 2 --sources 300

Simulates N exposures of D detectors (seed 7, a 4 arcsec dither so that 55 exposures stay
on the simulated field), runs ``TweakRegStep.call`` on the models in memory against the
star field at the observation epoch (``processes=1``), and prints one JSON line per size:
the wall time of the call, the step's own phase times (from its log), the worst error
against the true WCS (mas) and the statuses.  Few detectors per exposure make the number
of groups grow without the number of images hiding it.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path


class _Phases(logging.Handler):
    def __init__(self):
        super().__init__()
        self.times: dict[str, float] = {}

    def emit(self, record):
        m = re.match(r"Phase (\w+) done in ([\d.]+) s", record.getMessage())
        if m:
            self.times[m.group(1)] = float(m.group(2))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--exposures", default="10,30,55")
    parser.add_argument("--detectors", type=int, default=2)
    parser.add_argument("--sources", type=int, default=300)
    args = parser.parse_args(argv)

    from astropy.table import Table

    from roman_tweakreg import TweakRegStep
    from roman_tweakreg.testing import simulate

    phases = _Phases()
    step_log = logging.getLogger("roman_tweakreg.step")
    step_log.addHandler(phases)
    step_log.setLevel(logging.INFO)
    ref = Path(tempfile.mkdtemp(prefix="bench_groups_")) / "ref.ecsv"
    for n in [int(x) for x in args.exposures.split(",")]:
        exposures, stars = simulate.make_dataset(
            n,
            detectors=simulate.DETECTORS[: args.detectors],
            seed=7,
            dither=4.0,
            max_sources=args.sources,
        )
        epoch = exposures[0].epoch
        ra, dec = simulate.propagate(stars, epoch, simulate.l2_observer(epoch))
        Table({"RA": ra, "DEC": dec}).write(ref, overwrite=True)
        models = [m for e in exposures for m in e.models]
        truths = [w for e in exposures for w in e.true_wcs]
        phases.times = {}
        t = time.perf_counter()
        TweakRegStep.call(models, abs_refcat=str(ref), processes=1)
        wall = time.perf_counter() - t
        pairs = zip(models, truths, strict=True)
        err = max(simulate.wcs_difference_mas(m.meta.wcs, w) for m, w in pairs)
        statuses = sorted({str(m.meta.cal_step.tweakreg) for m in models})
        print(
            json.dumps(
                {
                    "exposures": n,
                    "images": len(models),
                    "wall_s": round(wall, 2),
                    **phases.times,
                    "max_err_mas": round(err, 3),
                    "status": statuses,
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``roman-tweakreg example``: simulate a dithered WFI exposure pair, align it, print residuals.

The images are 8 x 8 pixel stand-ins for the 4088 x 4088 detectors (the step reads
only their metadata, WCS and source catalogs), each with its catalog file, plus a
Gaia-like reference catalog.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InvalidParameterError
from .testing import simulate

__all__ = ["run_example"]

#: File marking a folder as made by ``roman-tweakreg example``.
MARKER = ".roman-tweakreg-example"
_PARTS = ("inputs", "outputs")


def _claim(out: Path) -> None:
    """Make ``out`` the example's folder: new, empty, or an earlier example's.

    Raises
    ------
    InvalidParameterError
        When ``out`` is a file, or a non-empty folder the example did not make.
    """
    if out.exists() and not out.is_dir():
        raise InvalidParameterError(f"--out {out}: is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InvalidParameterError(
            f"--out {out}: folder is not empty and was not made by roman-tweakreg example; "
            "give a new or empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"made_by": "roman-tweakreg example"}) + "\n")


def _safe_name(text: str) -> str:
    """A file-name part made of ``text`` (letters, digits, ``-``, ``_``, ``.``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._") or "example"


def _final(text: str, final: dict) -> str:
    """``text`` with the temporary folder's path replaced by the example's."""
    for tmp, out in final.items():
        text = text.replace(tmp, out)
    return text


def _log_args(verbosity: int) -> list[str]:
    """strun's logging options: -v shows the step's whole log (DEBUG) as strun would."""
    if verbosity > 0:
        return ["--log-level=DEBUG"]
    return ["--log-level=INFO", "--log-stream=null"]  # the lines kept by _step_lines


#: The step's lines the example shows: each fit, and the run's result (the last line).
_SHOWN = re.compile(r"^(Relative fit|Absolute fit|Reference catalog|\d+(/\d+)? [A-Z]+)")


@contextmanager
def _step_lines(verbosity: int):
    """Collect the step's warnings, fit lines and result line (not with -v: strun shows all).

    A handler is added to the ``roman_tweakreg`` logger for the block and removed after.
    """
    lines: list[str] = []
    if verbosity > 0:
        yield lines
        return

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                lines.append(f"{record.levelname}: {text}")
            elif verbosity == 0 and _SHOWN.match(text):
                lines.append(text)

    keep = _Keep(logging.INFO)
    logger = logging.getLogger("roman_tweakreg")
    logger.addHandler(keep)
    try:
        yield lines
    finally:
        logger.removeHandler(keep)


def run_example(
    out: str | Path = "tweakreg_example",
    *,
    n_detectors: int = 18,
    seed: int = 2028,
    verbosity: int = 0,
) -> int:
    """Generate the example data set in ``out``, run the step as ``strun`` does, print a table.

    ``out`` must be new, empty, or the folder of an earlier example, whose ``inputs``
    and ``outputs`` are replaced (nothing else in it is touched).  Files are made in
    a temporary folder inside ``out`` and moved into place once the step has run, so
    an interrupted run leaves the earlier example as it was.  The association is
    ``inputs/<folder name>_asn.json``, so that several examples can be given to
    ``roman-tweakreg batch`` as they are (its output folders are named after it).

    Parameters
    ----------
    out : path
        The example's folder.
    n_detectors : int
        Detectors per exposure, 1 to 18.
    seed : int
        Seed of the simulation.
    verbosity : int
        -1: only the step's warnings (on stderr) and the table; 0: a short account
        (the simulation, the command run, the step's fit lines and result, the final
        folders; the paths are those of the files after they were moved into place);
        1: the step's whole log as ``strun --log-level=DEBUG`` shows it (its paths are
        those of the temporary folder the example runs in).

    Returns
    -------
    int
        0 when every image was aligned to better than 1 mas, else 1.

    Raises
    ------
    InvalidParameterError
        For ``n_detectors`` out of range, or an ``out`` that is not the example's.
    """
    import roman_datamodels.datamodels as rdm
    from stpipe import Step

    if (
        isinstance(n_detectors, bool)
        or not isinstance(n_detectors, int)
        or not (1 <= n_detectors <= len(simulate.DETECTORS))
    ):
        raise InvalidParameterError(
            f"n_detectors={n_detectors!r}: expected a whole number from 1 to "
            f"{len(simulate.DETECTORS)}"
        )
    out = Path(out)
    _claim(out)
    say = print if verbosity >= 0 else (lambda *a, **k: None)
    detectors = simulate.DETECTORS[:n_detectors]
    asn_name = f"{_safe_name(out.resolve().name)}_asn.json"
    with tempfile.TemporaryDirectory(dir=out, prefix=".partial-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        exposures, stars = simulate.make_dataset(2, detectors=detectors, seed=seed)
        asn = simulate.write_dataset(exposures, stars, work / "inputs", asn_name=asn_name)
        say(
            f"Simulated 2 exposures x {len(detectors)} detectors (8 x 8 pixel stand-in "
            f"images with catalogs, seed {seed}), "
            f"{sum(len(c) for e in exposures for c in e.catalogs)} sources, Gaia-like "
            f"catalog of {len(stars)} stars at epoch 2016.0, in {time.perf_counter() - t0:.1f} s"
        )
        final = {str(work): str(out)}  # the files are moved there once the step has run
        args = [  # exactly what `strun roman_tweakreg ...` does
            "roman_tweakreg.TweakRegStep",
            str(asn),
            f"--abs_refcat={work / 'inputs' / 'gaia.ecsv'}",
            f"--output_dir={work / 'outputs'}",
        ]
        say("Aligning with: strun roman_tweakreg " + _final(" ".join(args[1:]), final))
        t0 = time.perf_counter()
        with _step_lines(verbosity) as lines:
            Step.from_cmdline(args + _log_args(verbosity))
        for part in _PARTS:  # the earlier example's files, replaced whole
            shutil.rmtree(out / part, ignore_errors=True)
            (work / part).rename(out / part)
    for line in lines:
        print("  " + _final(line, final), file=sys.stderr if verbosity < 0 else sys.stdout)
    n_images = sum(len(e.models) for e in exposures)
    say(
        f"TweakRegStep ran in {time.perf_counter() - t0:.1f} s.\n"
        f"Inputs: {out / 'inputs'} ({n_images} images, their catalogs, gaia.ecsv, {asn_name})\n"
        f"Outputs: {out / 'outputs'} ({n_images} *_tweakregstep.asdf, {n_images} *_wcs.asdf)\n"
        f"Look at them: roman-tweakreg report {out / 'outputs'}; roman-tweakreg plot "
        f"{out / 'outputs'} --refcat {out / 'inputs' / 'gaia.ecsv'}"
    )
    header = (
        f"{'exposure':>8} {'detector':>8} {'before [mas]':>12} {'after [mas]':>11} "
        f"{'nmatches':>8}  status"
    )
    print(header)
    print("-" * len(header))
    worst = 0.0
    for exp in exposures:
        for model, truth in zip(exp.models, exp.true_wcs, strict=False):
            before = simulate.wcs_difference_mas(model.meta.wcs, truth)
            name = model.meta.filename.replace("_cal.asdf", "_cal_tweakregstep.asdf")
            with rdm.open(out / "outputs" / name) as aligned:
                after = simulate.wcs_difference_mas(aligned.meta.wcs, truth)
                fit = aligned.meta.wcs_fit_results
                status = aligned.meta.cal_step.tweakreg
            worst = max(worst, after)
            print(
                f"{model.meta.observation.exposure:>8} {model.meta.instrument.detector:>8} "
                f"{before:>12.1f} {after:>11.3f} {fit['nmatches']:>8}  {status}"
            )
    print(
        f"Largest residual against the true WCS: {worst:.3f} mas"
        f" ({'below' if worst < 1 else 'ABOVE'} 1 mas)"
    )
    return 0 if np.isfinite(worst) and worst < 1.0 else 1

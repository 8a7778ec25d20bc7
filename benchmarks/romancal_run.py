"""Run romancal's TweakRegStep once on an association; print wall time and peak RSS as JSON.

Run it with a Python that has romancal (1.1.0 was measured) and NOT roman_tweakreg, e.g.::

    STPIPE_DISABLE_CRDS_STEPPARS=true CRDS_PATH=$(mktemp -d) \\
        /root/.pyenv/versions/3.11.7/bin/python benchmarks/romancal_run.py \\
        <workdir>/inputs/asn.json --abs-refcat <workdir>/inputs/ref_at_epoch.ecsv

``benchmarks/run.py --compare-romancal`` calls it that way, in a fresh process per run.

What romancal 1.1.0 needs from the benchmark's files (found by running it):

* Catalogs: it reads ``meta.source_catalog.tweakreg_catalog_name`` and opens that name
  *relative to the current directory*, with ``Table.read(name, format=catalog_format)``.
  Our simulated files store the bare file name, so this script changes directory to the
  association's folder.  Columns ``x``/``y`` (or ``x_psf``/``y_psf``) are what it needs;
  ``flux``/``objID`` are ignored.  No catalog copy is needed.
* ``abs_refcat``: stcal's ``absolute_align`` accepts a path to an existing file (read
  with ``astropy.table.Table.read``, so the format is guessed from the name) with
  ``RA``/``DEC`` columns (any case) or a ``sky_centroid`` column.  The file is used as
  it is: no epoch propagation, no cut to the footprint.  Any ``abs_refcat`` other than
  ``GAIADR3_S3`` silently turns ``expand_refcat`` on for the relative alignment.
  ``abs_separation`` must exceed ``sqrt(2) * abs_tolerance`` (stcal raises otherwise),
  so romancal's default 1.0 arcsec is kept.
* Groups: the alignment group of each image is ``meta.group_id``, else
  ``meta.observation.observation_id`` (``ModelLibrary._model_to_group_id``); an
  association member's ``group_id`` is not used for it.  Our simulated exposures share
  their ``observation_id``, so without ``meta.group_id`` romancal fits all exposures as
  one rigid group (the relative alignment then stops with "Too few input images (or
  groups of images)" after building the group catalogs, and the absolute fit leaves
  errors of hundreds of mas).  ``run.py`` therefore writes ``meta.group_id`` per exposure.
* CRDS: ``TweakRegStep.call`` asks CRDS for a parameter reference file (``pars-tweakregstep``)
  before running.  Offline that ends in ``sys.exit(-1)`` ("CRDS server connection and cache
  load FAILED") unless ``STPIPE_DISABLE_CRDS_STEPPARS`` is ``true`` (stpipe accepts
  ``true``/``True``/``t``/``yes``/``y``; ``1`` is *not* accepted).  The step itself uses no
  reference file, so nothing else touches CRDS; ``CRDS_PATH`` pointed at an empty folder
  and ``CRDS_SERVER_URL`` unset make sure of it.  This script sets the variable itself
  when it is not set.
* The step's ``finalize_result`` computes image statistics (``populate_statistics``) over
  every model's ``data``/``dq``: that reads the pixel arrays, which matters for RSS with
  full-size arrays.

Output JSON (stdout, last line; and ``--json-out``): ``call_s`` (wall time of
``TweakRegStep.call``), ``cpu_s`` (CPU time of this process over the call, all threads),
``import_s`` (interpreter start to before the call),
``peak_rss_mb`` (``VmHWM``, the peak RSS of this process, read after the call),
``peak_rss_before_call_mb``, per-image ``status`` (``meta.cal_step.tweakreg``), romancal's
version and the parameters passed.  ``--wcs-out`` writes every output WCS to an ASDF file
(after the timing) so that the caller can measure the accuracy.
"""

from __future__ import annotations

import time

_T_START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from _rss import peak_rss_mb  # noqa: E402  (benchmarks/ is on sys.path)

os.environ.setdefault("STPIPE_DISABLE_CRDS_STEPPARS", "true")


def _value(text: str):
    """Step parameter from the command line: bool, int, float or string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("asn", help="association JSON file")
    parser.add_argument("--abs-refcat", required=True, help="local reference catalog file")
    parser.add_argument("--par", action="append", default=[],
                        help="step parameter key=value (repeatable)")
    parser.add_argument("--output-dir", default=None,
                        help="save the outputs there (save_results=True); default: no files")
    parser.add_argument("--wcs-out", default=None, help="write the output WCS to this ASDF file")
    parser.add_argument("--json-out", default=None, help="also write the JSON to this file")
    args = parser.parse_args(argv)

    if "roman_tweakreg" in sys.modules or _importable("roman_tweakreg"):
        print("warning: roman_tweakreg is importable in this Python", file=sys.stderr)
    asn = Path(args.asn).resolve()
    refcat = str(Path(args.abs_refcat).resolve())
    json_out = Path(args.json_out).resolve() if args.json_out else None
    wcs_out = Path(args.wcs_out).resolve() if args.wcs_out else None
    output_dir = str(Path(args.output_dir).resolve()) if args.output_dir else None
    os.chdir(asn.parent)  # romancal opens tweakreg_catalog_name relative to the cwd

    import romancal
    from romancal.tweakreg import TweakRegStep

    pars = dict(p.split("=", 1) for p in args.par)
    pars = {k: _value(v) for k, v in pars.items()}
    kwargs = dict(abs_refcat=refcat, save_results=output_dir is not None, **pars)
    if output_dir:
        kwargs["output_dir"] = output_dir
    import_s = time.perf_counter() - _T_START
    rss_before = peak_rss_mb()
    load_before = os.getloadavg()[0]
    c0 = time.process_time()
    t0 = time.perf_counter()
    result = TweakRegStep.call(str(asn), **kwargs)
    call_s = time.perf_counter() - t0
    cpu_s = time.process_time() - c0
    peak = peak_rss_mb()

    status, wcs = {}, {}
    with result:
        for index in range(len(result)):
            model = result.borrow(index)
            name = str(model.meta.filename)
            status[name] = str(model.meta.cal_step.tweakreg)
            wcs[name] = model.meta.wcs
            result.shelve(model, index, modify=False)
    if wcs_out:
        import asdf

        asdf.AsdfFile({"wcs": wcs}).write_to(wcs_out)
    out = {
        "implementation": "romancal",
        "version": romancal.__version__,
        "parameters": {k: v for k, v in kwargs.items() if k != "abs_refcat"},
        "call_s": call_s,
        "cpu_s": cpu_s,
        "loadavg_1min_before": load_before,
        "import_s": import_s,
        "peak_rss_mb": peak,
        "peak_rss_before_call_mb": rss_before,
        "status": status,
    }
    text = json.dumps(out)
    if json_out:
        json_out.write_text(text + "\n")
    print(text)
    return 0


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


if __name__ == "__main__":
    sys.exit(main())

"""Time and score ``roman_tweakreg.detection.detect_sources`` on full-size WFI detectors.

A 4088 x 4088 scene of :func:`roman_tweakreg.testing.make_scene` (seeded): isolated
stars with S/N log-uniform in [3, 1000], crowded pairs, saturated stars, cosmic
rays, hot pixels, NaN pixels and a dead column.  Each timed run is a fresh
subprocess that loads the arrays, then runs ``detect_sources(data, dq, err)``
once: it reports the wall and CPU (``time.process_time``) time and the peak
resident memory added by the call.  The parent scores the catalog against the
truth (recovery, position rms and the Cramer-Rao bound, false detections,
saturated or flagged stars in the catalog).

    python benchmarks/detection.py --stars 2000 --repeat 3
    python benchmarks/detection.py --filter F213 --stars 3000 --json-out det.json
    python benchmarks/detection.py --psf-model --repeat 3

``--psf-model`` writes the scene's PSF as an ePSF reference file (one grid point,
oversampled 4 times) and gives it to ``detect_sources`` (``psf=``): the fit with a
PSF model instead of the empirical PRF.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SHAPE = (4088, 4088)


def _scene(args, folder: Path):
    from astropy.table import Table

    from roman_tweakreg.testing import make_scene

    key = f"{args.filter}_{args.stars}_{args.seed}"
    folder.mkdir(parents=True, exist_ok=True)
    arrays, truth = folder / f"scene_{key}.npz", folder / f"truth_{key}.ecsv"
    if not arrays.exists():
        t = time.perf_counter()
        scene = make_scene(
            SHAPE,
            seed=args.seed,
            n_stars=args.stars,
            filter_name=args.filter,
            n_pairs=args.stars // 20,
            n_saturated=args.stars // 100,
            n_cosmic_rays=5000,
            n_hot=2000,
            n_nan=2000,
            dead_column=True,
        )
        np.savez(arrays, data=scene.data, dq=scene.dq, err=scene.err)
        scene.truth.write(truth, overwrite=True)
        print(f"scene rendered in {time.perf_counter() - t:.1f} s -> {arrays}")
    return arrays, Table.read(truth)


def _epsf_file(folder: Path, filter_name: str, oversample: int = 4, half: int = 12) -> Path:
    """The scene's PSF as an ``EpsfRefModel`` file: ePSF samples ``1/oversample`` px apart."""
    from roman_datamodels import datamodels as rdm

    from roman_tweakreg.testing import wfi_psf

    path = folder / f"epsf_{filter_name}_{oversample}.asdf"
    if path.exists():
        return path
    psf = wfi_psf(filter_name)
    n = 2 * half * oversample + 1
    stamp = np.zeros((n, n))
    for ky in range(oversample):
        for kx in range(oversample):
            # pixel j of a star at offset k / oversample: the ePSF at j - k / oversample
            prf = psf.prf(kx / oversample, ky / oversample, half + 1)[0]
            j = np.arange(-half - 1, half + 2)
            mx = (j + half) * oversample - kx
            my = (j + half) * oversample - ky
            okx, oky = (mx >= 0) & (mx < n), (my >= 0) & (my < n)
            stamp[np.ix_(my[oky], mx[okx])] = prf[np.ix_(oky, okx)]
    model = rdm.EpsfRefModel.create_fake_data(shape=(1, 1, 1, n, n))
    model.psf = stamp[None, None, None].astype(np.float32)  # one pixel lattice sums to ~1
    model.meta["oversample"] = oversample
    model.meta.pixel_x, model.meta.pixel_y = [2043.5], [2043.5]
    model.save(path)
    return path


def _worker(arrays: str, out: str, psf_model: str = "") -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from _rss import peak_rss_mb

    with np.load(arrays) as npz:
        data, dq, err = npz["data"], npz["dq"], npz["err"]
    from roman_tweakreg.detection import detect_sources
    from roman_tweakreg.psf import read_epsf

    psf = read_epsf(psf_model) if psf_model else None
    base = peak_rss_mb()
    cpu, wall = time.process_time(), time.perf_counter()
    catalog = detect_sources(data, dq, err, psf=psf)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    catalog.write(out, overwrite=True)
    arrays_mb = (data.nbytes + dq.nbytes + err.nbytes) / 2**20
    extra = peak_rss_mb() - base
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "n": len(catalog),
                "arrays_mb": arrays_mb,
                "peak_extra_mb": extra,
                "peak_ratio": extra / arrays_mb,
            }
        )
    )


def score(catalog, truth, dq) -> dict:
    """Recovery, rms, false and bad detections of ``catalog`` against ``truth``."""
    from roman_datamodels.dqflags import pixel as dqflags
    from scipy.spatial import cKDTree

    from roman_tweakreg.testing import FLAGGED, match

    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    single = (np.asarray(truth["kind"]) == "single") & ~np.asarray(truth["flagged"], bool)
    found, _, offset = match(x, y, truth)
    err2d = np.hypot(*offset.T)
    snr = np.asarray(truth["snr"])
    out = {}
    for lim in (10, 20, 100):
        sel = single & (snr >= lim)
        out[f"recovery_{lim}"] = float(found[sel].mean())
        out[f"rms_{lim}"] = float(np.sqrt(np.nanmean(err2d[sel & found] ** 2)))
    pair = (np.asarray(truth["kind"]) == "pair") & (snr >= 20)
    out["pair_recovery_20"] = float(found[pair].mean())
    # saturated at their centre pixel: never catalogued, by rule
    ix, iy = np.rint(truth["x"]).astype(int), np.rint(truth["y"]).astype(int)
    centre_saturated = (dq[iy, ix] & int(dqflags.SATURATED)) != 0
    out["pair_recovery_20_unsaturated"] = float(found[pair & ~centre_saturated].mean())
    out["pair_recovery_20_unflagged"] = float(found[pair & ~np.asarray(truth["flagged"])].mean())
    out["pairs_20"] = int(pair.sum())
    out["pairs_20_saturated"] = int((pair & centre_saturated).sum())
    nearest = cKDTree(np.column_stack([truth["x"], truth["y"]])).query(np.column_stack([x, y]))
    out["false"] = int((nearest[0] > 1.5).sum())
    saturated = np.flatnonzero(np.asarray(truth["kind"]) == "saturated")
    out["saturated_in_catalog"] = int(np.isin(nearest[1][nearest[0] < 1.5], saturated).sum())
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    core = np.zeros(len(x), bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            core |= (
                dq[np.clip(iy + dy, 0, dq.shape[0] - 1), np.clip(ix + dx, 0, dq.shape[1] - 1)]
                & FLAGGED
            ) != 0
    out["flagged_core_in_catalog"] = int(core.sum())
    out["n_detected"] = len(catalog)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stars", type=int, default=2000)
    parser.add_argument("--filter", default="F158")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/roman_tweakreg_detection_bench")
    parser.add_argument("--json-out", default="")
    parser.add_argument(
        "--psf-model", action="store_true", help="fit with an ePSF file of the scene's PSF"
    )
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(*args.worker)
        return 0
    from astropy.table import Table

    folder = Path(args.workdir)
    arrays, truth = _scene(args, folder)
    psf_model = str(_epsf_file(folder, args.filter)) if args.psf_model else ""
    runs = []
    for k in range(args.repeat):
        load = os.getloadavg()[0]
        out = folder / f"catalog_{k}.ecsv"
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", str(arrays), str(out), psf_model],
            capture_output=True,
            text=True,
            check=True,
        )
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        run["load_1min"] = load
        runs.append(run)
        print(json.dumps(run))
    result = {
        "shape": SHAPE,
        "filter": args.filter,
        "stars": args.stars,
        "psf_model": bool(psf_model),
        "median_wall_s": float(np.median([r["wall_s"] for r in runs])),
        "median_cpu_s": float(np.median([r["cpu_s"] for r in runs])),
        "peak_ratio": max(r["peak_ratio"] for r in runs),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        **score(Table.read(folder / "catalog_0.ecsv"), truth, np.load(arrays)["dq"]),
    }
    print(json.dumps(result, indent=1))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"result": result, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

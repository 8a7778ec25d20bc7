"""Accuracy of the step's own detection on WFI images rendered by romanisim, with and
without an ePSF model (``psf_model``).

Needs romanisim (0.14, with galsim; it installs beside romancal 1.1.0) and runs
offline: the PSF is romanisim's galsim PSF (``romanisim.psf.make_psf(...,
psftype="galsim", variable=True)``: ``galsim.roman.getPSF`` at the detector's four
corners, interpolated linearly between them), which needs no CRDS and no
stpsf/webbpsf data.

1. Geometry and truth: ``roman_tweakreg.testing.simulate.make_dataset`` (seeded):
   2 exposures x 2 detectors (WFI01, WFI02) of a field of about 1000 stars a
   detector, each exposure with a known pointing error; the true pixel position of
   every star comes from the true WCS.
2. Pixels: every star is drawn with romanisim's ``add_objects_to_image`` (galsim
   FFT of the point source convolved with the PSF at its position, the pixel
   response included) at its true position (galsim's 1-indexed pixel centres:
   ``x + 1``), counts log-uniform in [2e3, 2e5] electrons, on a sky of 100
   electrons with Poisson and 10 electrons of read noise.
3. ePSF files: for each detector an ``EpsfRefModel`` file made from the same PSF:
   the PSF at 3 x 3 detector positions convolved with the 0.11" pixel and sampled 4
   times per pixel (galsim ``no_pixel``), the stamps' centre on the star's
   position.
4. The step (``TweakRegStep.call``, relative then absolute to the exact star field
   at the exposures' epoch) runs twice on the same images: without ``psf_model``
   and with ``psf_model`` = the folder of ePSF files.  Reported per image: the mean
   offset (mpx) of the detected positions from the true ones (all matched stars,
   and the bright ones, S/N >= 100) and the worst and rms sky error (mas) of the
   corrected WCS over a 9 x 9 grid of the detector.

    /work/venv-rc/bin/python benchmarks/romanisim_accuracy.py --workdir /tmp/risim

The rendering (about 4000 galsim draws) takes a few minutes of one core and is
kept in ``--workdir`` for later runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

DETECTORS = ("WFI01", "WFI02")
FILTER = "F158"
SKY, READ_NOISE = 100.0, 10.0
OVERSAMPLE, HALF = 4, 12
PIXEL_ARCSEC = 0.11


def _dataset(seed: int):
    from roman_tweakreg.testing import simulate

    return simulate.make_dataset(
        2,
        detectors=DETECTORS,
        seed=seed,
        centroid_noise=0.0,
        data_shape=simulate.DETECTOR_SHAPE,
    )


def _psf(detector: str):
    import romanisim.psf

    return romanisim.psf.make_psf(int(detector[3:]), FILTER, psftype="galsim", variable=True)


def _render(model, psf, counts, rng_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """romanisim's add_objects_to_image at the catalog's true positions, then noise."""
    import galsim
    from romanisim.catalog import CatalogObject
    from romanisim.image import add_objects_to_image

    catalog = model.meta["tweakreg_catalog"]
    x, y = np.asarray(catalog["x"]), np.asarray(catalog["y"])
    ny, nx = model.data.shape
    image = galsim.ImageF(nx, ny, wcs=galsim.PixelScale(PIXEL_ARCSEC))
    objects = [CatalogObject(None, galsim.DeltaFunction(), {FILTER: float(c)}) for c in counts]
    add_objects_to_image(
        image, objects, x + 1.0, y + 1.0, psf, 1.0, filter_name=FILTER,
        seed=rng_seed, fastpointsources=False,
    )  # fmt: skip
    expected = image.array.astype(float) + SKY
    rng = np.random.default_rng(rng_seed)
    data = rng.poisson(expected) + rng.normal(0.0, READ_NOISE, expected.shape)
    return data.astype(np.float32), np.sqrt(expected + READ_NOISE**2).astype(np.float32)


def _epsf_file(path: Path, detector: str, psf) -> None:
    """The detector's ePSF on a 3 x 3 grid, as an EpsfRefModel (psf: romanisim's)."""
    import galsim
    from roman_datamodels import datamodels as rdm

    grid = np.array([48.0, 2043.0, 4038.0])  # romanisim's corners are at 49 and 4039 (1-indexed)
    gx, gy = (v.ravel() for v in np.meshgrid(grid, grid))
    n = 2 * HALF * OVERSAMPLE + 1
    stamps = []
    for x, y in zip(gx, gy, strict=True):
        profile = galsim.Convolve(psf.at_position(x + 1.0, y + 1.0), galsim.Pixel(PIXEL_ARCSEC))
        stamp = profile.drawImage(nx=n, ny=n, scale=PIXEL_ARCSEC / OVERSAMPLE, method="no_pixel")
        stamps.append(stamp.array * OVERSAMPLE**2)  # samples of one pixel lattice sum to ~1
    model = rdm.EpsfRefModel.create_fake_data(shape=(1, 1, len(stamps), n, n))
    model.psf = np.array(stamps, np.float32)[None, None]
    model.meta.instrument.detector = detector
    model.meta.instrument.optical_element = FILTER
    model.meta["oversample"] = OVERSAMPLE
    model.meta["spectral_type"] = ["G2V"]
    model.meta["defocus"] = [0]
    model.meta.pixel_x, model.meta.pixel_y = [float(v) for v in gx], [float(v) for v in gy]
    model.save(path)


def render(workdir: Path, seed: int) -> None:
    """Steps 2 and 3 (skipped for what exists)."""
    exposures, stars = _dataset(seed)
    rng = np.random.default_rng(seed + 1)
    counts_of = dict(
        zip(
            np.asarray(stars["objID"]),
            10 ** rng.uniform(np.log10(2e3), 5.3, len(stars)),
            strict=True,
        )
    )
    psfs = {}
    (workdir / "epsf").mkdir(parents=True, exist_ok=True)
    for k, model in enumerate(m for e in exposures for m in e.models):
        detector = model.meta.instrument.detector
        target = workdir / f"image_{k}.npz"
        if target.exists():
            continue
        if detector not in psfs:
            psfs[detector] = _psf(detector)
            _epsf_file(workdir / "epsf" / f"epsf_{detector.lower()}.asdf", detector, psfs[detector])
        catalog = model.meta["tweakreg_catalog"]
        counts = np.array([counts_of[i] for i in np.asarray(catalog["objID"])])
        t = time.perf_counter()
        data, err = _render(model, psfs[detector], counts, seed + 10 + k)
        np.savez(target, data=data, err=err, x=catalog["x"], y=catalog["y"], counts=counts)
        print(f"image {k} ({detector}, {len(counts)} stars) rendered in "
              f"{time.perf_counter() - t:.0f} s", flush=True)  # fmt: skip


def _worst_mas(wcs, true_wcs, n: int = 9) -> float:
    from roman_tweakreg.testing import simulate

    g = np.linspace(0, simulate.DETECTOR_SHAPE[0] - 1, n)
    xx, yy = (v.ravel() for v in np.meshgrid(g, g))
    ra1, dec1 = wcs(xx, yy)
    ra0, dec0 = true_wcs(xx, yy)
    dra = (ra1 - ra0) * np.cos(np.deg2rad(dec0))
    return float(3.6e6 * np.max(np.hypot(dra, dec1 - dec0)))


def measure(workdir: Path, seed: int, psf_model: str) -> list[dict]:
    """Step 4 for one configuration: the step on fresh models holding the rendered pixels."""
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from roman_tweakreg import TweakRegStep
    from roman_tweakreg.testing import simulate

    exposures, stars = _dataset(seed)
    ra, dec = simulate.propagate(stars, 2028.0, simulate.l2_observer(2028.0))
    refcat = workdir / "refcat.ecsv"
    Table({"RA": ra, "DEC": dec}).write(refcat, overwrite=True)
    models, truths = [], []
    for k, model in enumerate(m for e in exposures for m in e.models):
        with np.load(workdir / f"image_{k}.npz") as npz:
            model.data[:], model.err[:], model.dq[:] = npz["data"], npz["err"], 0
        model.meta.instrument.optical_element = FILTER
        del model.meta["tweakreg_catalog"]
        models.append(model)
    truths = [w for e in exposures for w in e.true_wcs]
    label = "psf_model" if psf_model else "empirical"
    out_dir = workdir / label
    out_dir.mkdir(exist_ok=True)
    t = time.perf_counter()
    result = TweakRegStep.call(
        models, abs_refcat=str(refcat), catalog_path=str(out_dir), processes=1,
        psf_model=psf_model or None,
    )  # fmt: skip
    seconds = time.perf_counter() - t
    rows = []
    with result:
        for k in range(len(result)):
            model = result.borrow(k)
            with np.load(workdir / f"image_{k}.npz") as npz:
                tx, ty = npz["x"], npz["y"]
            name = Path(model.meta.filename).name.removesuffix(".asdf")
            cat = Table.read(out_dir / f"{name}_cat.ecsv")
            d, i = cKDTree(np.column_stack([tx, ty])).query(np.column_stack([cat["x"], cat["y"]]))
            ok = d < 0.3
            dx = 1000 * (np.asarray(cat["x"])[ok] - tx[i[ok]])
            dy = 1000 * (np.asarray(cat["y"])[ok] - ty[i[ok]])
            bright = np.asarray(cat["snr"])[ok] >= 100
            rows.append(
                {
                    "config": label,
                    "image": name,
                    "detector": str(model.meta.instrument.detector),
                    "status": str(model.meta.cal_step.tweakreg),
                    "matched": int(ok.sum()),
                    "mean_dx_mpx": float(dx.mean()),
                    "mean_dy_mpx": float(dy.mean()),
                    "sem_mpx": float(np.hypot(dx.std(), dy.std()) / np.sqrt(2 * ok.sum())),
                    "bright": int(bright.sum()),
                    "bright_dx_mpx": float(dx[bright].mean()),
                    "bright_dy_mpx": float(dy[bright].mean()),
                    "worst_mas": _worst_mas(model.meta.wcs, truths[k]),
                    "rms_mas": simulate.wcs_difference_mas(model.meta.wcs, truths[k]),
                    "step_seconds": seconds,
                }
            )
            result.shelve(model, k, modify=False)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="/tmp/roman_tweakreg_romanisim")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--json-out", default="")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    render(workdir, args.seed)
    rows = measure(workdir, args.seed, "") + measure(
        workdir, args.seed, str(workdir / "epsf")
    )
    for row in rows:
        print(json.dumps(row))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

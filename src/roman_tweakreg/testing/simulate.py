"""Realistic synthetic Roman WFI exposures for tests, examples and benchmarks.

The focal plane (18 detectors, reference points, orientation and the
detector -> ideal distortion polynomial to 2nd order) comes from the published
Roman SIAF (``data/wfi_siaf.csv``, see its header for the source and the
convention).  Each detector gets a GWCS whose frames run
``detector -> v2v3 -> world`` exactly as in Roman L2 products, built from
``meta.wcsinfo`` (``v2_ref``, ``v3_ref``, ``roll_ref``, ``ra_ref``, ``dec_ref``).

A simulated exposure has a *true* attitude, used to place stars on the
detectors, and an *assumed* attitude (the true one plus an injected pointing
error), used for the WCS stored in the model.  Aligning the catalogs must
recover the true WCS.  Stars are placed where Roman sees them: carried to the
exposure epoch by astropy (``SkyCoord.apply_space_motion``) and looked at from
Roman's barycentric position, the Sun-Earth L2 point (the Earth's position from
astropy's built-in ephemeris plus 0.01 AU away from the Sun), which each model
records in ``meta.ephemeris`` as an L2 product does.  :func:`gaia_like_catalog`
makes the catalog a survey would give of them (errors growing with magnitude).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import erfa
import numpy as np
from astropy import coordinates as coord
from astropy import units as u
from astropy.modeling import fitting
from astropy.modeling import models as am
from astropy.table import Table
from astropy.time import Time
from gwcs import WCS, geometry
from gwcs import coordinate_frames as cf

from .._consistency import load_siaf

if TYPE_CHECKING:
    from collections.abc import Sequence

    from roman_datamodels.datamodels import ImageModel

__all__ = [
    "BORESIGHT_V2V3",
    "DETECTORS",
    "DETECTOR_SHAPE",
    "Attitude",
    "SimulatedExposure",
    "detector_wcs",
    "gaia_like_catalog",
    "l2_observer",
    "load_siaf",
    "make_dataset",
    "make_exposure",
    "make_star_field",
    "wcs_difference_mas",
    "write_dataset",
]

DETECTOR_SHAPE = (4088, 4088)
DETECTORS = tuple(f"WFI{i:02d}" for i in range(1, 19))
#: V2, V3 (arcsec) of the WFI boresight (WFI_CEN aperture).
BORESIGHT_V2V3 = (1546.3846181708, -892.7916365721)
_BBOX = ((-0.5, DETECTOR_SHAPE[1] - 0.5), (-0.5, DETECTOR_SHAPE[0] - 0.5))


@lru_cache(maxsize=len(DETECTORS))
def _detector_distortion(detector: str):
    """:func:`_distortion` of ``detector``, fitted once (callers take a copy)."""
    return _distortion(load_siaf()[detector])


def _distortion(siaf: dict[str, float]):
    """Detector (0-indexed pixels) -> v2v3 (arcsec) model, with a fitted inverse."""
    shift = am.Shift(1.0 - siaf["XSciRef"]) & am.Shift(1.0 - siaf["YSciRef"])
    coeffs_x, coeffs_y = {}, {}
    for i in range(3):
        for j in range(i + 1):
            coeffs_x[f"c{i - j}_{j}"] = siaf[f"Sci2IdlX_{i}{j}"]
            coeffs_y[f"c{i - j}_{j}"] = siaf[f"Sci2IdlY_{i}{j}"]
    poly = am.Mapping((0, 1, 0, 1)) | (
        am.Polynomial2D(2, **coeffs_x) & am.Polynomial2D(2, **coeffs_y)
    )
    a = np.deg2rad(siaf["V3IdlYAngle_deg"])
    par = siaf["VIdlParity"]
    idl2v = am.AffineTransformation2D(
        matrix=[[par * np.cos(a), np.sin(a)], [-par * np.sin(a), np.cos(a)]],
        translation=[siaf["V2Ref_arcsec"], siaf["V3Ref_arcsec"]],
    )
    forward = shift | poly | idl2v
    # The inverse of a 2nd-order polynomial is not a polynomial: fit a 4th-order
    # one on a grid (residual < 1e-4 pixel over the detector).
    yy, xx = np.mgrid[-10 : DETECTOR_SHAPE[0] + 10 : 64j, -10 : DETECTOR_SHAPE[1] + 10 : 64j]
    v2, v3 = forward(xx.ravel(), yy.ravel())
    # fit in centred, scaled coordinates (hundreds of arcsec) to keep it well conditioned
    norm = (am.Shift(-siaf["V2Ref_arcsec"]) | am.Scale(0.01)) & (
        am.Shift(-siaf["V3Ref_arcsec"]) | am.Scale(0.01)
    )
    u_, v_ = norm(v2, v3)
    fitter = fitting.LinearLSQFitter()
    inv_x = fitter(am.Polynomial2D(4), u_, v_, xx.ravel())
    inv_y = fitter(am.Polynomial2D(4), u_, v_, yy.ravel())
    forward.inverse = norm | am.Mapping((0, 1, 0, 1)) | (inv_x & inv_y)
    return forward


def _v2v3_to_sky(v2_ref: float, v3_ref: float, roll_ref: float, ra_ref: float, dec_ref: float):
    """The standard v2v3 (arcsec) -> ICRS (deg) rotation used by Roman and JWST."""
    rot = am.RotationSequence3D(
        [v2_ref / 3600.0, -v3_ref / 3600.0, roll_ref, dec_ref, -ra_ref], axes_order="zyxyz"
    )
    model = (
        (am.Scale(1 / 3600.0) & am.Scale(1 / 3600.0))
        | geometry.SphericalToCartesian(wrap_lon_at=180)
        | rot
        | geometry.CartesianToSpherical(wrap_lon_at=360)
    )
    model.name = "v23tosky"
    return model


@dataclass(frozen=True)
class Attitude:
    """Telescope attitude: where the WFI boresight points and the V3 position angle.

    Attributes
    ----------
    ra, dec : float
        ICRS coordinates (deg) of the boresight ``BORESIGHT_V2V3``.
    pa_v3 : float
        Roll (deg) of the v2v3 frame about the boresight.
    """

    ra: float
    dec: float
    pa_v3: float

    def model(self):
        """Return the v2v3 (arcsec) -> sky (deg) model of this attitude."""
        return _v2v3_to_sky(*BORESIGHT_V2V3, self.pa_v3, self.ra, self.dec)

    def perturbed(self, dx: float, dy: float, droll: float) -> Attitude:
        """Return this attitude with a pointing error.

        Parameters
        ----------
        dx, dy : float
            Offsets (arcsec) of the boresight along RA (times cos dec) and Dec.
        droll : float
            Roll error (deg).
        """
        c = coord.SkyCoord(self.ra * u.deg, self.dec * u.deg)
        sep = np.hypot(dx, dy) * u.arcsec
        pa = np.arctan2(dx, dy) * u.rad
        moved = c.directional_offset_by(pa, sep)
        return Attitude(float(moved.ra.deg), float(moved.dec.deg), self.pa_v3 + droll)

    def mispointed(self, dx: float, dy: float, droll: float) -> Attitude:
        """Return this attitude with a pointing error, as the telescope would have it.

        The whole frame is turned rigidly: about the axis that moves the boresight by
        ``hypot(dx, dy)`` arcsec (towards position angle ``atan2(dx, dy)``), then by
        ``droll`` about the boresight.  Unlike :meth:`perturbed`, which keeps the
        position angle to the local north, every detector then moves by the intended
        amount at any declination (near a pole, the north turns quickly with the
        boresight: keeping the angle to it added a roll of ``dx / cos(dec)`` arcsec
        times ``sin(dec)``, 4 to 13 arcsec of error at the detectors' edges at
        Dec 89.9).

        Parameters
        ----------
        dx, dy : float
            Offsets (arcsec) of the boresight towards the local east and north.
        droll : float
            Roll error (deg) about the boresight.
        """
        model = self.model()
        v2, v3 = BORESIGHT_V2V3
        ra0, dec0 = model(v2, v3)
        ra1, dec1 = model(v2, v3 + 60.0)  # a point up +V3, carried along rigidly
        c0 = coord.SkyCoord(ra0 * u.deg, dec0 * u.deg)
        moved = c0.directional_offset_by(np.arctan2(dx, dy) * u.rad, np.hypot(dx, dy) * u.arcsec)
        p0, p1, q0 = (
            coord.SkyCoord(a * u.deg, d * u.deg).cartesian.xyz.value
            for a, d in ((ra0, dec0), (ra1, dec1), (moved.ra.deg, moved.dec.deg))
        )
        axis = np.cross(p0, q0)
        norm = np.linalg.norm(axis)
        if norm > 0:  # Rodrigues: the rotation taking p0 to q0 applied to p1
            k, angle = axis / norm, np.arctan2(norm, np.dot(p0, q0))
            p1 = (
                p1 * np.cos(angle)
                + np.cross(k, p1) * np.sin(angle)
                + k * np.dot(k, p1) * (1 - np.cos(angle))
            )
        q1 = coord.SkyCoord(*p1, representation_type="cartesian").spherical
        pa = moved.position_angle(coord.SkyCoord(q1.lon, q1.lat)).deg
        pa0 = c0.position_angle(coord.SkyCoord(ra1 * u.deg, dec1 * u.deg)).deg
        # pa_v3 and the position angle of +V3 at the boresight differ by a constant
        return Attitude(float(moved.ra.deg), float(moved.dec.deg), self.pa_v3 + pa - pa0 + droll)

    def wcsinfo(self, detector: str) -> dict[str, float]:
        """Return the ``meta.wcsinfo`` values of ``detector`` under this attitude."""
        siaf = load_siaf()[detector]
        v2r, v3r = siaf["V2Ref_arcsec"], siaf["V3Ref_arcsec"]
        sky = self.model()
        ra_ref, dec_ref = sky(v2r, v3r)
        # roll_ref is the position angle of +V3 at the reference point.
        ra1, dec1 = sky(v2r, v3r + 10.0)
        c0 = coord.SkyCoord(ra_ref * u.deg, dec_ref * u.deg)
        roll_ref = float(c0.position_angle(coord.SkyCoord(ra1 * u.deg, dec1 * u.deg)).deg)
        return {
            "v2_ref": v2r,
            "v3_ref": v3r,
            "roll_ref": roll_ref,
            "ra_ref": float(ra_ref),
            "dec_ref": float(dec_ref),
            "vparity": int(siaf["VIdlParity"]),
            "v3yangle": siaf["V3IdlYAngle_deg"],
        }


def detector_wcs(detector: str, wcsinfo: dict[str, float]) -> WCS:
    """Build the GWCS of a WFI detector from its ``wcsinfo``.

    Parameters
    ----------
    detector : str
        ``WFI01`` .. ``WFI18``.
    wcsinfo : dict
        ``v2_ref``, ``v3_ref`` (arcsec), ``roll_ref``, ``ra_ref``, ``dec_ref`` (deg).

    Returns
    -------
    gwcs.WCS
        Frames ``detector -> v2v3 -> world`` with a 4088 x 4088 bounding box.
    """
    det = cf.Frame2D(name="detector", axes_order=(0, 1), unit=(u.pix, u.pix))
    v2v3 = cf.Frame2D(
        name="v2v3", axes_order=(0, 1), axes_names=("v2", "v3"), unit=(u.arcsec, u.arcsec)
    )
    world = cf.CelestialFrame(reference_frame=coord.ICRS(), name="world")
    distortion = _detector_distortion(detector).copy()
    sky = _v2v3_to_sky(
        wcsinfo["v2_ref"],
        wcsinfo["v3_ref"],
        wcsinfo["roll_ref"],
        wcsinfo["ra_ref"],
        wcsinfo["dec_ref"],
    )
    wcs = WCS([(det, distortion), (v2v3, sky), (world, None)])
    wcs.bounding_box = _BBOX
    wcs.pixel_shape = DETECTOR_SHAPE[::-1]
    return wcs


def make_star_field(
    ra: float,
    dec: float,
    radius: float,
    density: float,
    rng: np.random.Generator,
    epoch: float = 2016.0,
) -> Table:
    """Make a Gaia-like star field uniformly spread over a cone.

    Parameters
    ----------
    ra, dec : float
        Centre (deg).
    radius : float
        Cone radius (deg).
    density : float
        Stars per square degree.
    rng : numpy.random.Generator
        Random generator (seed it for reproducible fields).
    epoch : float
        Epoch (decimal year) of the positions.

    Returns
    -------
    astropy.table.Table
        Columns ``ra``, ``dec`` (deg), ``pmra``, ``pmdec`` (mas/yr),
        ``parallax`` (mas), ``mag``, ``objID``, ``epoch``.
    """
    area = 2 * np.pi * (1 - np.cos(np.deg2rad(radius))) * (180 / np.pi) ** 2
    n = rng.poisson(density * area)
    # uniform on the spherical cap around (ra, dec)
    cos_r = rng.uniform(np.cos(np.deg2rad(radius)), 1.0, n)
    pa = rng.uniform(0, 360.0, n)
    centre = coord.SkyCoord(ra * u.deg, dec * u.deg)
    pos = centre.directional_offset_by(pa * u.deg, np.arccos(cos_r) * u.rad)
    # Gaia-like motions: a few mas/yr with a tail; parallaxes ~ 0.1 - 3 mas
    pmra = rng.normal(-2.0, 4.0, n)
    pmdec = rng.normal(-3.0, 4.0, n)
    parallax = rng.gamma(1.5, 0.5, n)
    mag = 16.0 + 5.0 * rng.power(2.5, n)
    return Table(
        {
            "ra": pos.ra.deg,
            "dec": pos.dec.deg,
            "pmra": pmra,
            "pmdec": pmdec,
            "parallax": parallax,
            "mag": mag,
            "objID": np.arange(1, n + 1, dtype=np.int64),
            "epoch": np.full(n, epoch),
        }
    )


def l2_observer(epoch: float) -> np.ndarray:
    """Roman's barycentric position (AU, ICRS axes) at ``epoch``: the Sun-Earth L2 point.

    The Earth's barycentric position from astropy's built-in ephemeris plus 0.01 AU
    along the Sun -> Earth direction.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        time = Time(float(epoch), format="decimalyear", scale="tdb")
        earth = coord.get_body_barycentric("earth", time, ephemeris="builtin").xyz.to_value(u.au)
        sun = coord.get_body_barycentric("sun", time, ephemeris="builtin").xyz.to_value(u.au)
    away = earth - sun
    return earth + 0.01 * away / np.linalg.norm(away)


def _ephemeris(epoch: float, observer: np.ndarray) -> dict:
    """``meta.ephemeris`` of an L2 model exposed at ``epoch`` from ``observer`` (AU)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        mjd = float(Time(float(epoch), format="decimalyear", scale="utc").mjd)
    km = np.asarray(observer, float) * u.au.to(u.km)
    return {
        "ephemeris_reference_frame": "EME2000",
        "type": "DEFINITIVE",
        "time": mjd,
        **{f"spatial_{a}": float(v) for a, v in zip("xyz", km, strict=True)},
        **{f"velocity_{a}": 0.0 for a in "xyz"},
    }


def gaia_like_catalog(stars: Table, rng: np.random.Generator) -> Table:
    """The catalog a Gaia-like survey gives of ``stars``: measured, with its errors.

    Position and proper-motion errors grow with magnitude as Gaia DR3's do with G
    (about 0.02 mas and 0.02 mas/yr at 15, 0.6 mas and 0.7 mas/yr at 20, times 2 per
    mag above):
    ``ra_error = dec_error = 0.02 * 10**(0.3 (mag - 15))`` mas,
    ``pmra_error = pmdec_error = 1.1`` times that in mas/yr; ``ra``, ``dec``,
    ``pmra``, ``pmdec`` are the true values plus Gaussian errors of these sizes
    (the parallax is kept true).  A correlation ``ra_pmra_corr = dec_pmdec_corr =
    -0.2`` is given, and drawn with.

    Returns
    -------
    astropy.table.Table
        ``stars``' columns (measured) and ``ra_error``, ``dec_error``,
        ``pmra_error``, ``pmdec_error`` (mas, mas/yr), ``ra_pmra_corr``,
        ``dec_pmdec_corr``.
    """
    out = stars.copy()
    n = len(stars)
    pos = 0.02 * 10 ** (0.3 * (np.asarray(stars["mag"], float) - 15.0))
    pm = 1.1 * pos
    corr = -0.2
    for axis, pm_axis in (("ra", "pmra"), ("dec", "pmdec")):
        a = rng.standard_normal(n)
        b = corr * a + np.sqrt(1 - corr**2) * rng.standard_normal(n)
        offset = pos * a  # mas
        if axis == "ra":
            cos_dec = np.cos(np.deg2rad(np.asarray(stars["dec"], float)))
            out["ra"] = np.asarray(stars["ra"], float) + offset / 3.6e6 / cos_dec
        else:
            out["dec"] = np.asarray(stars["dec"], float) + offset / 3.6e6
        out[pm_axis] = np.asarray(stars[pm_axis], float) + pm * b
        out[f"{axis}_error"] = pos
        out[f"{pm_axis}_error"] = pm
        out[f"{axis}_{pm_axis}_corr"] = np.full(n, corr)
    return out


def propagate(
    stars: Table, epoch: float, observer: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Carry ``stars`` positions to ``epoch`` with astropy (the simulation's truth).

    Parameters
    ----------
    stars : astropy.table.Table
        ``ra``, ``dec``, ``pmra``, ``pmdec``, ``parallax``, ``epoch``.
    epoch : float
        Decimal year.
    observer : numpy.ndarray or None
        Barycentric position (AU) the stars are seen from: each star's direction is
        that of its barycentric position at ``epoch`` (distance ``1 / parallax``)
        minus ``observer``; None: the barycentre.

    Returns
    -------
    ra, dec : numpy.ndarray
        Positions (deg) at ``epoch``.
    """
    if "pmra" not in stars.colnames:
        return np.asarray(stars["ra"]), np.asarray(stars["dec"])
    # stars without measured motions (NaN) stay where they are
    pmra = np.nan_to_num(np.asarray(stars["pmra"], float))
    pmdec = np.nan_to_num(np.asarray(stars["pmdec"], float))
    plx = np.asarray(stars["parallax"], float)
    plx = np.where(np.isfinite(plx) & (plx > 0), plx, 1e-3)
    c = coord.SkyCoord(
        ra=stars["ra"] * u.deg,
        dec=stars["dec"] * u.deg,
        pm_ra_cosdec=pmra * u.mas / u.yr,
        pm_dec=pmdec * u.mas / u.yr,
        distance=coord.Distance(parallax=plx * u.mas),
        obstime=Time(float(stars["epoch"][0]), format="decimalyear"),
    )
    with warnings.catch_warnings():
        # ERFA flags far-future UTC dates and tiny parallaxes; neither matters here.
        warnings.simplefilter("ignore", erfa.ErfaWarning)
        moved = c.apply_space_motion(new_obstime=Time(epoch, format="decimalyear"))
    if observer is None:
        return moved.ra.deg, moved.dec.deg
    seen = moved.cartesian.xyz.to_value(u.au).T - np.asarray(observer, float)
    sky = coord.CartesianRepresentation(seen.T * u.au).represent_as(
        coord.UnitSphericalRepresentation
    )
    return sky.lon.deg, sky.lat.deg


@dataclass
class SimulatedExposure:
    """One simulated exposure: its models and the truth to compare against.

    Attributes
    ----------
    models : list of ImageModel
        One L2 model per detector, WCS from the *assumed* attitude.
    true_wcs : list of gwcs.WCS
        The WCS of each detector under the *true* attitude.
    true_attitude, assumed_attitude : Attitude
    epoch : float
        Decimal year of the exposure.
    """

    models: list
    true_wcs: list
    true_attitude: Attitude
    assumed_attitude: Attitude
    epoch: float
    catalogs: list = field(default_factory=list)


def _new_image_model(shape: tuple[int, int]) -> ImageModel:
    from roman_datamodels import datamodels as rdm

    from ._nodes import l2_cal_step

    model = rdm.ImageModel.create_fake_data(shape=shape)
    model.meta.cal_step = l2_cal_step(
        dark_decay="COMPLETE", wfi18_transient="COMPLETE", tweakreg="INCOMPLETE"
    )
    return model


def make_exposure(
    stars: Table,
    attitude: Attitude,
    *,
    exposure: int = 1,
    epoch: float = 2028.0,
    pointing_error: tuple[float, float, float] = (0.0, 0.0, 0.0),
    detectors: Sequence[str] = DETECTORS,
    centroid_noise: float = 0.02,
    max_sources: int | None = None,
    rng: np.random.Generator,
    data_shape: tuple[int, int] = (8, 8),
    visit_id: str = "0000101001001001001",
) -> SimulatedExposure:
    """Simulate one WFI exposure of ``stars``.

    Parameters
    ----------
    stars : astropy.table.Table
        The sky (``make_star_field``), positions at ``stars['epoch']``.
    attitude : Attitude
        True pointing.
    exposure : int
        Exposure number (``meta.observation.exposure``): all detectors of one
        exposure share it and form one alignment group.
    epoch : float
        Decimal year of the exposure; stars are carried to it with their motions and
        seen from the Sun-Earth L2 point then (:func:`l2_observer`), which
        ``meta.ephemeris`` records.
    pointing_error : (dx, dy, droll)
        Injected error of the assumed attitude: arcsec, arcsec, deg (see
        :meth:`Attitude.mispointed`: the same at any declination).
    detectors : sequence of str
        Which detectors to simulate.
    centroid_noise : float
        Gaussian centroid noise (pixels, per axis) of the catalogs.
    max_sources : int or None
        Keep at most this many (brightest) sources per detector.
    rng : numpy.random.Generator
    data_shape : tuple
        Shape of the (empty) pixel arrays; the WCS always covers 4088 x 4088.
        Pass ``DETECTOR_SHAPE`` for realistic arrays.
    visit_id : str
        Roman visit identifier used in file names and metadata.

    Returns
    -------
    SimulatedExposure
        Models carry their catalogs in memory as ``meta.tweakreg_catalog``.
    """
    assumed = attitude.mispointed(*pointing_error)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", erfa.ErfaWarning)  # far-future UTC is "dubious"
        start_time = Time(Time(epoch, format="decimalyear", scale="utc").isot, scale="utc")
    observer = l2_observer(epoch)
    ra_now, dec_now = propagate(stars, epoch, observer)
    models, true_wcs, catalogs = [], [], []
    for det in detectors:
        twcs = detector_wcs(det, attitude.wcsinfo(det))
        info = assumed.wcsinfo(det)
        wcs = detector_wcs(det, info)
        # quick cull: stars within ~0.17 deg of the detector centre
        sep = coord.angular_separation(
            np.deg2rad(ra_now),
            np.deg2rad(dec_now),
            np.deg2rad(info["ra_ref"]),
            np.deg2rad(info["dec_ref"]),
        )
        near = np.flatnonzero(sep < np.deg2rad(0.17))
        x, y = twcs.invert(ra_now[near], dec_now[near], with_bounding_box=False)
        inside = (
            (x > -0.5) & (x < DETECTOR_SHAPE[1] - 0.5) & (y > -0.5) & (y < DETECTOR_SHAPE[0] - 0.5)
        )
        idx = near[inside]
        x, y = x[inside], y[inside]
        order = np.argsort(np.asarray(stars["mag"])[idx], kind="stable")
        if max_sources is not None:
            order = order[:max_sources]
        idx, x, y = idx[order], x[order], y[order]
        x = x + rng.normal(0.0, centroid_noise, x.size)
        y = y + rng.normal(0.0, centroid_noise, y.size)
        cat = Table(
            {
                "x": x,
                "y": y,
                "flux": 10 ** (-0.4 * (np.asarray(stars["mag"])[idx] - 25.0)),
                "objID": np.asarray(stars["objID"])[idx],
            }
        )
        model = _new_image_model(data_shape)
        model.meta.filename = f"r{visit_id}_{exposure:04d}_{det.lower()}_cal.asdf"
        model.meta.instrument.detector = det
        model.meta.exposure.type = "WFI_IMAGE"
        model.meta.exposure.start_time = start_time
        model.meta.ephemeris = _ephemeris(epoch, observer)
        model.meta.observation.exposure = exposure
        model.meta.observation.visit_id = visit_id
        model.meta.observation.observation_id = visit_id[:13]
        for key, value in info.items():
            model.meta.wcsinfo[key] = value
        model.meta.wcsinfo.aperture_name = f"{det}_FULL"
        model.meta.wcs = wcs
        model.meta["tweakreg_catalog"] = cat
        models.append(model)
        true_wcs.append(twcs)
        catalogs.append(cat)
    return SimulatedExposure(models, true_wcs, attitude, assumed, epoch, catalogs)


def make_dataset(
    n_exposures: int = 2,
    *,
    detectors: Sequence[str] = DETECTORS,
    seed: int = 1,
    ra: float = 270.0,
    dec: float = -30.0,
    pa_v3: float = 60.0,
    density: float = 64000.0,
    dither: float = 30.0,
    max_shift: float = 1.0,
    max_roll: float = 0.05,
    epoch: float = 2028.0,
    centroid_noise: float = 0.02,
    max_sources: int | None = None,
    data_shape: tuple[int, int] = (8, 8),
) -> tuple[list[SimulatedExposure], Table]:
    """Simulate dithered exposures of one field and its Gaia-like catalog.

    Parameters
    ----------
    n_exposures : int
        Number of exposures; each is dithered by ``dither`` arcsec from the last.
    detectors : sequence of str
        Detectors per exposure.
    seed : int
        Seed of everything random.
    ra, dec, pa_v3 : float
        Boresight and roll (deg) of the first exposure.
    density : float
        Stars per square degree (64000 gives ~1000 stars per detector).
    dither : float
        Dither step (arcsec) along +RA and +Dec.
    max_shift, max_roll : float
        Injected pointing errors are drawn uniformly up to these (arcsec, deg).
    epoch : float
        Decimal year of the exposures.
    centroid_noise : float
        Centroid noise (pixels).
    max_sources : int or None
        Keep at most this many sources per detector catalog.
    data_shape : tuple
        Shape of the pixel arrays.

    Returns
    -------
    exposures : list of SimulatedExposure
    refcat : astropy.table.Table
        The star field at epoch 2016.0 with motions (a Gaia stand-in).
    """
    rng = np.random.default_rng(seed)
    stars = make_star_field(ra, dec, 0.55, density, rng)
    exposures = []
    for k in range(n_exposures):
        att = Attitude(ra, dec, pa_v3).perturbed(k * dither, k * dither, 0.0)
        err = (
            rng.uniform(-max_shift, max_shift) / np.sqrt(2),
            rng.uniform(-max_shift, max_shift) / np.sqrt(2),
            rng.uniform(-max_roll, max_roll),
        )
        exposures.append(
            make_exposure(
                stars,
                att,
                exposure=k + 1,
                epoch=epoch,
                pointing_error=err,
                detectors=detectors,
                centroid_noise=centroid_noise,
                max_sources=max_sources,
                rng=rng,
                data_shape=data_shape,
            )
        )
    return exposures, stars


def wcs_difference_mas(wcs, true_wcs, n: int = 9) -> float:
    """RMS sky distance (mas) between two WCS over an ``n x n`` pixel grid.

    Parameters
    ----------
    wcs, true_wcs : gwcs.WCS
        WCS to compare, evaluated on the same detector pixels.
    n : int
        Grid size per axis over the full detector.

    Returns
    -------
    float
        Root-mean-square angular distance in milliarcseconds.
    """
    g = np.linspace(0, DETECTOR_SHAPE[0] - 1, n)
    xx, yy = np.meshgrid(g, g)
    ra1, dec1 = wcs(xx.ravel(), yy.ravel(), with_bounding_box=False)
    ra2, dec2 = true_wcs(xx.ravel(), yy.ravel(), with_bounding_box=False)
    sep = coord.angular_separation(*np.deg2rad(np.array([ra1, dec1, ra2, dec2])))
    return float(np.sqrt(np.mean(np.rad2deg(sep) ** 2)) * 3.6e6)


def write_dataset(
    exposures: Sequence[SimulatedExposure],
    refcat: Table,
    directory: str | Path,
    *,
    catalog_format: str = "ascii.ecsv",
    asn_name: str = "asn.json",
) -> Path:
    """Write simulated exposures as L2 ASDF files with catalog files and an association.

    Each model's catalog is written next to it as ``<root>_cat.ecsv`` and named
    in ``meta.source_catalog.tweakreg_catalog_name`` (the romancal 1.x layout);
    the reference catalog is written as ``gaia.ecsv``.

    Returns
    -------
    pathlib.Path
        Path of the association file.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    members = []
    for exp in exposures:
        for model in exp.models:
            root = model.meta.filename.removesuffix("_cal.asdf")
            cat_name = f"{root}_cat.ecsv"
            model.meta["tweakreg_catalog"].write(
                directory / cat_name, format=catalog_format, overwrite=True
            )
            out = model.copy()
            del out.meta["tweakreg_catalog"]
            out.meta["source_catalog"] = {"tweakreg_catalog_name": cat_name}
            out.save(directory / model.meta.filename)
            members.append({"expname": model.meta.filename, "exptype": "science"})
    refcat.write(directory / "gaia.ecsv", format="ascii.ecsv", overwrite=True)
    asn = {
        "asn_type": "image",
        "asn_rule": "candidate_Asn_Lv2Image",
        "asn_pool": "simulated",
        "products": [{"name": "simulated", "members": members}],
    }
    path = directory / asn_name
    path.write_text(json.dumps(asn, indent=2))
    return path

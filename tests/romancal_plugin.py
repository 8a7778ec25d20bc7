"""pytest plugin: romancal 1.1.0's own tweakreg tests, run against roman_tweakreg's step.

Loaded by ``test_romancal.py`` in a child pytest (``-p romancal_plugin``) that collects
the test module installed with romancal (``romancal/tweakreg/tests/test_tweakreg.py``),
unchanged.  The plugin only

* replaces the name ``TweakRegStep`` in that module by :class:`roman_tweakreg.TweakRegStep`;
* serves "Gaia" from the local stand-in service (``gaia_server.py``) over a synthetic
  field around romancal's test pointing (RA 270, Dec 66), to romancal's fixtures (through
  stcal's catalog client, its S3 catalog read from the service instead) and to our step.
"""

from __future__ import annotations

import os

import numpy as np
from astropy.table import Table

import gaia_server
from roman_tweakreg import TweakRegStep

#: romancal's test pointing (deg).
CENTRE = (270.0, 66.0)


#: The stand-in sky's seed: ``ROMANCAL_SKY_SEED`` in the environment, else 1066 (the
#: two-ring field of :func:`romancal_field`); any other seed draws a uniform field
#: (:func:`uniform_field`).
SKY_SEED = int(os.environ.get("ROMANCAL_SKY_SEED", "1066"))


def _table(ra, dec, rng) -> Table:
    n = len(ra)
    return Table(
        {
            "ra": ra,
            "dec": dec,
            "pmra": rng.normal(0, 3, n),
            "pmdec": rng.normal(0, 3, n),
            "parallax": np.abs(rng.normal(0.5, 0.2, n)),
            "mag": rng.uniform(14, 20, n),
            "objID": np.arange(1, n + 1),
            "epoch": np.full(n, 2016.0),
        }
    )


def _around_centre(radius_arcsec, rng):
    radius = np.asarray(radius_arcsec) / 3600
    angle = rng.uniform(0, 2 * np.pi, radius.size)
    dec = CENTRE[1] + radius * np.sin(angle)
    ra = CENTRE[0] + radius * np.cos(angle) / np.cos(np.deg2rad(dec))
    return ra, dec


def romancal_field(seed: int = 1066) -> Table:
    """32 stars within 95 arcsec of :data:`CENTRE` and 48 from 110 to 300 arcsec, epoch 2016.

    romancal's fixture images take the inner stars as their catalog; a quarter of them
    fall on an image whose WCS is not shifted (fewer than romancal's 10 or our 15
    matches), all of them on a shifted one.
    """
    rng = np.random.default_rng(seed)
    radius = np.concatenate([95 * np.sqrt(rng.random(32)), rng.uniform(110, 300, 48)])
    return _table(*_around_centre(radius, rng), rng)


def uniform_field(seed: int) -> Table:
    """Stars spread uniformly within 400 arcsec of :data:`CENTRE`, epoch 2016, at Gaia
    DR3's density near romancal's test pointing: 19 in romancal's 100 arcsec cone (its
    images' catalogs; fixed, so that every sky allows the default ``minobj``) and 285
    from 100 to 400 arcsec."""
    rng = np.random.default_rng(seed)
    radius = np.concatenate(
        [100 * np.sqrt(rng.random(19)), np.sqrt(rng.uniform(100**2, 400**2, 285))]
    )
    return _table(*_around_centre(radius, rng), rng)


def sky(seed: int = SKY_SEED) -> Table:
    """The stand-in sky of ``seed`` (see :data:`SKY_SEED`)."""
    return romancal_field() if seed == 1066 else uniform_field(seed)


_running = []


def pytest_configure(config):
    import stcal.tweakreg.astrometric_utils as stcal_catalogs

    service = gaia_server.running_service()
    svc = service.__enter__()
    _running.append(service)
    svc.field = sky()
    svc.catalogs.add("GAIADR3_S3")
    # romancal's gaia_coords fixture: stcal's client, S3 catalog asked from the service
    stcal_catalogs.SERVICELOCATION = svc.url
    stcal_catalogs.S3_CATALOGS = []
    os.environ["ASTROMETRIC_CATALOG_URL"] = svc.url  # our step's service
    os.environ["AWS_ENDPOINT_URL"] = "http://127.0.0.1:9"  # our GAIADR3_S3: never AWS itself


def pytest_unconfigure(config):
    while _running:
        _running.pop().__exit__(None, None, None)


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        module = getattr(item, "module", None)
        if module is not None and hasattr(module, "TweakRegStep"):
            module.TweakRegStep = TweakRegStep

"""Shared fixtures: seeded synthetic WFI data from roman_tweakreg.testing.simulate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from roman_tweakreg.testing import simulate

pytest_plugins = ["gaia_server", "s3_server"]

SMALL = ("WFI01", "WFI02", "WFI10")


def make_data(n_exposures=2, detectors=SMALL, seed=3, **kwargs):
    """Exposures and the 2016 star field (a Gaia stand-in)."""
    return simulate.make_dataset(n_exposures, detectors=detectors, seed=seed, **kwargs)


def refcat_at(stars: Table, epoch: float) -> Table:
    """The star field carried to ``epoch`` and seen from L2 (RA/DEC only): a reference
    without motions."""
    ra, dec = simulate.propagate(stars, epoch, simulate.l2_observer(epoch))
    return Table({"RA": ra, "DEC": dec})


def child_pids(pid: int) -> list[int]:
    """The pids of the processes whose parent is ``pid`` (Linux: from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def models_of(exposures):
    return [m for e in exposures for m in e.models]


def truths_of(exposures):
    return [w for e in exposures for w in e.true_wcs]


@pytest.fixture(scope="module")
def two_exposures():
    return make_data()


@pytest.fixture
def rng():
    return np.random.default_rng(42)


@pytest.fixture(autouse=True)
def _no_real_catalog_service(monkeypatch, tmp_path_factory):
    """No test may reach the real catalog service or S3: point them at a closed local port.

    The on-disk catalog cache goes to a per-session temporary folder.
    """
    monkeypatch.setenv("ASTROMETRIC_CATALOG_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("ROMAN_TWEAKREG_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(autouse=True)
def _close_the_models_opened_from_files(monkeypatch):
    """Close, when a test ends, every model opened from a file during it.

    A library the step returns keeps the models it opened from files open (stpipe's
    libraries do too: the caller owns them); tests that drop such a library would leave
    the files to the garbage collector, whose order of finalisation (Python 3.13) closes
    the file before the model and warns in whichever later test it happens to run.
    The models are those roman_datamodels' public ``open`` returned.
    """
    from roman_datamodels import datamodels as rdm

    opened = []
    real = rdm.open

    def tracked(init, *args, **kwargs):
        model = real(init, *args, **kwargs)
        if not isinstance(init, rdm.DataModel):
            opened.append(model)
        return model

    monkeypatch.setattr(rdm, "open", tracked)
    yield
    for model in opened:
        model.close()
    opened.clear()

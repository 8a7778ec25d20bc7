"""The reference catalog value: a table of stars and how to place them at an epoch."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from astropy.table import Table

from .._io import write_atomically
from ._motion import ERROR_COLUMNS, place, sigma_at

__all__ = ["COLUMNS", "DEFAULT_REFCAT", "ReferenceCatalog", "standard_table"]

log = logging.getLogger(__name__)

DEFAULT_REFCAT = "GAIADR3"

#: The columns a ReferenceCatalog table may have, in this order; only RA and DEC are required.
#: ``err_epoch`` is the epoch of the errors where it differs from ``ref_epoch`` (a service
#: answer carried to an asked epoch keeps the errors of the catalog's own epoch).
COLUMNS = ("RA", "DEC", "pmra", "pmdec", "parallax", "ref_epoch", "mag", "objID",
           *ERROR_COLUMNS, "err_epoch")  # fmt: skip


@dataclass
class ReferenceCatalog:
    """A reference catalog and how to place its stars at an epoch.

    Attributes
    ----------
    table : Table
        ``RA``, ``DEC`` (deg) and optionally ``pmra``, ``pmdec`` (mas/yr,
        ``pmra`` includes ``cos(Dec)``), ``parallax`` (mas), ``ref_epoch``
        (decimal year of each row's position), ``mag``, ``objID``, and Gaia's
        errors and correlations (:data:`~roman_tweakreg.refcat._motion.ERROR_COLUMNS`,
        mas and mas/yr; ``err_epoch`` their epoch when not ``ref_epoch``).
    name : str
        Name recorded in the WCS name and ``wcs_fit_results``: the service
        catalog (``GAIADR3``) or the file or directory name.
    epoch : float or None
        Epoch (decimal year) of the positions of rows without ``ref_epoch``;
        None when unknown.
    source : str
        Where the catalog came from (service query, file path or URL).
    warnings : list of str
        Warnings about the catalog (e.g. positions that cannot be carried to
        an epoch), also logged; the caller may report them.
    """

    table: Table
    name: str
    epoch: float | None = None
    source: str = ""
    warnings: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.table)

    @property
    def has_motions(self) -> bool:
        """Whether the table has proper motions (``pmra`` and ``pmdec`` columns)."""
        return "pmra" in self.table.colnames and "pmdec" in self.table.colnames

    def _row_epochs(self) -> np.ndarray:
        fill = np.nan if self.epoch is None else float(self.epoch)
        if "ref_epoch" not in self.table.colnames:
            return np.full(len(self.table), fill)
        epochs = np.asarray(self.table["ref_epoch"], float)
        return np.where(np.isfinite(epochs), epochs, fill)

    @property
    def has_errors(self) -> bool:
        """Whether the table gives position errors (``ra_error`` and ``dec_error``)."""
        return "ra_error" in self.table.colnames and "dec_error" in self.table.colnames

    def _column(self, name: str) -> np.ndarray | None:
        return np.asarray(self.table[name], float) if name in self.table.colnames else None

    def positions(
        self, epoch: float | None, observer: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(ra, dec)`` in degrees carried to ``epoch`` and seen from ``observer``.

        Rows with proper motions and a known epoch are moved, and rows with a
        parallax are displaced by it as seen from ``observer`` (see
        :func:`roman_tweakreg.refcat._motion.place`, ERFA ``pmpx``); rows without
        motions or without a known epoch are not moved, rows without parallax not
        displaced.  With ``epoch=None`` positions are returned as stored.  A
        catalog without motion columns, or without any epoch, is not moved, with
        a warning (logged once per epoch and kept in :attr:`warnings`) naming the
        epoch gap.

        Parameters
        ----------
        epoch : float or None
            Decimal year, e.g. the epoch of one exposure group.
        observer : numpy.ndarray or None
            Barycentric position of the observer (AU, 3 values, ICRS axes); None:
            the barycentre, as the catalog gives positions (no parallax displacement).
        """
        ra = np.asarray(self.table["RA"], float)
        dec = np.asarray(self.table["DEC"], float)
        if epoch is None or len(self.table) == 0:
            return ra, dec
        row_epochs = self._row_epochs()
        dt = float(epoch) - row_epochs
        if not self.has_motions or not np.isfinite(row_epochs).any():
            self._warn_unmoved(float(epoch), row_epochs)
            dt = np.full_like(row_epochs, np.nan)  # not moved
        parallax = self._column("parallax")
        if observer is None or parallax is None:
            if not self.has_motions:
                return ra, dec
            parallax = None
        return place(
            ra, dec, self._column("pmra"), self._column("pmdec"), parallax, dt, observer
        )

    def sigmas(self, epoch: float | None) -> np.ndarray | None:
        """Isotropic 1-sigma position error (mas) of each star at ``epoch``, or None.

        From the catalog's errors and correlations carried over the gap between
        ``epoch`` and the errors' epoch (``err_epoch``, else ``ref_epoch``, else
        :attr:`epoch`); see :func:`roman_tweakreg.refcat._motion.sigma_at`.  None
        when the catalog gives no position errors; NaN for rows without them.
        """
        if not self.has_errors:
            return None
        errors = {c: self.table[c] for c in ERROR_COLUMNS if c in self.table.colnames}
        base = self._row_epochs()
        if "err_epoch" in self.table.colnames:
            own = np.asarray(self.table["err_epoch"], float)
            base = np.where(np.isfinite(own), own, base)
        gap = np.zeros(len(self.table)) if epoch is None else float(epoch) - base
        return sigma_at(errors, gap, len(self.table))

    def placed(
        self, epoch: float | None, observer: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``(ra, dec, sigma)``: :meth:`positions` and :meth:`sigmas` at once."""
        return (*self.positions(epoch, observer), self.sigmas(epoch))

    def _warn_unmoved(self, epoch: float, row_epochs: np.ndarray) -> None:
        known = row_epochs[np.isfinite(row_epochs)]
        if known.size:
            gap = float(np.max(np.abs(epoch - known)))
            if gap < 1e-3:
                return
            what = f"epoch {float(np.median(known)):.3f}, up to {gap:.2f} yr from {epoch:.3f}"
        else:
            what = f"an unknown epoch, to be used at {epoch:.3f}"
        why = (
            "has proper motions but no epoch (ref_epoch or epoch column or meta)"
            if self.has_motions
            else "has no proper motions (pmra/pmdec)"
        )
        msg = f"reference catalog {self.name} {why}: its positions are used as they are, at {what}"
        if msg not in self.warnings:
            self.warnings.append(msg)
            log.warning("%s", msg)

    def at_epoch(self, epoch: float | None) -> Table:
        """Return a copy of the table with ``RA``/``DEC`` carried to ``epoch``.

        Moved rows get ``ref_epoch = epoch``; the table meta records ``name``,
        ``epoch`` and ``source``.
        """
        out = self.table.copy(copy_data=True)
        if epoch is not None and len(out):
            ra, dec = self.positions(epoch)
            out["RA"], out["DEC"] = ra, dec
            if self.has_motions:
                moved = (
                    np.isfinite(np.asarray(out["pmra"], float))
                    & np.isfinite(np.asarray(out["pmdec"], float))
                    & np.isfinite(self._row_epochs())
                )
                out["ref_epoch"] = np.where(moved, float(epoch), self._row_epochs())
        out.meta.update(
            name=self.name, source=self.source, epoch=self.epoch if epoch is None else float(epoch)
        )
        return out

    def write(self, path: str | os.PathLike, epoch: float | None = None) -> Path:
        """Write the catalog carried to ``epoch`` as ECSV, atomically (temp file + rename).

        Parameters
        ----------
        path : str or path-like
            Output file; its folder is created if needed; an existing file is replaced.
        epoch : float or None
            Epoch (decimal year) to carry positions to; None writes them as stored.

        Returns
        -------
        pathlib.Path
            The path written.
        """
        table = self.at_epoch(epoch)
        return write_atomically(path, lambda p: table.write(p, format="ascii.ecsv"))


def standard_table(columns: dict[str, np.ndarray]) -> Table:
    """Build a catalog table from the :data:`COLUMNS` present in ``columns`` (others dropped)."""
    return Table({name: columns[name] for name in COLUMNS if name in columns})

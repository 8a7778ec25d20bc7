"""What the fork server of the step's worker processes loads once, for all its workers.

The server (see :mod:`roman_tweakreg._parallel`) imports this module before it forks
any worker, so each worker starts with the package imported and asdf's extensions
loaded: asdf loads them (from their entry points) when a process first reads or
writes a file, about 0.3 s of CPU, which each worker would otherwise spend on its
first saving job.  Imported by the fork server only.
"""

from __future__ import annotations

import asdf

from . import catalogs, outputs, plane

__all__: list[str] = []

_ = (catalogs, outputs, plane)
_ = asdf.get_config().extensions  # loaded once, here

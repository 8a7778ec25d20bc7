"""Peak memory of the current process, shared by the benchmark scripts (both Pythons)."""

from __future__ import annotations

import resource
import sys

__all__ = ["peak_rss_mb"]


def peak_rss_mb() -> float:
    """Peak resident set size (MiB) of this process since it was exec'd.

    Linux's ``getrusage(RUSAGE_SELF).ru_maxrss`` is carried over ``fork`` + ``exec``: a
    child started by a process of 220 MB reports at least 220 MB.  ``VmHWM`` of
    ``/proc/self/status`` belongs to the new address space, so it is read when available.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale

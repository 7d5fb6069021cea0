"""Peak CPU memory of one call on Linux: the growth of the process's resident-set high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) over its resident size before the call."""

from __future__ import annotations

from collections.abc import Callable


def status_kib(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_growth_mib(fn: Callable[[], object]) -> tuple[object, float]:
    """``(fn(), peak resident-set growth in MiB during the call)``."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = status_kib("VmRSS")
    result = fn()
    return result, (status_kib("VmHWM") - before) / 1024

"""Host memory of long streaming jobs (the converter): give free heap pages back, measure the peak."""

from __future__ import annotations

import ctypes
import functools
import resource


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS. glibc keeps them, and the fragmentation that one matrix's
    temporaries leave would make each later peak a little higher; trimming keeps the peak at one layer."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def peak_rss_gib() -> float:
    """Peak resident memory of this process. VmHWM, not ru_maxrss: a child started by fork + exec inherits
    its parent's ru_maxrss, so a job launched from a large process would report the parent's peak."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20  # KiB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

"""Host memory housekeeping for long streaming jobs (the converter)."""

from __future__ import annotations

import ctypes
import functools


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

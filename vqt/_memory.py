"""This process's memory as the kernel reports it (Linux ``/proc/self/status``), and handing freed heap
memory back to it (glibc ``malloc_trim``)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from typing import Optional


@functools.lru_cache(maxsize=1)
def _libc() -> Optional[ctypes.CDLL]:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel (glibc ``malloc_trim(0)``), so that RSS counts what is
    in use rather than what the allocator keeps for reuse. False where there is no glibc (nothing done)."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def proc_status_kb(field: str) -> Optional[int]:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``, ...) in kB; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None

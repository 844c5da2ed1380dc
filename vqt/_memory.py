"""This process's memory as the kernel reports it (Linux ``/proc/self/status``)."""

from __future__ import annotations

from typing import Optional


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

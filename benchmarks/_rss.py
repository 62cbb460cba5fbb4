"""Resident-memory readings for the benchmark subprocesses (Linux /proc only)."""

from __future__ import annotations


def status_kib(field: str) -> int:
    """Return a /proc/self/status field in KiB, such as VmRSS or VmHWM."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"/proc/self/status has no field {field!r}.")


def reset_peak() -> int:
    """Reset the peak RSS (VmHWM) to the current RSS and return that RSS in KiB.

    Writing 5 to /proc/self/clear_refs resets VmHWM (Linux).
    """
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    return status_kib("VmRSS")

"""Handing memory back to the system after a spike (glibc only; no-ops elsewhere).

A decode or a batched forward pass allocates tens to hundreds of megabytes in a worker thread.
glibc keeps freed memory in per-thread arenas, so RSS stays at the peak long after the spike
(the issue measured 6.7 GB left over). Two measures, measured in benchmarks/bench_abuse.py:
fewer arenas (M_ARENA_MAX, set before the threads exist) and ``malloc_trim(0)`` once the
service goes idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from pathlib import Path

logger = logging.getLogger("app.memory")

M_ARENA_MAX = -8  # mallopt parameter number (malloc.h)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only: musl and others lack it
        libc.mallopt  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def limit_arenas(count: int) -> bool:
    """mallopt(M_ARENA_MAX, count); True when glibc accepted it (0 = leave the default)."""
    libc = _libc()
    if libc is None or count <= 0:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, count))


def trim() -> bool:
    """Return free heap memory to the system; True when glibc released something."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def rss_bytes() -> int:
    """This process's resident set size (0 where /proc is not available)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0

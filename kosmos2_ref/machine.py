"""What the processor reports about itself: its cache sizes, from which :mod:`kosmos2_ref.fast` sizes its blocks.

Linux lists each cache of CPU 0 under ``/sys/devices/system/cpu/cpu0/cache/index*/`` (level, type, size); glibc's
``os.sysconf`` names give the same numbers elsewhere on Linux; with neither (macOS, Windows, a container that hides
them) the sizes of a common desktop core are assumed, and :attr:`CacheSizes.source` says so.

    >>> from kosmos2_ref import machine
    >>> machine.cache_sizes()          # e.g. on an AMD EPYC VM:
    CacheSizes(l1d=32768, l2=524288, l3=33554432, source='sysfs')
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
import threading
from dataclasses import dataclass
from pathlib import Path

SYSFS_CACHES = Path("/sys/devices/system/cpu/cpu0/cache")
ASSUMED = {"l1d": 32 << 10, "l2": 1 << 20, "l3": 8 << 20}  # when the system says nothing
SYSCONF_NAMES = {"l1d": "SC_LEVEL1_DCACHE_SIZE", "l2": "SC_LEVEL2_CACHE_SIZE", "l3": "SC_LEVEL3_CACHE_SIZE"}


@dataclass(frozen=True)
class CacheSizes:
    """Bytes of one core's L1 data and L2 caches and of the L3 it shares, and where the numbers came from
    ("sysfs", "sysconf", or "assumed" for any size the system did not report)."""

    l1d: int
    l2: int
    l3: int
    source: str


def parse_size(text: str) -> int:
    """A sysfs cache size ("512K", "32768K", "2M", "1048576") -> bytes; 0 for anything else."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    return int(digits) * scale if digits.isdigit() else 0


def _from_sysfs(folder: Path) -> dict:
    found = {}
    for index in sorted(folder.glob("index*")):
        try:
            level = int((index / "level").read_text())
            kind = (index / "type").read_text().strip()
            size = parse_size((index / "size").read_text())
        except (OSError, ValueError):
            continue
        key = {1: "l1d", 2: "l2", 3: "l3"}.get(level)
        if key is None or size <= 0 or (level == 1 and kind == "Instruction"):
            continue
        found[key] = size
    return found


def _from_sysconf() -> dict:
    found = {}
    for key, name in SYSCONF_NAMES.items():
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size > 0:
            found[key] = size
    return found


@functools.lru_cache(maxsize=None)
def cache_sizes(folder: Path = SYSFS_CACHES) -> CacheSizes:
    """The caches of CPU 0 (read once per process; ``folder`` is there for tests)."""
    for source, found in (("sysfs", _from_sysfs(folder)), ("sysconf", _from_sysconf())):
        if "l2" in found:
            sizes = {**ASSUMED, **found}
            missing = set(ASSUMED) - set(found)
            return CacheSizes(**sizes, source=source + (f" ({', '.join(sorted(missing))} assumed)" if missing else ""))
    return CacheSizes(**ASSUMED, source="assumed")


THREAD_LIMIT_ENVS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def compute_threads() -> int:
    """How many threads the process may compute on: the cores it may run on (its CPU affinity), or fewer where
    the user or a scheduler limits threads through OMP_NUM_THREADS, OPENBLAS_NUM_THREADS or MKL_NUM_THREADS (Ray
    sets OMP_NUM_THREADS to a worker's CPUs), the smallest of those that is a positive number."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limits = [int(v) for v in (os.environ.get(name, "").strip() for name in THREAD_LIMIT_ENVS) if v.isdigit()]
    return max(1, min([cores] + [v for v in limits if v > 0]))


# --------------------------------------------------------------------------------------------------------------
# Freed memory: keep it in the process instead of handing it back to the system after every step
#
# A forward pass makes and drops arrays of ~1 MB by the dozen (a [257, 1024] float32 activation is 1 MB). glibc's
# malloc serves them from its heap and, whenever the free memory at the top of the heap grows past its trim
# threshold, gives that memory back to the kernel; the next array of the size then touches fresh pages, one page
# fault per 4 KiB. Its default thresholds move with the sizes it has seen (the "dynamic" rule), and with the
# arrays of this model they move too little: measured on an AMD EPYC VM (glibc 2.36), one full-size image
# encoding took 19-23 thousand page faults (75-92 MB of fresh pages; at 3-4 µs a fault, 0.06-0.1 s of a 1.2-1.3 s
# step, though whole steps timed in turns moved by less than that VM's noise); with both thresholds fixed as
# below, none. Fixing them is a process-wide setting, so the library never does it by itself: the
# command line and the Ray workers (processes of its own) do, and a program calls :func:`keep_freed_memory` if it
# wants the same.

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
KEEP_TRIM_BYTES = 64 << 20  # free memory at the top of the heap kept up to this (glibc: 128 KiB, then dynamic)
KEEP_MMAP_BYTES = 32 << 20  # arrays above this get their own mapping (glibc's dynamic rule stops at 32 MiB)
KEEP_FREED_MEMORY_ENV = "KOSMOS2_REF_KEEP_FREED_MEMORY"  # "0": leave glibc's malloc thresholds as they are
_kept: dict | None = None
_kept_lock = threading.Lock()


def keep_freed_memory(trim_bytes: int = KEEP_TRIM_BYTES, mmap_bytes: int = KEEP_MMAP_BYTES) -> bool:
    """Ask glibc's malloc to keep up to ``trim_bytes`` of freed memory for reuse and to give arrays up to
    ``mmap_bytes`` heap memory (``mallopt(M_TRIM_THRESHOLD)`` and ``mallopt(M_MMAP_THRESHOLD)``), so that the
    arrays a step makes and drops reuse pages already faulted in (see the comment above). Process-wide, for every
    library in it; the process may hold up to ``trim_bytes`` more than it uses. Returns True when applied, False
    where the C library is not glibc (nothing is changed there). Safe to call again and from several threads;
    :func:`freed_memory_kept` says what was applied."""
    for name, value in (("trim_bytes", trim_bytes), ("mmap_bytes", mmap_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 1 << 31:
            raise ValueError(f"keep_freed_memory: {name}={value!r}; expected a positive whole number of bytes")
    global _kept
    with _kept_lock:
        mallopt = _glibc_mallopt()
        if mallopt is None:
            return False
        if not (mallopt(M_MMAP_THRESHOLD, mmap_bytes) and mallopt(M_TRIM_THRESHOLD, trim_bytes)):
            return False
        _kept = {"trim_bytes": trim_bytes, "mmap_bytes": mmap_bytes}
        return True


def keep_freed_memory_unless_told_not_to() -> bool:
    """What a process of kosmos2-ref's own does at its start (the command line, a Ray worker):
    :func:`keep_freed_memory`, unless ``KOSMOS2_REF_KEEP_FREED_MEMORY=0``. Returns whether it was applied; any
    setting other than 0 or 1 is a ValueError that names it."""
    setting = os.environ.get(KEEP_FREED_MEMORY_ENV, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{KEEP_FREED_MEMORY_ENV}={setting!r}: expected 0 (glibc's defaults) or 1 (keep freed memory)")
    return setting != "0" and keep_freed_memory()


def freed_memory_kept() -> dict | None:
    """The thresholds :func:`keep_freed_memory` applied in this process, or None (glibc's defaults)."""
    return None if _kept is None else dict(_kept)


def _glibc_mallopt():
    """glibc's ``mallopt`` (int, int) -> int, or None on another C library."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt

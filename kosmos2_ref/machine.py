"""What the processor reports about itself: its cache sizes, from which :mod:`kosmos2_ref.fast` sizes its blocks.

Linux lists each cache of CPU 0 under ``/sys/devices/system/cpu/cpu0/cache/index*/`` (level, type, size); glibc's
``os.sysconf`` names give the same numbers elsewhere on Linux; with neither (macOS, Windows, a container that hides
them) the sizes of a common desktop core are assumed, and :attr:`CacheSizes.source` says so.

    >>> from kosmos2_ref import machine
    >>> machine.cache_sizes()          # e.g. on an AMD EPYC VM:
    CacheSizes(l1d=32768, l2=524288, l3=33554432, source='sysfs')
"""

from __future__ import annotations

import functools
import os
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

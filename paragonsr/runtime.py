"""Process-level settings that change CPU inference speed several-fold.

PyTorch allocates CPU tensors with the C library's malloc. With glibc's defaults every
activation-sized buffer (megabytes) comes from a fresh ``mmap`` and goes back on ``free``, so each
layer pays for page faults and zeroing by the kernel: measured on tiny x4 at 256x256 with 2
threads, that doubled the time of a whole forward pass. Raising the mmap and trim thresholds keeps
freed memory in the process for reuse. The cost is that the process keeps its peak memory
instead of returning it to the system, which is why this is opt-in: importing the library never
calls it; the benchmarks do when given --keep-freed-memory.

The optimized network already keeps its widest temporaries small (see ``fusion.band_rows``), which
recovers most of the loss without this setting.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def keep_freed_cpu_memory() -> bool:
    """Ask glibc to keep freed blocks up to 1 GiB for reuse. Returns False where that is not
    possible (not Linux/glibc), and changes nothing there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    ok = bool(mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    )
    log.debug("glibc mallopt thresholds %s", "raised" if ok else "unchanged")
    return ok


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            text = handle.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (no limit) reads as None


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Where the kernel tells a process its cgroup and the cgroup its limits (tests point these at
# a fake tree).
PROC_CGROUP = "/proc/self/cgroup"
CGROUP_ROOT = "/sys/fs/cgroup"


def _cgroup_room() -> int | None:
    """Bytes this process's cgroup may still allocate (v2, else v1), counting reclaimable page
    cache as free; None outside a limited cgroup."""
    try:
        with open(PROC_CGROUP) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base = CGROUP_ROOT + path.rstrip("/")
            limit = _read_int(base + "/memory.max")
            usage = _read_int(base + "/memory.current")
            stat_file = base + "/memory.stat"
            break
        if "memory" in controllers.split(","):  # cgroup v1
            base = CGROUP_ROOT + "/memory"
            limit = _read_int(base + "/memory.limit_in_bytes")
            usage = _read_int(base + "/memory.usage_in_bytes")
            stat_file = base + "/memory.stat"
            break
    else:
        return None
    # v1 reports "no limit" as a huge number rather than "max".
    if limit is None or usage is None or limit >= 1 << 60:
        return None
    reclaimable = 0
    try:
        with open(stat_file) as stat:
            for line in stat:
                name, _, value = line.partition(" ")
                if name in ("inactive_file", "total_inactive_file"):
                    reclaimable = int(value)
                    break
    except (OSError, ValueError):
        pass
    return max(0, limit - usage + reclaimable)


def _rlimit_room() -> int | None:
    """Bytes left under ``ulimit -v`` (address space) or ``ulimit -d`` (data), if one is set."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    rooms = []
    for limit_name, field in (("RLIMIT_AS", "VmSize"), ("RLIMIT_DATA", "VmData")):
        kind = getattr(resource, limit_name, None)
        if kind is None:
            continue
        soft, _ = resource.getrlimit(kind)
        used = _proc_status_bytes(field)
        if soft != resource.RLIM_INFINITY and used is not None:
            rooms.append(max(0, soft - used))
    return min(rooms) if rooms else None


def available_cpu_memory() -> int:
    """Bytes this process can still allocate on the host: the system's available memory,
    lowered by a cgroup limit (containers, systemd slices, CI runners) and by ``ulimit -v/-d``,
    whichever leaves least."""
    rooms = [room for room in (_cgroup_room(), _rlimit_room()) if room is not None]
    system = _proc_meminfo_available()
    if system is not None:
        rooms.append(system)
    return min(rooms) if rooms else 4 << 30


def _proc_meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None

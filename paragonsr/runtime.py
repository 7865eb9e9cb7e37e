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

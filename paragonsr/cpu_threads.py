"""Intra-op threads for one CPU inference call: the cores that other work leaves free.

OpenMP splits every operator evenly between torch's threads and waits for the slowest. When a
busy process shares a core with one of them, that thread gets half the core at best, and every
operator waits for it, often for a whole time slice of the other process. The optimized network
runs about a thousand short operators per call, so it suffers most: with one busy-looping
process on one of two cores, tiny x4 and nano x2 at 256x256 took 3-16x longer on two threads
than on one (``bench/bench_inference.py --busy 1``). On the cores left free, it runs at full
speed.

:class:`FreeCoreThreads` therefore looks, between steps of the work (the caller says where), at
how many tasks are runnable on the machine (Linux's ``/proc/loadavg``), takes away the threads
the work runs itself, and runs torch on the cores that remain, never on more threads than the
host set. A call starts with the previous call's decision. The host's setting comes back when
the call ends. Elsewhere than Linux, nothing changes.

The results on fewer threads differ from those on the host's count by float rounding
(GroupNorm's sums are split between the threads): 2e-5 on tiny x4's outputs.
"""

from __future__ import annotations

import logging
import os
import time

import torch

log = logging.getLogger(__name__)

# Where Linux tells the number of runnable tasks (tests point it at a fake file).
LOADAVG = "/proc/loadavg"

# A decision holds this long, so that calls on small tiles (a few milliseconds each) do not
# each pay for a look.
RECHECK_SECONDS = 0.02

_decided: tuple[float, int, int] | None = None  # (when, host's threads, threads to use)


def _runnable_tasks() -> int | None:
    """Runnable tasks on the whole system now, this process's own included."""
    try:
        with open(LOADAVG, "rb") as handle:
            return int(handle.read().split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def others_running(own: int) -> float | None:
    """How many tasks of other work are runnable on this process's cores now, given that this
    process runs ``own`` threads of torch work (the calling thread and its OpenMP threads, which
    keep spinning, runnable, for milliseconds after each operator); None where the system does
    not say. The least of three looks, so that a task that runs for an instant does not count.
    Where the process may use only some of the machine's cores, the other tasks are assumed
    spread evenly over all of them."""
    looks = [_runnable_tasks() for _ in range(3)]
    if None in looks:
        return None
    others = max(0, min(looks) - own)
    online = os.cpu_count() or 1
    usable = cores()
    return others * usable / online if usable < online else float(others)


def threads_for_free_cores(host: int, own: int) -> int:
    """Threads for a call that the host would give ``host`` and that runs ``own`` now: one per
    core that other work leaves free, at least one, at most ``host``."""
    if host <= 1:
        return host
    others = others_running(own)
    if others is None:
        return host
    return max(1, min(host, int(cores() - others + 0.5)))


class FreeCoreThreads:
    """Runs the work inside ``with`` on the cores other work leaves free (module docstring):
    from the previous decision at first, then as :meth:`check`, called between steps of the
    work, finds. ``enabled=False`` changes nothing (other devices than the CPU, tracers, a
    caller who wants the host's setting)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.host = 0

    def __enter__(self) -> FreeCoreThreads:
        if self.enabled:
            self.host = torch.get_num_threads()
            # Not a fresh look: before the work starts, this process's OpenMP threads may be
            # asleep or still spinning after the host's last operator, and either way the count
            # of runnable tasks cannot tell them from other work. Between steps they spin.
            decided = _decided
            if decided is not None and decided[1] == self.host:
                self._use(decided[2])
        return self

    def check(self) -> None:
        """Use the threads the cores free now allow (a decision younger than
        :data:`RECHECK_SECONDS` is reused)."""
        global _decided
        if not self.enabled:
            return
        now = time.monotonic()
        decided = _decided
        if decided is not None and decided[1] == self.host and now - decided[0] < RECHECK_SECONDS:
            threads = decided[2]
        else:
            threads = threads_for_free_cores(self.host, torch.get_num_threads())
            _decided = (now, self.host, threads)
        self._use(threads)

    def _use(self, threads: int) -> None:
        if threads != torch.get_num_threads():
            if threads < self.host:
                log.debug("other work runs on this CPU: %d of %d threads", threads, self.host)
            torch.set_num_threads(threads)

    def __exit__(self, *exc: object) -> None:
        if self.enabled and torch.get_num_threads() != self.host:
            torch.set_num_threads(self.host)

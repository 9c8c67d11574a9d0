"""Which CPUs the probe's background threads (the shipper, gRPC's own) run on.

vLLM's CPU worker binds its OpenMP threads, the worker's main thread among them, to the
cores it computes on. A thread inherits the binding of the thread that starts it, so the
shipper started from the worker would share the forward pass's core. The plugin records the
process's CPUs when vLLM loads it, before the worker binds itself; the shipper thread then
moves to the CPUs the worker left free (on this 2-core machine, the one vLLM keeps for the
engine core process). A process that was never narrowed is left to the OS scheduler.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

_process_cpus: frozenset[int] | None = None


def remember_process_cpus() -> None:
    """Record the CPUs this process may use; call before vLLM binds the worker's threads."""
    global _process_cpus
    if _process_cpus is None and hasattr(os, "sched_getaffinity"):
        _process_cpus = frozenset(os.sched_getaffinity(0))


def spare_cpus() -> frozenset[int] | None:
    """CPUs for background threads, seen from the worker thread after it was bound.

    None: the worker was not narrowed (or the platform cannot tell), nothing to move.
    """
    if _process_cpus is None:
        return None
    worker = frozenset(os.sched_getaffinity(0))
    if worker >= _process_cpus:
        return None
    return (_process_cpus - worker) or _process_cpus


def bind_current_thread(cpus: frozenset[int] | None) -> None:
    """Move the calling thread to ``cpus``; a refusal is logged, never raised."""
    if not cpus:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as e:
        logger.warning("circuitwatch: could not move a background thread to CPUs %s: %s", cpus, e)

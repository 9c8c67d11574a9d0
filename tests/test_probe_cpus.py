"""Background threads leave the worker's cores: real affinity calls, each in its own thread."""

import os
import threading

import pytest

from sidecar.probe.host import cpus

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux thread affinity and at least 2 CPUs",
)


def in_thread(fn):
    """Run ``fn`` in a fresh thread (affinity changes stay there) and return its result."""
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("value", fn()))
    thread.start()
    thread.join(10)
    return result["value"]


def test_an_unbound_worker_leaves_threads_to_the_scheduler(monkeypatch):
    monkeypatch.setattr(cpus, "_process_cpus", frozenset(os.sched_getaffinity(0)))
    assert in_thread(cpus.spare_cpus) is None


def test_threads_move_to_the_cpus_the_worker_left_free(monkeypatch):
    process = frozenset(os.sched_getaffinity(0))
    monkeypatch.setattr(cpus, "_process_cpus", process)
    worker_core = min(process)

    def worker():
        os.sched_setaffinity(0, {worker_core})  # what vLLM does to its worker thread
        spare = cpus.spare_cpus()
        # A thread the worker starts inherits its core until it moves itself.
        return spare, in_thread(
            lambda: (
                os.sched_getaffinity(0),
                cpus.bind_current_thread(spare),
                os.sched_getaffinity(0),
            )
        )

    spare, (inherited, _, moved) = in_thread(worker)
    assert spare == process - {worker_core}
    assert inherited == {worker_core}
    assert moved == spare


def test_binding_to_no_cpu_is_refused_quietly(caplog):
    in_thread(lambda: cpus.bind_current_thread(frozenset({10_000})))
    assert "could not move" in caplog.text

"""The probe's latency budget: what the probe costs the engine thread, and a sampling level
that keeps that cost inside ``CIRCUITWATCH_BUDGET``.

Measured, per engine step, with ``time.perf_counter`` only (no device sync):
    probe time  the probe's work on the engine thread: ``WorkerProbe.after_step`` from entry
                to exit (reading the step, naming requests, choosing rows, the copies into
                the host ring, handing them to the shipper)
    step time   the engine's step period: from the end of the previous step's probe work to
                the end of this one's, which holds the engine core's scheduling, the
                worker's ``execute_model`` and the probe. When that period is longer than
                the worker's own step (``execute_model`` entry to probe exit) by more than
                ``IDLE_GAP_S``, the engine sat idle before the step and the worker's own
                step is taken instead: idle time is no step time.
Their ratio, over the steps since the shipper's last message, goes to the sidecar with each
batch (``ProbeOverhead``) and becomes ``circuitwatch_probe_overhead_ratio``. Not measured: the
shipper's thread (its CPU time and its turns at the interpreter lock) and the in-graph work,
which is estimated once at start from the spec (``sidecar.spec.cost``).

Controlled: the sampling level, the share of each request's tokens the probe ships, taken
where the engine thread saves most:
    decode steps   (one generated token per running request, no request starting or
                   finishing: ``vllm_internals.plain_decode``, an O(1) test) are kept whole,
                   one in ``stride`` = round(1 / level), and the others are left at once, before
                   the step is even read. A request advances one position per step, so its
                   kept generated tokens are evenly spaced, ``stride`` apart, from an offset set
                   by the step it started in: a systematic sample, each token kept with
                   probability 1 / stride whatever its value.
    other steps    (prefill chunks, requests starting or finishing) are read, and the drain
                   copies only the rows ``SpreadSample`` (``sidecar.probe.host.attribution``)
                   keeps at the level, a systematic sample of each request's positions that
                   keeps at least one prompt token of every request.
Neither reads the device: a decode step needs no positions at all, and the other steps' rows
are chosen from where each request starts in the step, which the scheduler's output says
on the host (``StepLayout.num_computed``). So the level adapts on a GPU as on a CPU; there
the drain gathers the kept rows on the device, outside any CUDA graph, without a sync
(``sidecar.probe.host.drain``). On the CPU build a row's copy costs little next to reading a
step in Python, so what the level saves is mostly the steps it leaves unread. Every
``WINDOW_STEPS`` steps the window's ratio is compared with the budget: above
``HIGH`` x budget the level is halved, below ``LOW`` x budget it grows by a quarter, between
the two it holds; it stays within [``MIN_LEVEL``, 1]. What the probe does on every step
whatever the level (reading the step, naming its requests) is a floor no level removes:
a budget below it holds the level at ``MIN_LEVEL`` and the overhead above the budget, which
is what the alert "CircuitwatchProbeOverBudget" reports.

Where the level may not or cannot adapt, it stays at 1 and only the measurement runs (and
the alert reports a probe over its budget): when ``CIRCUITWATCH_SAMPLE=1.0`` asks for every
token (exact monitoring: the operator chose the cost), and under tensor parallelism (every
rank must keep the same rows, and each rank's clock would pick its own level; agreeing on
one would take a cross-rank exchange that blocks the engine thread).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sidecar.protocol.batch import ProbeOverhead

DEFAULT_BUDGET = 0.005  # half a percent of the engine's step time
IDLE_GAP_S = 0.05
WINDOW_STEPS = 32
MIN_LEVEL = 1 / 64
HIGH = 0.9
LOW = 0.6
DECREASE = 0.5
INCREASE = 1.25


@dataclass(frozen=True)
class StepTimes:
    """One step's stamps (``time.perf_counter`` seconds)."""

    started: float  # the worker's execute_model was entered
    probe_entered: float  # after_step was entered
    probe_left: float  # after_step is about to return


class Budget:
    """Engine thread: ``record`` after every step and read ``level``; the shipper's thread:
    ``take`` the overhead of the steps since its last message."""

    def __init__(self, budget: float, graph_share: float = 0.0, adaptive: bool = True):
        check_budget(budget)
        self.budget = budget
        self.graph_share = graph_share  # the in-graph estimate, exported as is
        self.adaptive = adaptive
        self.level = 1.0
        self._last_left: float | None = None
        self._window = [0.0, 0.0, 0]  # probe s, step s, steps: the controller's (engine thread)
        self._lock = threading.Lock()
        self._unsent = [0.0, 0.0]  # probe s, step s since the last take (both threads)

    @property
    def stride(self) -> int:
        """One decode step in this many is drained at the current level."""
        return max(1, round(1.0 / self.level))

    def keeps_step(self, step: int) -> bool:
        """Whether decode step ``step`` is drained (the others are left unread)."""
        return step % self.stride == 0

    def set_budget(self, budget: float) -> None:
        """Change the budget of a running probe (operators, tests: ``collective_rpc``)."""
        check_budget(budget)
        self.budget = budget

    def record(self, times: StepTimes) -> None:
        """Account one step; every ``WINDOW_STEPS`` steps, move the level."""
        probe = times.probe_left - times.probe_entered
        own = times.probe_left - times.started
        period = own if self._last_left is None else times.probe_left - self._last_left
        step = period if own <= period <= own + IDLE_GAP_S else own
        self._last_left = times.probe_left
        with self._lock:
            self._unsent[0] += probe
            self._unsent[1] += step
        window = self._window
        window[0] += probe
        window[1] += step
        window[2] += 1
        if window[2] >= WINDOW_STEPS:
            if self.adaptive and window[1] > 0:
                self.level = next_level(self.level, window[0] / window[1], self.budget)
            self._window = [0.0, 0.0, 0]

    def take(self) -> ProbeOverhead:
        """The overhead since the last call, with the settings in force now."""
        with self._lock:
            probe, step = self._unsent
            self._unsent = [0.0, 0.0]
        return ProbeOverhead(
            probe_seconds=probe,
            step_seconds=step,
            budget=self.budget,
            sample_level=self.level,
            graph_cost=self.graph_share,
        )


def next_level(level: float, ratio: float, budget: float) -> float:
    """The controller's move after a window whose overhead was ``ratio``."""
    if ratio > HIGH * budget:
        return max(MIN_LEVEL, level * DECREASE)
    if ratio < LOW * budget:
        return min(1.0, level * INCREASE)
    return level


def check_budget(budget: float) -> None:
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"budget {budget} is not a share of step time in (0, 1]")

"""The probe's health: on until a fault turns it off, with the faults counted by reason.

Every failure inside a worker's probe goes through ``ProbeHealth.fail``: a tap that raised
while it was traced (or, in eager mode, run), a site whose tap never ran, a tap that saw an
activation of an unexpected shape or dtype, ``Drain.collect`` raising on the engine thread,
``Drain.resolve`` raising on the shipper thread. The worker's probe then turns off (all of
its sites: the sidecar scores whole circuits, so a partial probe would export wrong
scores), the first fault of each reason is logged (once, not per step), every fault is
counted, and the shipper tells the sidecar (``SampleBatch.probe_off`` and
``probe_errors_total``), which exports ``circuitwatch_probe_enabled`` and
``circuitwatch_probe_errors_total``. The engine serves on: nothing here raises into vLLM.

``FaultInjection`` is a test hook, documented for operators too: ``CIRCUITWATCH_FAULT`` (or
``plugin.probe_inject_fault`` through ``collective_rpc``) makes one of these faults happen
for real at its point in the code, so the fault path can be proven on a running engine.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

logger = logging.getLogger(__name__)

# The bounded ``reason`` label of circuitwatch_probe_errors_total, one per place a probe fails.
TAP_ERROR = "tap_error"  # a tap raised while traced (compiled mode) or run (eager mode)
SITE_MISSING = "site_missing"  # a tap did not run in the step's forward
SITE_SHAPE = "site_shape"  # a tap saw an activation of unexpected shape or dtype
DRAIN_COLLECT = "drain_collect"  # Drain.collect (or reading the step) raised, engine thread
DRAIN_RESOLVE = "drain_resolve"  # Drain.resolve raised building a batch, shipper thread
REASONS = (TAP_ERROR, SITE_MISSING, SITE_SHAPE, DRAIN_COLLECT, DRAIN_RESOLVE)
# The drop reason (circuitwatch_samples_dropped_total) of drained steps a fault left unsent.
PROBE_OFF = "probe_off"


class ProbeFault(RuntimeError):
    """A failure the probe detected itself; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class ProbeStatus:
    """What the sidecar is told: whether the probe is on, and its faults by reason so far."""

    enabled: bool = True
    errors: tuple[tuple[str, int], ...] = ()  # (reason, cumulative count), sorted

    @property
    def errors_total(self) -> dict[str, int]:
        return dict(self.errors)


HEALTHY = ProbeStatus()


class ProbeHealth:
    """Thread-safe: the engine thread and the shipper thread both report faults."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._enabled = True
        self._errors: dict[str, int] = {}

    @property
    def enabled(self) -> bool:
        return self._enabled  # a plain read: the engine thread checks it every step

    def fail(self, reason: str, error: BaseException) -> None:
        """Turn the probe off for ``error``; logs the first fault of each reason only."""
        with self._lock:
            first = reason not in self._errors
            self._errors[reason] = self._errors.get(reason, 0) + 1
            self._enabled = False
        if first:
            logger.error(
                "circuitwatch: probe off (%s), the engine serves on without it: %s: %s",
                reason,
                type(error).__name__,
                error,
                # A fault the probe found itself says all in its message; anything else is a bug.
                exc_info=None if isinstance(error, ProbeFault) else error,
            )

    def status(self) -> ProbeStatus:
        with self._lock:
            return ProbeStatus(self._enabled, tuple(sorted(self._errors.items())))


# Points where CIRCUITWATCH_FAULT injects a fault; each maps to the reason it is counted as.
INJECTABLE = {
    "tap_error": TAP_ERROR,  # the first tap's hook raises inside its body
    "site_missing": SITE_MISSING,  # the first tap's hook is detached before the first forward
    "site_shape": SITE_SHAPE,  # the first tap expects one more feature than its site has
    "collect": DRAIN_COLLECT,  # Drain.collect's step raises
    "resolve": DRAIN_RESOLVE,  # Drain.resolve raises
}
INSTALL_POINTS = ("tap_error", "site_missing", "site_shape")  # applied when the taps go in


class InjectedFault(RuntimeError):
    """Raised at an injected fault's point: the code around it handles it like any error."""


@dataclass(frozen=True)
class FaultInjection:
    """``point`` (a key of ``INJECTABLE``) fails from engine step ``from_step`` on."""

    point: str
    from_step: int = 1

    @classmethod
    def parse(cls, text: str) -> FaultInjection:
        """``"collect"`` or ``"collect@20"`` (from step 20); ValueError if malformed."""
        point, _, step = text.strip().partition("@")
        if point not in INJECTABLE:
            raise ValueError(f"fault {point!r} is not one of {', '.join(INJECTABLE)}")
        if point in INSTALL_POINTS and step:
            raise ValueError(f"fault {point!r} happens when the taps are traced: no @step")
        try:
            from_step = int(step) if step else 1
        except ValueError:
            raise ValueError(f"fault step {step!r} is not an integer") from None
        if from_step < 1:
            raise ValueError(f"fault step {from_step} is not >= 1")
        return cls(point, from_step)

    def check(self, point: str, step: int) -> None:
        """Raise ``InjectedFault`` if this injection is due at ``point`` on ``step``."""
        if point == self.point and step >= self.from_step:
            raise InjectedFault(f"injected fault at {point} (step {step}, a test hook)")

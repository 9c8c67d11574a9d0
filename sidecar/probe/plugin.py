"""The ``vllm.general_plugins`` entry point: turns probes on inside vLLM's workers.

vLLM calls ``register()`` in every process it starts (front end, engine core, each worker),
sometimes more than once. With ``CIRCUITWATCH_SPEC`` unset it returns at once and imports
nothing. Otherwise it wraps vLLM's worker (``vllm_internals.wrap_worker``: install the taps
once the model is loaded, drain them after each step, flush the shipper at shutdown) and, in
the engine core's process, the scheduler (``vllm_internals.wrap_scheduler``: carry a
request's W3C ``traceparent`` to the workers).

Wrapping is idempotent. Nothing here raises into vLLM: a bad setting, a bad spec, an
unsupported model or a failing drain is logged and the engine serves without probes.

For tests and operators, ``probe_stats``, ``probe_flush`` and ``probe_set_budget`` run on a
worker through ``LLM.collective_rpc`` (which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` for
functions); ``probe_inject_fault`` is a test hook that makes a running probe fail at a named
point.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from sidecar.probe import vllm_internals
from sidecar.probe.config import ProbeConfig
from sidecar.probe.host.cpus import remember_process_cpus

logger = logging.getLogger(__name__)


def register() -> None:
    """Entry point; never raises."""
    try:
        try:
            config = ProbeConfig.from_env()
        except ValueError as e:
            vllm_internals.log_through_vllm("sidecar.probe")
            logger.error("circuitwatch: probes off: %s", e)
            return
        if config is None:
            return
        vllm_internals.log_through_vllm("sidecar.probe")
        remember_process_cpus()
        vllm_internals.wrap_worker(functools.partial(_install, config=config))
        vllm_internals.wrap_scheduler()
    except Exception:
        logger.exception("circuitwatch: could not hook into vLLM's worker; probes off")


def _install(worker: Any, config: ProbeConfig):
    """This worker's ``WorkerProbe``, or None (logged) when the probe cannot run here."""
    from sidecar.probe.graph.adapters import UnsupportedModel
    from sidecar.probe.runtime import WorkerProbe
    from sidecar.spec.load import SpecError

    try:
        return WorkerProbe.build(config, vllm_internals.engine_view(worker))
    except Exception as e:
        logger.error(
            "circuitwatch: probes off, the engine serves without them: %s: %s",
            type(e).__name__,
            e,
            # A bad spec or model says all in its message; anything else is our bug.
            exc_info=not isinstance(e, SpecError | UnsupportedModel),
        )
        return None


def probe_stats(worker: Any):
    """This worker's ``ProbeStats``, or None when it runs without probes."""
    probe = vllm_internals.attached_probe(worker)
    return None if probe is None else probe.stats()


def probe_inject_fault(worker: Any, fault: str) -> bool:
    """Test hook: make this worker's probe fail from now on at ``fault`` ("collect" or
    "resolve", see ``health.FaultInjection``); False when it runs without probes."""
    from sidecar.probe.host.health import INSTALL_POINTS, FaultInjection

    probe = vllm_internals.attached_probe(worker)
    injection = FaultInjection.parse(fault)
    if injection.point in INSTALL_POINTS:
        raise ValueError(f"{fault!r} happens only when the taps are traced: use CIRCUITWATCH_FAULT")
    if probe is not None:
        probe.inject(injection)
    return probe is not None


def probe_flush(worker: Any, timeout_s: float = 10.0) -> bool:
    """Wait until this worker's shipper has sent or dropped every queued step."""
    probe = vllm_internals.attached_probe(worker)
    return probe is not None and probe.shipper.flush(timeout_s)


def probe_set_budget(worker: Any, budget: float) -> bool:
    """Change this worker's latency budget (``CIRCUITWATCH_BUDGET``) while it serves."""
    probe = vllm_internals.attached_probe(worker)
    if probe is None:
        return False
    probe.budget.set_budget(budget)
    return True

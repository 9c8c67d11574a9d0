"""The ``vllm.general_plugins`` entry point: turns probes on inside vLLM's workers.

vLLM calls ``register()`` in every process it starts (front end, engine core, each worker),
sometimes more than once. With ``CIRCUITWATCH_SPEC`` unset it returns at once and imports
nothing. Otherwise it wraps two methods of vLLM's worker class (``vllm.v1.worker.
gpu_worker.Worker``, which the CPU worker inherits):

    load_model     after the model is built and loaded, and before its first forward (the
                   profile run, where torch.compile traces it), install this rank's taps,
                   so they are traced into the compiled graph;
    execute_model  after each step's forward is launched, drain the taps to the shipper;
    shutdown       first send what the shipper still holds (for a few seconds at most).

and, in the engine core's process, the scheduler's ``add_request``, to copy a request's
W3C ``traceparent`` to where the workers see it (``sidecar.probe.runtime``).

Wrapping is idempotent. Nothing here raises into vLLM: a bad setting, a bad spec, an
unsupported model or a failing drain is logged and the engine serves without probes.

For tests and operators, ``probe_stats`` and ``probe_flush`` run on a worker through
``LLM.collective_rpc`` (which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` for functions).
"""

from __future__ import annotations

import functools
import logging
from typing import Any

from sidecar.probe.config import ProbeConfig
from sidecar.probe.cpus import remember_process_cpus

logger = logging.getLogger(__name__)

_PROBE_ATTR = "circuitwatch_probe"
_WRAPPED_ATTR = "__circuitwatch_wrapped__"


def register() -> None:
    """Entry point; never raises."""
    try:
        try:
            config = ProbeConfig.from_env()
        except ValueError as e:
            _log_like_vllm()
            logger.error("circuitwatch: probes off: %s", e)
            return
        if config is None:
            return
        _log_like_vllm()
        remember_process_cpus()
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.worker.gpu_worker import Worker

        _wrap_worker(Worker, config)
        _wrap_scheduler(Scheduler)
    except Exception:
        logger.exception("circuitwatch: could not hook into vLLM's worker; probes off")


def _log_like_vllm() -> None:
    """Send the probe's log records to vLLM's handlers, so they appear in the engine's log."""
    probe_logger = logging.getLogger("sidecar.probe")
    vllm_handlers = logging.getLogger("vllm").handlers
    if probe_logger.handlers or not vllm_handlers:
        return
    for handler in vllm_handlers:
        probe_logger.addHandler(handler)
    probe_logger.setLevel(logging.INFO)
    probe_logger.propagate = False


def _wrap_worker(worker_cls: type, config: ProbeConfig) -> None:
    load_model = worker_cls.load_model
    execute_model = worker_cls.execute_model
    shutdown = worker_cls.shutdown
    if getattr(load_model, _WRAPPED_ATTR, False):
        return

    @functools.wraps(load_model)
    def load_model_then_tap(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        _install(self, config)
        return result

    @functools.wraps(execute_model)
    def execute_model_then_drain(self, scheduler_output, *args, **kwargs):
        output = execute_model(self, scheduler_output, *args, **kwargs)
        probe = getattr(self, _PROBE_ATTR, None)
        if probe is not None:
            probe.after_step(self.model_runner, scheduler_output)
        return output

    @functools.wraps(shutdown)
    def close_then_shutdown(self, *args, **kwargs):
        probe = getattr(self, _PROBE_ATTR, None)
        if probe is not None:
            probe.close()
        return shutdown(self, *args, **kwargs)

    for name, wrapper in (
        ("load_model", load_model_then_tap),
        ("execute_model", execute_model_then_drain),
        ("shutdown", close_then_shutdown),
    ):
        setattr(wrapper, _WRAPPED_ATTR, True)
        setattr(worker_cls, name, wrapper)


def _wrap_scheduler(scheduler_cls: type) -> None:
    add_request = scheduler_cls.add_request
    if getattr(add_request, _WRAPPED_ATTR, False):
        return

    @functools.wraps(add_request)
    def remember_then_add(self, request, *args, **kwargs):
        try:
            from sidecar.probe.runtime import carry_trace_context

            carry_trace_context(request)
        except Exception:
            logger.exception("circuitwatch: could not read the request's trace context")
        return add_request(self, request, *args, **kwargs)

    setattr(remember_then_add, _WRAPPED_ATTR, True)
    scheduler_cls.add_request = remember_then_add


def _install(worker: Any, config: ProbeConfig) -> None:
    from sidecar.probe.adapters import UnsupportedModel
    from sidecar.probe.runtime import WorkerProbe
    from sidecar.spec.load import SpecError

    try:
        probe = WorkerProbe.build(config, _engine_view(worker))
    except Exception as e:
        logger.error(
            "circuitwatch: probes off, the engine serves without them: %s: %s",
            type(e).__name__,
            e,
            # A bad spec or model says all in its message; anything else is our bug.
            exc_info=not isinstance(e, SpecError | UnsupportedModel),
        )
        return
    setattr(worker, _PROBE_ATTR, probe)


def _engine_view(worker: Any):
    from vllm import envs
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

    from sidecar.probe.runtime import EngineView

    vllm_config = worker.vllm_config
    model_config = vllm_config.model_config
    model = worker.model_runner.get_model()
    world_size = get_tensor_model_parallel_world_size()
    rows = vllm_config.scheduler_config.max_num_batched_tokens
    capture = getattr(vllm_config.compilation_config, "max_cudagraph_capture_size", None) or 0
    served = model_config.served_model_name
    inner = getattr(model, "model", None)
    configs = {
        id(c): c for c in (vllm_config, getattr(inner, "vllm_config", None)) if c is not None
    }
    return EngineView(
        model=model,
        model_dir=str(model_config.model),
        hf_config=model_config.hf_config.to_dict(),
        model_name=served if isinstance(served, str) else served[0],
        max_tokens_per_forward=max(rows, capture),
        rank=get_tensor_model_parallel_rank(),
        world_size=world_size,
        all_reduce=tensor_model_parallel_all_reduce if world_size > 1 else None,
        randomized_ids=not envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION,
        compile_configs=list(configs.values()),
    )


def probe_stats(worker: Any):
    """This worker's ``ProbeStats``, or None when it runs without probes."""
    probe = getattr(worker, _PROBE_ATTR, None)
    return None if probe is None else probe.stats()


def probe_flush(worker: Any, timeout_s: float = 10.0) -> bool:
    """Wait until this worker's shipper has sent or dropped every queued step."""
    probe = getattr(worker, _PROBE_ATTR, None)
    return probe is not None and probe.shipper.flush(timeout_s)

"""Every read of vLLM-private state the probe makes, in one place: a vLLM upgrade edits this file.

Written against vLLM 0.32.0. The rest of ``sidecar.probe`` sees only what this module exports
(``EngineView``, ``StepLayout``, ``EngineStep``, and the functions below); paths are relative
to the ``vllm`` package, line numbers those of 0.32.0.

    log_through_vllm     ``logger.py``: vLLM's handlers on the ``vllm`` logger
    wrap_worker          ``v1/worker/gpu_worker.py``: ``Worker`` (192; the CPU worker inherits
                         it), its ``load_model`` (587), ``execute_model(scheduler_output)``
                         (1302), ``shutdown`` (1606) and ``model_runner`` attribute
    attached_probe       the attribute the probe hangs on the worker (``circuitwatch_probe``)
    wrap_scheduler       ``v1/core/sched/scheduler.py``: ``Scheduler.add_request`` (2616)
    engine_view          ``Worker.vllm_config``: ``model_config`` (model, hf_config,
                         served_model_name), ``scheduler_config.max_num_batched_tokens``,
                         ``compilation_config.max_cudagraph_capture_size``; the model runner's
                         ``get_model()`` (``v1/worker/gpu_model_runner.py`` 3112,
                         ``v1/worker/gpu/model_runner.py`` 559); ``distributed/
                         parallel_state.py`` tp rank / world size (2442, 2437),
                         ``distributed/communication_op.py`` all_reduce (12); ``envs.py``
                         ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` (232)
    key_compile_cache    ``config/vllm.py``: ``VllmConfig.additional_config`` (421), hashed
                         into the compile-cache key (549)
    engine_view          also ``VllmConfig.instance_id`` (425, set per engine at config
                         creation, 1417) and ``parallel_config.data_parallel_rank``: the
                         engine's identity (``engine_id``)
    read_step,           ``v1/core/sched/output.py`` ``SchedulerOutput`` (scheduled_new_reqs
    plain_decode         236, scheduled_cached_reqs, num_scheduled_tokens 244,
                         total_num_scheduled_tokens 247, finished_req_ids 260;
                         ``NewRequestData.num_computed_tokens`` 48 and
                         ``CachedRequestData.num_computed_tokens`` 151); the model runners'
                         batch (``step_layout``)
    carry_trace_context  ``v1/request.py`` ``Request.trace_headers`` (196) and
                         ``sampling_params``; ``sampling_params.py`` ``extra_args`` (412)
    external_request_id  ``v1/engine/input_processor.py`` 371: ``f"{id}-{random_uuid():.8}"``

Model runners: vLLM 0.32 has two. V1 (``v1/worker/gpu_model_runner.py``, also the CPU runner)
keeps the batch in ``runner.input_batch``; V2 (``v1/worker/gpu/``, the default on CUDA) leaves
the step's ``InputBatch`` in ``runner.execute_model_state`` (``gpu/model_runner.py`` 2403) until
``sample_tokens``. ``step_layout`` reads either.

Trace context: vLLM's OpenAI front end puts a request's ``traceparent`` header into
``trace_headers`` (only with ``--otlp-traces-endpoint``), and the engine core keeps it on its
``Request``; the worker's ``SchedulerOutput`` (``NewRequestData``) does not carry it, but does
carry the request's ``SamplingParams``, whose ``extra_args`` vLLM keeps for plugins. So
``carry_trace_context`` (in the engine core, as the scheduler admits a request) copies the
traceparent there, and ``new_trace_contexts`` reads it back in every worker, whatever the
executor (one process, multiprocessing, any number of ranks).

The model's own module layout (``model_executor/models/llama.py``) is read where the taps are
placed, ``sidecar.probe.graph.adapters``: it is traced code, and differs per model family.

Imports vLLM only inside functions: the plugin imports this module in every vLLM process.
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

_PROBE_ATTR = "circuitwatch_probe"
_WRAPPED_ATTR = "__circuitwatch_wrapped__"
TRACEPARENT_ARG = "circuitwatch.traceparent"  # our key in SamplingParams.extra_args
_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def log_through_vllm(name: str) -> None:
    """Send logger ``name``'s records to vLLM's handlers, so they appear in the engine's log."""
    ours = logging.getLogger(name)
    vllm_handlers = logging.getLogger("vllm").handlers
    if ours.handlers or not vllm_handlers:
        return
    for handler in vllm_handlers:
        ours.addHandler(handler)
    ours.setLevel(logging.INFO)
    ours.propagate = False


class AttachedProbe(Protocol):
    """What the wrapped worker calls on the probe it holds."""

    def after_step(self, runner: Any, scheduler_output: Any, started: float) -> None: ...

    def close(self) -> None: ...


def wrap_worker(install: Callable[[Any], AttachedProbe | None]) -> None:
    """Wrap vLLM's worker class, once however often called:

    load_model     after the model is built and loaded, and before its first forward (the
                   profile run, where torch.compile traces it), ``install(worker)``, so the
                   taps are traced into the compiled graph; the probe it returns is attached;
    execute_model  after each step's forward is launched, ``probe.after_step``, given when
                   ``execute_model`` was entered (``time.perf_counter``, for the budget);
    shutdown       first ``probe.close()``.
    """
    from vllm.v1.worker.gpu_worker import Worker

    load_model = Worker.load_model
    execute_model = Worker.execute_model
    shutdown = Worker.shutdown
    if getattr(load_model, _WRAPPED_ATTR, False):
        return

    @functools.wraps(load_model)
    def load_model_then_tap(self, *args, **kwargs):
        result = load_model(self, *args, **kwargs)
        probe = install(self)
        if probe is not None:
            setattr(self, _PROBE_ATTR, probe)
        return result

    @functools.wraps(execute_model)
    def execute_model_then_drain(self, scheduler_output, *args, **kwargs):
        started = time.perf_counter()
        output = execute_model(self, scheduler_output, *args, **kwargs)
        probe = attached_probe(self)
        if probe is not None:
            probe.after_step(self.model_runner, scheduler_output, started)
        return output

    @functools.wraps(shutdown)
    def close_then_shutdown(self, *args, **kwargs):
        probe = attached_probe(self)
        if probe is not None:
            probe.close()
        return shutdown(self, *args, **kwargs)

    for name, wrapper in (
        ("load_model", load_model_then_tap),
        ("execute_model", execute_model_then_drain),
        ("shutdown", close_then_shutdown),
    ):
        setattr(wrapper, _WRAPPED_ATTR, True)
        setattr(Worker, name, wrapper)


def attached_probe(worker: Any) -> Any | None:
    """The probe ``wrap_worker`` attached to ``worker``, or None."""
    return getattr(worker, _PROBE_ATTR, None)


def wrap_scheduler() -> None:
    """Wrap the engine core's ``Scheduler.add_request`` to ``carry_trace_context``, once."""
    from vllm.v1.core.sched.scheduler import Scheduler

    add_request = Scheduler.add_request
    if getattr(add_request, _WRAPPED_ATTR, False):
        return

    @functools.wraps(add_request)
    def remember_then_add(self, request, *args, **kwargs):
        try:
            carry_trace_context(request)
        except Exception:
            logger.exception("circuitwatch: could not read the request's trace context")
        return add_request(self, request, *args, **kwargs)

    setattr(remember_then_add, _WRAPPED_ATTR, True)
    Scheduler.add_request = remember_then_add


@dataclass(frozen=True)
class EngineView:
    """What the probe needs from vLLM's worker, read once its model is loaded."""

    model: torch.nn.Module
    model_dir: str
    hf_config: dict
    model_name: str
    dtype: torch.dtype  # the model's, so its activations'
    max_tokens_per_forward: int
    rank: int
    world_size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
    randomized_ids: bool  # vLLM adds a random suffix to request ids (``external_request_id``)
    engine_id: str  # the same on every tensor-parallel rank of one engine, new per engine
    compile_configs: list[Any]  # VllmConfig objects whose hash keys the compile cache


def engine_view(worker: Any) -> EngineView:
    """The loaded worker's model, its sizes and this rank's place in tensor parallelism."""
    from vllm import envs
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
        tensor_model_parallel_all_reduce,
    )

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
        dtype=model_config.dtype,
        max_tokens_per_forward=max(rows, capture),
        rank=get_tensor_model_parallel_rank(),
        world_size=world_size,
        all_reduce=tensor_model_parallel_all_reduce if world_size > 1 else None,
        randomized_ids=not envs.VLLM_DISABLE_REQUEST_ID_RANDOMIZATION,
        engine_id=engine_id(vllm_config),
        compile_configs=list(configs.values()),
    )


def engine_id(vllm_config: Any) -> str:
    """``<instance id>-dp<data-parallel rank>``: the config (and its ``instance_id``, a
    nanosecond clock reading taken when the engine's config was made) is built once per
    engine start and copied to every worker, so all tensor-parallel ranks of an engine share
    it, a restarted engine gets a new one, and data-parallel engines differ by their rank."""
    dp_rank = getattr(vllm_config.parallel_config, "data_parallel_rank", 0)
    return f"{vllm_config.instance_id}-dp{dp_rank}"


def key_compile_cache(engine: EngineView, key: str) -> None:
    """Make ``key`` part of vLLM's compile-cache key, so graphs traced with other taps differ."""
    for vllm_config in engine.compile_configs:
        if isinstance(vllm_config.additional_config, dict):
            vllm_config.additional_config["circuitwatch"] = key
        else:
            logger.warning(
                "circuitwatch: additional_config is not a dict; the compile cache cannot "
                "tell probed graphs apart, set VLLM_DISABLE_COMPILE_CACHE=1"
            )


@dataclass(frozen=True)
class StepLayout:
    """The requests of one forward pass, in batch order."""

    req_ids: list[str]
    num_scheduled: np.ndarray  # int [R]: tokens each request has in this forward
    prompt_lens: np.ndarray  # int [R]
    # int [R]: tokens each request had computed before this forward, so its first position
    # here (None where unknown: a layout built from other layouts' rows)
    num_computed: np.ndarray | None = None

    @classmethod
    def empty(cls) -> StepLayout:
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) tokens in the forward."""
        return int(self.num_scheduled.sum())


@dataclass(frozen=True)
class EngineStep:
    """What the probe reads of one engine step, after its forward was launched."""

    trace_contexts: list[tuple[str, str]]  # (engine request id, traceparent), new requests
    finished: list[str]  # engine ids of the requests that finished, sorted
    layout: StepLayout | None  # None when the step scheduled no tokens
    # (engine request id, prompt tokens found in the prefix cache) of each request this step
    # starts (0 for most): those tokens skip the forward pass, no probe sees them
    prefix_cached: list[tuple[str, int]]


def read_step(runner: Any, scheduler_output: Any) -> EngineStep:
    """The step ``runner`` just ran, as its ``SchedulerOutput`` and batch describe it."""
    return EngineStep(
        trace_contexts=new_trace_contexts(scheduler_output),
        finished=sorted(scheduler_output.finished_req_ids),
        layout=(
            step_layout(runner, scheduler_output)
            if scheduler_output.total_num_scheduled_tokens
            else None
        ),
        prefix_cached=[
            (new.req_id, new.num_computed_tokens) for new in scheduler_output.scheduled_new_reqs
        ],
    )


def plain_decode(scheduler_output: Any) -> bool:
    """Whether the step only feeds back one generated token per running request: no request
    starts or finishes in it, and it schedules as many tokens as requests. O(1)."""
    return (
        not scheduler_output.scheduled_new_reqs
        and not scheduler_output.finished_req_ids
        and scheduler_output.total_num_scheduled_tokens
        == len(scheduler_output.num_scheduled_tokens)
    )


def step_layout(runner: Any, scheduler_output: Any) -> StepLayout:
    """The batch order of the forward ``runner`` just ran, from either vLLM model runner."""
    state = getattr(runner, "execute_model_state", None)
    batch = getattr(state, "input_batch", None)
    if batch is not None:  # V2 runner
        req_ids = list(batch.req_ids)
        num_scheduled = np.asarray(batch.num_scheduled_tokens[: len(req_ids)], dtype=np.int64)
        prompt_lens = runner.req_states.prompt_len.np[batch.idx_mapping_np[: len(req_ids)]]
    else:  # V1 runner
        batch = runner.input_batch
        req_ids = list(batch.req_ids[: batch.num_reqs])
        num_scheduled = np.array(
            [scheduler_output.num_scheduled_tokens[r] for r in req_ids], dtype=np.int64
        )
        prompt_lens = batch.num_prompt_tokens[: len(req_ids)]
    cached = scheduler_output.scheduled_cached_reqs
    computed = dict(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    computed.update(
        (new.req_id, new.num_computed_tokens) for new in scheduler_output.scheduled_new_reqs
    )
    return StepLayout(
        req_ids,
        num_scheduled,
        np.asarray(prompt_lens, dtype=np.int64),
        np.fromiter((computed[r] for r in req_ids), dtype=np.int64, count=len(req_ids)),
    )


def carry_trace_context(request: Any) -> None:
    """Engine core: copy an admitted ``Request``'s traceparent to where workers see it."""
    headers = request.trace_headers
    params = request.sampling_params
    if not headers or "traceparent" not in headers or params is None:
        return
    params.extra_args = {**(params.extra_args or {}), TRACEPARENT_ARG: headers["traceparent"]}


def new_trace_contexts(scheduler_output: Any) -> list[tuple[str, str]]:
    """Worker: (engine request id, traceparent) of this step's new requests that have one."""
    found = []
    for new in scheduler_output.scheduled_new_reqs:
        extra = new.sampling_params.extra_args if new.sampling_params is not None else None
        if extra and TRACEPARENT_ARG in extra:
            found.append((new.req_id, str(extra[TRACEPARENT_ARG])))
    return found


def external_request_id(internal: str, randomized: bool = True) -> str:
    """The id the user gave, from the engine's ``<id>-<8 hex>`` (unchanged if not randomized).

    vLLM's front ends add the suffix to the id a user gives (``LLM.generate``'s
    ``RequestOutput.request_id``, the OpenAI server's request id) so that ids are unique
    inside the engine, unless ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` is set.
    """
    return _ENGINE_SUFFIX.sub("", internal) if randomized else internal

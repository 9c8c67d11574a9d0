"""One worker's probe: built once the model is loaded, then called once per engine step.

``WorkerProbe.build`` loads and checks the spec against the served model, installs the taps
on this tensor-parallel rank, and starts the drain and the shipper. ``after_step`` runs on
the engine thread after the model runner has launched a step's forward: it reads the step's
layout from the runner, hands the drain's copies to the shipper, and returns.

Model runners: vLLM 0.32 has two. V1 (``vllm/v1/worker/gpu_model_runner.py``, also the CPU
runner) keeps the batch in ``runner.input_batch``; V2 (``vllm/v1/worker/gpu/``, the default
on CUDA) leaves the step's ``InputBatch`` in ``runner.execute_model_state`` until
``sample_tokens``. ``step_layout`` reads either. With async scheduling (vLLM's default where
supported) the forward may still be running when ``execute_model`` returns; the drain's
copies are queued on the same stream after it, so nothing here waits for it.

Trace context: vLLM's OpenAI front end puts a request's ``traceparent`` header into
``trace_headers`` (only with ``--otlp-traces-endpoint``), and the engine core keeps it on
its ``Request``; the worker's ``SchedulerOutput`` (``NewRequestData``) does not carry it, but
does carry the request's ``SamplingParams``, whose ``extra_args`` vLLM keeps for plugins. So
``carry_trace_context`` (in the engine core, as the scheduler admits a request) copies the
traceparent there, and ``new_trace_contexts`` reads it back in every worker, whatever the
executor (one process, multiprocessing, any number of ranks).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sidecar.probe.adapters import CheckpointWeights, LlamaAdapter
from sidecar.probe.attribution import StepLayout
from sidecar.probe.config import ProbeConfig
from sidecar.probe.cpus import spare_cpus
from sidecar.probe.drain import BatchIdentity, Drain
from sidecar.probe.shipper import DropCounts, Shipper, ShipperStats
from sidecar.probe.taps import TapSet, install_taps
from sidecar.protocol.batch import row_bytes
from sidecar.spec.identity import shape_from_config
from sidecar.spec.load import check_model, check_shape, load_spec
from sidecar.spec.schema import CircuitSpec

logger = logging.getLogger(__name__)

# Bumped whenever what the taps trace into the graph changes; part of vLLM's compile-cache key.
TAP_LAYOUT_VERSION = 1
RING_FORWARDS = 4
MESSAGE_BYTES = 2**20  # what one message aims at: cheap to build, far below the limit


@dataclass(frozen=True)
class ProbeStats:
    rank: int
    world_size: int
    steps: int  # engine steps seen
    component_ids: tuple[int, ...]  # the columns this rank ships
    shipper: ShipperStats


@dataclass(frozen=True)
class EngineView:
    """What the probe needs from vLLM's worker, gathered by the plugin."""

    model: torch.nn.Module
    model_dir: str
    hf_config: dict
    model_name: str
    max_tokens_per_forward: int
    rank: int
    world_size: int
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None
    randomized_ids: bool
    compile_configs: list[Any]  # VllmConfig objects whose hash keys the compile cache


class WorkerProbe:
    def __init__(
        self,
        spec: CircuitSpec,
        taps: TapSet,
        drain: Drain,
        shipper: Shipper,
        rank: int,
        trace_parents: TraceParents,
    ):
        self.spec = spec
        self.trace_parents = trace_parents
        self.taps = taps
        self.drain = drain
        self.shipper = shipper
        self.rank = rank
        self.steps = 0
        self._failed = False

    @classmethod
    def build(cls, config: ProbeConfig, engine: EngineView) -> WorkerProbe:
        """Load the spec, install the taps; raises (SpecError, UnsupportedModel, ...) on misfit."""
        spec = load_spec(config.spec_path)
        local = Path(engine.model_dir).is_dir()
        if local:
            check_model(spec, engine.model_dir)
        else:
            logger.warning(
                "circuitwatch: %s is not a local directory; checking the spec against the "
                "model's config only (its hash cannot be verified)",
                engine.model_dir,
            )
            check_shape(spec, shape_from_config(engine.hf_config))
        adapter = LlamaAdapter(engine.model, CheckpointWeights(engine.model_dir) if local else None)
        device = next(engine.model.parameters()).device
        taps = install_taps(
            adapter,
            spec,
            rows=engine.max_tokens_per_forward,
            device=device,
            rank=engine.rank,
            all_reduce=engine.all_reduce,
        )
        # The compiled graph now contains the taps: key vLLM's compile cache by them, or an
        # engine would reuse a graph traced with another spec, or without probes.
        fingerprint = f"{spec.hash}/taps-v{TAP_LAYOUT_VERSION}/rows-{engine.max_tokens_per_forward}"
        for vllm_config in engine.compile_configs:
            if isinstance(vllm_config.additional_config, dict):
                vllm_config.additional_config["circuitwatch"] = fingerprint
            else:
                logger.warning(
                    "circuitwatch: additional_config is not a dict; the compile cache cannot "
                    "tell probed graphs apart, set VLLM_DISABLE_COMPILE_CACHE=1"
                )
        drops = DropCounts()
        identity = BatchIdentity(
            spec_hash=spec.hash,
            model_name=engine.model_name,
            rank=engine.rank,
            world_size=engine.world_size,
            randomized_ids=engine.randomized_ids,
        )
        # Room for a few forwards' worth of steps while the shipper gathers and sends.
        ring_rows = RING_FORWARDS * engine.max_tokens_per_forward
        trace_parents = TraceParents()
        drain = Drain(taps, identity, config.sample, drops, ring_rows, trace_parents.take)
        shipper = Shipper(
            config.endpoint,
            drain.resolve,
            capacity=config.queue_size,
            drops=drops,
            cpus=spare_cpus(),
            linger_s=config.linger_ms / 1000,
            max_tokens=max(1, MESSAGE_BYTES // row_bytes(len(taps.component_ids))),
        )
        logger.info(
            "circuitwatch: rank %d/%d taps %d sites, ships %d of %d components to %s",
            engine.rank,
            engine.world_size,
            len(taps.taps),
            len(taps.component_ids),
            len(spec.components),
            config.endpoint,
        )
        return cls(spec, taps, drain, shipper, engine.rank, trace_parents)

    def after_step(self, runner: Any, scheduler_output: Any) -> None:
        """Drain this step into the shipper. Never raises: a failure turns the probe off."""
        if self._failed:
            return
        self.steps += 1
        try:
            for request_id, traceparent in new_trace_contexts(scheduler_output):
                self.trace_parents.remember(request_id, traceparent)
            finished = sorted(scheduler_output.finished_req_ids)
            if scheduler_output.total_num_scheduled_tokens:
                layout = step_layout(runner, scheduler_output)
            elif finished:
                layout = StepLayout([], np.zeros(0, np.int64), np.zeros(0, np.int64))
            else:
                return
            pending = self.drain.collect(self.steps, layout, finished)
            if pending is not None:
                self.shipper.submit(pending)
        except Exception:
            self._failed = True
            logger.exception("circuitwatch: drain failed; probes off, the engine serves on")

    def close(self, timeout_s: float = 2.0) -> None:
        self.shipper.close(timeout_s)

    def stats(self) -> ProbeStats:
        return ProbeStats(
            rank=self.rank,
            world_size=self.drain.identity.world_size,
            steps=self.steps,
            component_ids=tuple(int(i) for i in self.taps.component_ids),
            shipper=self.shipper.stats(),
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
    return StepLayout(req_ids, num_scheduled, np.asarray(prompt_lens, dtype=np.int64))


TRACEPARENT_ARG = "circuitwatch.traceparent"  # our key in SamplingParams.extra_args


class TraceParents:
    """W3C traceparent by engine request id, from a request's first step to its first drain.

    Bounded: a request that never reaches the drain is forgotten once ``capacity`` newer
    ones arrived.
    """

    def __init__(self, capacity: int = 65_536) -> None:
        self.capacity = capacity
        self._by_request: OrderedDict[str, str] = OrderedDict()

    def remember(self, request_id: str, traceparent: str) -> None:
        self._by_request[request_id] = traceparent
        if len(self._by_request) > self.capacity:
            self._by_request.popitem(last=False)

    def take(self, request_id: str) -> str | None:
        """The request's traceparent, once; None when unknown or already taken."""
        return self._by_request.pop(request_id, None) if self._by_request else None


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

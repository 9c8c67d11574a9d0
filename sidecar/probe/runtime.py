"""One worker's probe: built once the model is loaded, then called once per engine step.

``WorkerProbe.build`` loads and checks the spec against the served model, installs the taps
on this tensor-parallel rank, and starts the drain and the shipper. ``after_step`` runs on
the engine thread after the model runner has launched a step's forward: it reads the step's
layout, hands the drain's copies to the shipper, and returns.

What it reads of vLLM (the engine, each step's layout, trace contexts) comes through
``sidecar.probe.vllm_internals``. With async scheduling (vLLM's default where supported) the
forward may still be running when ``execute_model`` returns; the drain's copies are queued on
the same stream after it, so nothing here waits for it.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.probe.config import ProbeConfig
from sidecar.probe.graph.adapters import CheckpointWeights, LlamaAdapter
from sidecar.probe.graph.cache_key import compile_cache_key
from sidecar.probe.graph.taps import TapSet, install_taps
from sidecar.probe.host.cpus import spare_cpus
from sidecar.probe.host.drain import BatchIdentity, Drain
from sidecar.probe.host.shipper import DropCounts, Shipper, ShipperStats
from sidecar.probe.vllm_internals import EngineView, StepLayout, key_compile_cache, read_step
from sidecar.protocol.batch import row_bytes
from sidecar.spec.identity import shape_from_config
from sidecar.spec.load import check_model, check_shape, load_spec
from sidecar.spec.schema import CircuitSpec

logger = logging.getLogger(__name__)

RING_FORWARDS = 4
MESSAGE_BYTES = 2**20  # what one message aims at: cheap to build, far below the limit


@dataclass(frozen=True)
class ProbeStats:
    rank: int
    world_size: int
    steps: int  # engine steps seen
    component_ids: tuple[int, ...]  # the columns this rank ships
    shipper: ShipperStats


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
        key_compile_cache(engine, compile_cache_key(spec.hash, engine.max_tokens_per_forward))
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
            security=config.security,
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
            step = read_step(runner, scheduler_output)
            for request_id, traceparent in step.trace_contexts:
                self.trace_parents.remember(request_id, traceparent)
            if step.layout is not None:
                layout = step.layout
            elif step.finished:
                layout = StepLayout.empty()
            else:
                return
            pending = self.drain.collect(self.steps, layout, step.finished)
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


class TraceParents:
    """W3C traceparent by engine request id, from a request's first step to its first drain.

    Filled from the trace contexts ``vllm_internals.read_step`` finds in each step.

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

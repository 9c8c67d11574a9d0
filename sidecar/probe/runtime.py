"""One worker's probe: built once the model is loaded, then called once per engine step.

``WorkerProbe.build`` loads and checks the spec against the served model, installs the taps
on this tensor-parallel rank, and starts the drain and the shipper. ``after_step`` runs on
the engine thread after the model runner has launched a step's forward: it reads the step's
layout, hands the drain's copies to the shipper, and returns.

What it reads of vLLM (the engine, each step's layout, trace contexts) comes through
``sidecar.probe.vllm_internals``. With async scheduling (vLLM's default where supported) the
forward may still be running when ``execute_model`` returns; the drain's copies are queued on
the same stream after it, so nothing here waits for it.

Faults (see ``sidecar.probe.host.health``): a tap that failed, a site whose tap did not run
(checked on the first ``CHECKED_STEPS`` steps), ``Drain.collect`` raising here or
``Drain.resolve`` raising on the shipper thread turn this worker's probe off, logged once,
counted, and reported to the sidecar by the shipper. What a probe turned off still costs:
``after_step`` returns at its first line, the drain and shipper do nothing (but keep a
stream open for status), and the taps stay in the compiled graph: vLLM compiles the
model once, and detaching the hooks would not take them out of that graph (it would only
help eager mode, and could make a guarded graph recompile mid-serving). So the engine keeps
paying the taps' kernels per forward: BENCHMARKS.md measures exactly that state as
configuration 2a ("taps only", ``after_step`` a no-op): 101.4 % ± 1.9 of the baseline's
throughput on a 220 M-parameter Llama (no measurable cost), 89 % ± 7 (busy machine) to
96 % ± 4 (quiet) on the 2-layer reference model, whose own kernels are so small that the
taps' launches show. tests/test_faults.py prints the same engine's throughput before and
after its probe turned off.

The probe keeps to a latency budget (``sidecar.probe.host.budget``): ``after_step`` times its
own work against the step's and the budget sets the sampling level the drain copies at.
Its in-graph cost is estimated at start from the spec (``sidecar.spec.cost``), logged, sent
with every batch, and reported as an error when the estimate alone exceeds the budget.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.probe.config import ProbeConfig
from sidecar.probe.graph.adapters import CheckpointWeights, LlamaAdapter
from sidecar.probe.graph.cache_key import compile_cache_key
from sidecar.probe.graph.taps import TapSet, install_taps
from sidecar.probe.host.budget import Budget, StepTimes
from sidecar.probe.host.cpus import spare_cpus
from sidecar.probe.host.drain import BatchIdentity, Drain, PendingStep
from sidecar.probe.host.health import (
    DRAIN_COLLECT,
    DRAIN_RESOLVE,
    PROBE_OFF,
    FaultInjection,
    ProbeFault,
    ProbeHealth,
    ProbeStatus,
)
from sidecar.probe.host.shipper import DropCounts, Resolve, Shipper, ShipperStats
from sidecar.probe.vllm_internals import (
    EngineView,
    StepLayout,
    key_compile_cache,
    plain_decode,
    read_step,
)
from sidecar.protocol.batch import TokenBatch, row_bytes
from sidecar.spec.cost import graph_cost
from sidecar.spec.identity import shape_from_config
from sidecar.spec.load import check_model, check_shape, load_spec
from sidecar.spec.schema import CircuitSpec

logger = logging.getLogger(__name__)

RING_FORWARDS = 4
MESSAGE_BYTES = 2**20  # what one message aims at: cheap to build, far below the limit
# Steps whose forward is checked for taps that did not run or failed: a compiled graph holds
# a tap from its first forward on or never, and an eager hook runs on every forward.
CHECKED_STEPS = 4


@dataclass(frozen=True)
class ProbeStats:
    rank: int
    world_size: int
    steps: int  # engine steps seen
    component_ids: tuple[int, ...]  # the columns this rank ships
    shipper: ShipperStats
    status: ProbeStatus  # on or off, and the faults so far by reason
    sample_level: float  # the latency budget's, see sidecar.probe.host.budget


class WorkerProbe:
    def __init__(
        self,
        spec: CircuitSpec,
        taps: TapSet,
        drain: Drain,
        ship: Callable[[Resolve], Shipper],
        rank: int,
        trace_parents: TraceParents,
        health: ProbeHealth,
        budget: Budget,
        fault: FaultInjection | None = None,
    ):
        """``ship(resolve)``: the shipper, given the function that builds its batches."""
        self.spec = spec
        self.health = health
        self.fault = fault  # test hook, see health.FaultInjection
        self.budget = budget
        self.trace_parents = trace_parents
        self.taps = taps
        self.drain = drain
        self.shipper = ship(self._resolve)
        self.rank = rank
        self.steps = 0
        self._checked = 0  # forwards checked for taps that did not run

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
            dtype=engine.dtype,
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
            engine_id=engine.engine_id,
        )
        # Room for a few forwards' worth of steps while the shipper gathers and sends.
        ring_rows = RING_FORWARDS * engine.max_tokens_per_forward
        trace_parents = TraceParents()
        budget = _budget(config, spec, engine)
        drain = Drain(
            taps, identity, config.sample, drops, ring_rows, trace_parents.take, budget.take
        )
        health = ProbeHealth()
        fault = config.fault
        if fault is not None:
            logger.warning("circuitwatch: injecting fault %s (CIRCUITWATCH_FAULT)", fault)
            taps.inject(fault.point)
        ship = functools.partial(
            Shipper,
            config.endpoint,
            capacity=config.queue_size,
            drops=drops,
            cpus=spare_cpus(),
            linger_s=config.linger_ms / 1000,
            max_tokens=max(1, MESSAGE_BYTES // row_bytes(len(taps.component_ids))),
            status=health.status,
            empty=drain.empty,
            security=config.security,
        )
        probe = cls(spec, taps, drain, ship, engine.rank, trace_parents, health, budget, fault)
        logger.info(
            "circuitwatch: rank %d/%d taps %d sites, ships %d of %d components to %s",
            engine.rank,
            engine.world_size,
            len(taps.taps),
            len(taps.component_ids),
            len(spec.components),
            config.endpoint,
        )
        return probe

    def after_step(self, runner: Any, scheduler_output: Any, started: float) -> None:
        """Drain this step into the shipper. Never raises: a failure turns the probe off.

        ``started``: when the worker's ``execute_model`` was entered (``time.perf_counter``).
        """
        if not self.health.enabled:
            return
        entered = time.perf_counter()
        self.steps += 1
        try:
            level = self.budget.level
            if level < 1.0 and plain_decode(scheduler_output):
                # Decode steps are sampled whole (see budget.py): most cost nothing more.
                if not self.budget.keeps_step(self.steps):
                    return
                level = 1.0
            step = read_step(runner, scheduler_output)
            for request_id, traceparent in step.trace_contexts:
                self.trace_parents.remember(request_id, traceparent)
            if step.layout is not None:
                layout = step.layout
            elif step.finished:
                layout = StepLayout.empty()
            else:
                return
            if layout.num_tokens and self._checked < CHECKED_STEPS:
                self._checked += 1
                self.taps.check()  # raises ProbeFault naming the tap and the reason
            if self.fault is not None:
                self.fault.check("collect", self.steps)
            pending = self.drain.collect(
                self.steps, layout, step.finished, dict(step.prefix_cached), level
            )
            if pending is not None:
                self.shipper.submit(pending)
        except Exception as error:
            self._fail(error.reason if isinstance(error, ProbeFault) else DRAIN_COLLECT, error)
        finally:
            self.budget.record(StepTimes(started, entered, time.perf_counter()))

    def _resolve(self, steps: list[PendingStep]) -> TokenBatch | None:
        """``Drain.resolve`` on the shipper thread; a failure turns the probe off."""
        if self.health.enabled:
            try:
                if self.fault is not None:
                    self.fault.check("resolve", steps[-1].step)
                return self.drain.resolve(steps)
            except Exception as error:
                self._fail(DRAIN_RESOLVE, error)
        # Drained and never to be scored: counted as dropped, so the books still balance.
        self.drain.drops.add(PROBE_OFF, sum(p.tokens for p in steps))
        for pending in steps:
            pending.discard()
        return None

    def _fail(self, reason: str, error: BaseException) -> None:
        self.health.fail(reason, error)
        self.shipper.wake()

    def inject(self, fault: FaultInjection) -> None:
        """Test hook: arm ``fault`` (a runtime point: collect or resolve) from now on."""
        self.fault = fault

    def close(self, timeout_s: float = 2.0) -> None:
        self.shipper.close(timeout_s)

    def stats(self) -> ProbeStats:
        return ProbeStats(
            rank=self.rank,
            world_size=self.drain.identity.world_size,
            steps=self.steps,
            component_ids=tuple(int(i) for i in self.taps.component_ids),
            shipper=self.shipper.stats(),
            status=self.health.status(),
            sample_level=self.budget.level,
        )


def _budget(config: ProbeConfig, spec: CircuitSpec, engine: EngineView) -> Budget:
    """The probe's budget, its in-graph cost estimated from the spec and logged."""
    cost = graph_cost(spec, engine.hf_config)
    every_token = config.sample.fraction == 1.0  # asked for explicitly: never thinned
    # Under tensor parallelism every rank ships its own columns of the same tokens, so all
    # must keep the same rows; each rank times its own work, so each would pick its own
    # level, and agreeing on one takes a cross-rank exchange that blocks the engine thread.
    # There the level stays at 1. On a GPU it adapts: rows are chosen on the host (drain.py).
    adaptive = engine.world_size == 1 and not every_token
    logger.info(
        "circuitwatch: in-graph cost estimate %.2g of the model's FLOPs per token "
        "(%.3g MFLOP probe, %.3g MFLOP model), about %d kernels per forward; budget %.3g "
        "of step time, sampling level %s",
        cost.share,
        cost.probe_flops_per_token / 1e6,
        cost.model_flops_per_token / 1e6,
        cost.kernels,
        config.budget,
        "adapts to it"
        if adaptive
        else "fixed at 1 (every token asked for, or tensor parallel: see budget.py)",
    )
    if cost.share > config.budget:
        logger.error(
            "circuitwatch: THE SPEC ALONE EXCEEDS THE LATENCY BUDGET: its taps' arithmetic is "
            "estimated at %.3g of the model's, above CIRCUITWATCH_BUDGET=%.3g, before any "
            "host work; sampling cannot lower it (every token runs through the taps). "
            "Watch fewer components or sites, or raise the budget.",
            cost.share,
            config.budget,
        )
    return Budget(config.budget, cost.share, adaptive)


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

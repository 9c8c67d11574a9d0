"""A probe's faults without an engine: counted, logged once; a failing tap under torch.compile
traced as one that only reports it; a probe turned off telling every sidecar it reaches; and
the sidecar's metrics of it, each fault counted once across reconnects."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from probe_engine_helpers import CollectingServer
from test_probe_drain import make_drain, run_step
from test_probe_shipper import Step, resolve, wait_until
from test_server_grpc import MODEL, Engine, scrape, send, start, value
from torch import nn

from sidecar.models.registry import REFERENCE_SPEC
from sidecar.probe.config import ENV_ENDPOINT, ENV_FAULT, ENV_SPEC, ProbeConfig
from sidecar.probe.graph.reduce import SiteReducer, SiteShard
from sidecar.probe.graph.taps import PositionTap, Tap, TapSet
from sidecar.probe.host.budget import Budget
from sidecar.probe.host.health import (
    DRAIN_COLLECT,
    DRAIN_RESOLVE,
    HEALTHY,
    PROBE_OFF,
    SITE_MISSING,
    SITE_SHAPE,
    TAP_ERROR,
    FaultInjection,
    InjectedFault,
    ProbeFault,
    ProbeHealth,
)
from sidecar.probe.host.shipper import Shipper
from sidecar.probe.runtime import TraceParents, WorkerProbe
from sidecar.protocol.batch import PROMPT, TokenBatch
from sidecar.spec.load import load_spec
from sidecar.spec.schema import Component, ComponentKind
from sidecar.spec.sites import Site

D, ROWS = 8, 16


def test_the_first_fault_turns_the_probe_off_and_each_reason_is_logged_once(caplog):
    health = ProbeHealth()
    assert health.enabled and health.status() == HEALTHY
    with caplog.at_level(logging.ERROR, logger="sidecar.probe.host.health"):
        for _ in range(3):
            health.fail(DRAIN_COLLECT, RuntimeError("boom"))
        health.fail(DRAIN_RESOLVE, ProbeFault(DRAIN_RESOLVE, "bad batch"))
    assert not health.enabled
    assert health.status().errors_total == {DRAIN_COLLECT: 3, DRAIN_RESOLVE: 1}
    assert len(caplog.records) == 2
    assert caplog.records[0].exc_info is not None  # an unexpected error: its traceback
    assert caplog.records[1].exc_info is None  # the probe's own finding says all


@pytest.mark.parametrize(
    "text, point, step",
    [("collect", "collect", 1), ("resolve@20", "resolve", 20), ("site_missing", "site_missing", 1)],
)
def test_fault_injection_parses(text, point, step):
    assert FaultInjection.parse(text) == FaultInjection(point, step)


@pytest.mark.parametrize(
    "text", ["nowhere", "collect@x", "collect@0", "tap_error@3", "collect@-1"]
)  # fmt: skip
def test_a_bad_fault_injection_is_refused(text):
    with pytest.raises(ValueError):
        FaultInjection.parse(text)


def test_an_injected_fault_fires_at_its_point_from_its_step_on():
    fault = FaultInjection("collect", 3)
    fault.check("collect", 2)
    fault.check("resolve", 5)
    with pytest.raises(InjectedFault):
        fault.check("collect", 3)


def test_the_fault_hook_is_read_from_the_environment():
    env = {ENV_SPEC: "spec.yaml", ENV_ENDPOINT: "unix:///s.sock"}
    assert ProbeConfig.from_env(env).fault is None
    assert ProbeConfig.from_env({**env, ENV_FAULT: "resolve@7"}).fault == FaultInjection(
        "resolve", 7
    )
    with pytest.raises(ValueError, match=ENV_FAULT):
        ProbeConfig.from_env({**env, ENV_FAULT: "everywhere"})


class Layer(nn.Module):
    """Stands in for a decoder layer: the site is its output, [T, D]."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear(x))


def _output(args, kwargs, output):
    return output


def _past_the_arguments(args, kwargs, output):
    return args[3]  # the hook has one argument: IndexError, as a site that changed would


def tapped_model(extract=_output, fault: str | None = None) -> tuple[nn.Module, TapSet]:
    """Two layers, a real tap (a direction's reducer) on the first one's output."""
    torch.manual_seed(0)
    model = nn.Sequential(Layer(), Layer())
    site = Site.parse("blocks.0.hook_resid_post")
    direction = np.linspace(-1, 1, D).astype(np.float32)
    component = Component("d", ComponentKind.DIRECTION, site, None, direction, 0.5)
    reducer = SiteReducer([(0, component)], SiteShard(D, slice(0, D), replicated=True))
    store = torch.zeros(ROWS, reducer.num_columns)
    tap = Tap(site, extract, reducer, store, 0, D)
    model[0].add_module("circuitwatch_resid_post", tap)
    handle = model[0].register_forward_hook(tap.record_output, with_kwargs=True)
    taps = TapSet([tap], store, PositionTap(ROWS), np.array([0]), np.zeros(1, np.uint32), [handle])
    if fault is not None:
        taps.inject(fault)
    return model, taps


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize(
    "fault, extract, reason",
    [
        (None, _output, None),
        ("tap_error", _output, TAP_ERROR),
        ("site_shape", _output, SITE_SHAPE),
        ("site_missing", _output, SITE_MISSING),
        (None, _past_the_arguments, TAP_ERROR),
    ],
)
def test_a_failing_tap_still_compiles_and_runs_and_the_check_names_it(mode, fault, extract, reason):
    model, taps = tapped_model(extract, fault)
    run = model
    if mode == "compiled":  # fullgraph as vLLM compiles: a tap that broke the graph would fail
        torch._dynamo.reset()
        run = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=True)
    for tokens in (5, 9):
        x = torch.randn(tokens, D)
        with torch.no_grad():
            out = run(x)
            site = torch.tanh(model[0].linear(x))
            expected = torch.tanh(model[1].linear(site))
        torch.testing.assert_close(out, expected)  # the model serves either way
        if reason is None:
            taps.check()
            want = site @ torch.linspace(-1, 1, D) + 0.5
            torch.testing.assert_close(taps.values[:tokens, 0], want)
        else:
            with pytest.raises(ProbeFault) as raised:
                taps.check()
            assert raised.value.reason == reason


def _empty() -> TokenBatch:
    batch = resolve([Step(1)])
    return TokenBatch(
        spec_hash=batch.spec_hash,
        model_name=batch.model_name,
        steps=(),
        component_ids=batch.component_ids,
        request_ids=[],
        request_index=np.zeros(0, np.uint32),
        positions=np.zeros(0, np.int32),
        phases=np.zeros(0, np.uint8),
        values=np.zeros((0, 2), np.float32),
    )


def test_a_probe_turned_off_tells_the_sidecar_and_every_sidecar_after_it(tmp_path: Path):
    socket_path = tmp_path / "ingest.sock"
    health = ProbeHealth()
    server = CollectingServer(socket_path, 2)
    shipper = Shipper(f"unix://{socket_path}", resolve, status=health.status, empty=_empty)
    try:
        shipper.submit(Step(1))
        assert wait_until(lambda: len(server.batches) == 1)
        assert not server.batches[0].probe_off and server.batches[0].probe_errors_total == {}
        health.fail(DRAIN_COLLECT, RuntimeError("boom"))
        shipper.wake()
        assert wait_until(lambda: len(server.batches) == 2)
        status = server.batches[1]
        assert status.is_status and status.probe_off
        assert status.probe_errors_total == {DRAIN_COLLECT: 1}
        server.stop()
        # A sidecar started after the fault learns of it, though no step comes any more.
        server = CollectingServer(socket_path, 2)
        assert wait_until(lambda: len(server.batches) == 1, timeout_s=5)
        assert server.batches[0].probe_off
    finally:
        shipper.close(timeout_s=2)
        server.stop()


def test_a_failing_resolve_turns_the_probe_off_and_what_it_held_counts_as_dropped(tmp_path):
    """The probe's own resolve on the shipper thread, a real drain, shipper and gRPC server."""
    drain, taps, drops = make_drain()
    socket_path = tmp_path / "ingest.sock"
    server = CollectingServer(socket_path, 5)
    health = ProbeHealth()
    ship = functools.partial(
        Shipper, f"unix://{socket_path}", drops=drops, status=health.status, empty=drain.empty
    )
    fault = FaultInjection("resolve", from_step=2)
    spec = load_spec(REFERENCE_SPEC)
    budget = Budget(0.005, adaptive=False)
    probe = WorkerProbe(spec, taps, drain, ship, 0, TraceParents(), health, budget, fault)
    try:
        probe.shipper.submit(run_step(drain, taps, 1, [("a-0000000a", 3, [0, 1, 2])]))
        assert wait_until(lambda: len(server.batches) == 1)
        assert server.batches[0].num_tokens == 3 and not server.batches[0].probe_off
        probe.shipper.submit(run_step(drain, taps, 2, [("a-0000000a", 3, [3])]))
        assert wait_until(lambda: len(server.batches) == 2)
        status = server.batches[1]
        assert status.is_status and status.probe_off
        assert status.probe_errors_total == {DRAIN_RESOLVE: 1}
        assert status.dropped_total == {PROBE_OFF: 1}  # step 2's one token, never scored
        assert drain.ring.in_use() == 0  # its rows were given back
    finally:
        probe.close()
        server.stop()


def _status(engine: Engine, errors: dict[str, int], rank: int = 0) -> TokenBatch:
    batch = engine.batch([], rank=rank, world_size=2, probe_off=True, probe_errors_total=errors)
    batch.steps = ()
    return batch


def test_the_sidecar_exports_the_probe_state_and_counts_each_fault_once(tmp_path):
    engine = Engine()
    with start(tmp_path) as sidecar:
        send(sidecar.address, [engine.batch([("a", 0, PROMPT)])])
        samples = scrape(sidecar.metrics_url)
        assert value(samples, "circuitwatch_probe_enabled", model_name=MODEL, rank="0") == 1
        # Rank 1 turns off; it says so again on a second stream, as after a reconnect.
        send(sidecar.address, [_status(engine, {DRAIN_COLLECT: 1}, rank=1)] * 2)
        send(sidecar.address, [_status(engine, {DRAIN_COLLECT: 1}, rank=1)])
        samples = scrape(sidecar.metrics_url)
        enabled = value(samples, "circuitwatch_probe_enabled", model_name=MODEL, rank="1")
        errors = value(
            samples, "circuitwatch_probe_errors_total", model_name=MODEL, rank="1",
            reason=DRAIN_COLLECT,
        )  # fmt: skip
        assert (enabled, errors) == (0, 1)
        # Totals add only what is new, whichever stream brings them.
        send(sidecar.address, [_status(engine, {DRAIN_COLLECT: 1, SITE_MISSING: 2}, rank=1)])
        send(sidecar.address, [_status(engine, {DRAIN_COLLECT: 1, SITE_MISSING: 2}, rank=1)])
        samples = scrape(sidecar.metrics_url)
        counts = {
            reason: value(
                samples,
                "circuitwatch_probe_errors_total",
                model_name=MODEL,
                rank="1",
                reason=reason,
            )  # fmt: skip
            for reason in (DRAIN_COLLECT, SITE_MISSING)
        }
        assert counts == {DRAIN_COLLECT: 1, SITE_MISSING: 2}
        # A status message is not a sample batch.
        assert value(samples, "circuitwatch_batches_received_total", model_name=MODEL) == 1

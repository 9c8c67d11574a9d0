"""The latency budget without an engine: the sampling it sets (unbiased, no request starved),
its controller and clock, the drain copying only the rows it keeps, the overhead report on
the wire and in the sidecar's metrics, and the in-graph cost estimate."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from test_probe_drain import make_drain, run_step

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.config import ENV_BUDGET, ProbeConfig
from sidecar.probe.host.attribution import SpreadSample, request_offset
from sidecar.probe.host.budget import (
    DEFAULT_BUDGET,
    IDLE_GAP_S,
    MIN_LEVEL,
    WINDOW_STEPS,
    Budget,
    StepTimes,
    next_level,
)
from sidecar.probe.vllm_internals import StepLayout, plain_decode
from sidecar.protocol.batch import MalformedBatch, ProbeOverhead, from_message, to_message
from sidecar.protocol.circuitwatch.v1 import ingest_pb2
from sidecar.server.metrics import SidecarMetrics
from sidecar.spec.cost import graph_cost, model_flops_per_token
from sidecar.spec.load import load_spec


def one_request_step(request_id: str, prompt_len: int, positions: list[int]):
    """A step of one request's consecutive ``positions``, and those positions."""
    layout = StepLayout(
        [request_id], np.array([len(positions)]), np.array([prompt_len]), np.array(positions[:1])
    )
    return layout, np.array(positions)


def kept_positions(sampler: SpreadSample, request_id: str, prompt_len: int, total: int,
                   level: float, chunk: int = 7) -> np.ndarray:  # fmt: skip
    """Positions of a request of ``total`` tokens kept at ``level``, fed in chunks of ``chunk``
    tokens while in the prompt and one at a time after it, as the engine feeds them."""
    kept, position = [], 0
    while position < total:
        n = min(chunk, prompt_len - position) if position < prompt_len else 1
        chunk_positions = list(range(position, position + n))
        layout, positions = one_request_step(request_id, prompt_len, chunk_positions)
        kept.extend(positions[sampler.select(layout, level)])
        position += n
    return np.array(kept, dtype=np.int64)


def test_each_token_is_kept_with_probability_the_level_so_request_means_are_unbiased():
    """Over many requests, every position is kept at the level's rate, and a request's
    sampled mean of a value that trends with position (as scores do over a generation)
    equals its true mean on average; keeping the first tokens, as a naive cap does, would
    not."""
    rng = np.random.default_rng(0)
    level, prompt_len, total = 0.125, 16, 80
    sampler = SpreadSample()
    hits = np.zeros(total)
    errors, naive_errors = [], []
    for i in range(2000):
        values = np.arange(total) * 0.1 + rng.normal(0, 1, total)  # drifts with position
        kept = kept_positions(sampler, f"req-{i}", prompt_len, total, level)
        hits[kept] += 1
        generated = kept[kept >= prompt_len]
        errors.append(values[generated].mean() - values[prompt_len:].mean())
        naive = np.arange(prompt_len, prompt_len + generated.shape[0])
        naive_errors.append(values[naive].mean() - values[prompt_len:].mean())
    rate = hits / 2000
    np.testing.assert_allclose(rate[prompt_len:], level, atol=0.03)  # every generated position
    np.testing.assert_allclose(rate[:prompt_len], level, atol=0.03)  # 1/16 < level: no boost
    assert abs(np.mean(errors)) < 0.05  # the true means differ by ~3 from the naive ones
    assert abs(np.mean(naive_errors)) > 1.0  # a test that a biased sample fails


def test_the_walk_over_a_chunk_keeps_what_the_per_token_rule_keeps():
    """select walks the integers of each chunk; the rule it implements tests every token."""
    rng = np.random.default_rng(1)
    sampler = SpreadSample()
    for i in range(300):
        level = float(rng.choice([1.0, 0.5, 0.3, 0.01, MIN_LEVEL]))
        prompt_len, first, n = (int(v) for v in rng.integers(1, 60, size=3))
        layout, positions = one_request_step(f"w{i}", prompt_len, list(range(first, first + n)))
        start = request_offset(f"w{i}")
        x = positions.astype(np.float64)
        rate = np.where(x < prompt_len, max(level, 1 / prompt_len), level)
        expected = np.flatnonzero(np.floor((x + 1) * rate + start) > np.floor(x * rate + start))
        np.testing.assert_array_equal(sampler.select(layout, level), expected)


def test_no_request_is_starved_and_a_request_gets_its_share_exactly():
    sampler = SpreadSample()
    for i in range(500):
        prompt_len = 1 + i % 9
        generated = 3 + i % 40
        kept = kept_positions(sampler, f"r{i}", prompt_len, prompt_len + generated, MIN_LEVEL)
        assert (kept < prompt_len).sum() >= 1  # every request has a sampled prompt token
        gen = (kept >= prompt_len).sum()
        assert math.floor(generated * MIN_LEVEL) <= gen <= math.ceil(generated * MIN_LEVEL)
    for i in range(200):  # at a higher level, each request's count is floor or ceil of L·p
        kept = kept_positions(sampler, f"s{i}", 20, 20 + 37, 0.3)
        assert (kept >= 20).sum() in (math.floor(37 * 0.3), math.ceil(37 * 0.3))


def test_a_tokens_fate_does_not_depend_on_how_the_steps_cut_the_request():
    sampler = SpreadSample()
    whole = kept_positions(sampler, "x-1", 64, 100, 0.2, chunk=64)
    chunked = kept_positions(sampler, "x-1", 64, 100, 0.2, chunk=5)
    np.testing.assert_array_equal(whole, chunked)
    # Requests sharing a step are each sampled on their own positions.
    layout = StepLayout(["x-1", "y-2"], np.array([3, 1]), np.array([64, 4]))
    positions = np.array([10, 11, 12, 30])
    kept = sampler.select(layout, 1.0, positions)
    assert kept.tolist() == [0, 1, 2, 3]


def test_rows_chosen_from_the_layout_are_those_the_positions_would_choose():
    """Where each request starts in the step, read from the scheduler's output on the host
    (what a GPU engine uses: no read of device memory), keeps exactly the rows that reading
    the positions the model saw keeps; positions given with such a layout are not read."""
    rng = np.random.default_rng(2)
    sampler = SpreadSample()
    kept = 0
    for i in range(300):
        r = int(rng.integers(1, 12))
        scheduled, prompt_lens = rng.integers(1, 40, size=r), rng.integers(1, 100, size=r)
        computed = rng.integers(0, 150, size=r)
        ids = [f"q{i}-{j}" for j in range(r)]
        level = float(rng.choice([0.5, 0.3, 0.1, MIN_LEVEL]))
        padding = np.zeros(int(rng.integers(0, 8)), np.int64)
        positions = np.concatenate(
            [np.arange(c, c + n) for c, n in zip(computed, scheduled, strict=True)] + [padding]
        )
        layout = StepLayout(ids, scheduled, prompt_lens, computed)
        from_layout = sampler.select(layout, level)
        from_positions = sampler.select(replace(layout, num_computed=None), level, positions)
        np.testing.assert_array_equal(from_layout, from_positions)
        np.testing.assert_array_equal(sampler.select(layout, level, positions + 7), from_layout)
        kept += from_layout.shape[0]
    assert kept > 300  # the comparisons were about rows, not only empty selections
    with pytest.raises(ValueError, match="num_computed or the positions"):
        sampler.select(replace(layout, num_computed=None), 0.5)


def test_the_drain_chooses_rows_from_the_layout_not_from_the_positions_buffer():
    """On a GPU the positions buffer is device memory: the drain must not read it to choose."""
    drain, taps, _ = make_drain()
    # "a" generates at 20..24; "b" starts its 3-token prompt, so it keeps one prompt token.
    layout = StepLayout(
        ["a-0000000a", "b-0000000b"], np.array([5, 3]), np.array([4, 3]), np.array([20, 0])
    )
    taps.positions.positions[:8] = torch.arange(200, 208)  # what the layout does not say
    pending = drain.collect(1, layout, [], None, MIN_LEVEL)
    expected = SpreadSample().select(layout, MIN_LEVEL)
    assert 5 <= expected[-1] < 8  # b's prompt token
    np.testing.assert_array_equal(pending.kept_rows(), expected)
    buffer = taps.positions.positions.numpy()
    from_buffer = SpreadSample().select(replace(layout, num_computed=None), MIN_LEVEL, buffer)
    assert from_buffer.tolist() != expected.tolist()  # reading the buffer would differ


def test_the_controller_halves_over_budget_grows_under_it_and_holds_between():
    assert next_level(1.0, 0.02, 0.01) == 0.5
    assert next_level(0.5, 0.001, 0.01) == 0.625
    assert next_level(0.5, 0.008, 0.01) == 0.5
    assert next_level(MIN_LEVEL, 1.0, 0.01) == MIN_LEVEL
    assert next_level(1.0, 0.0, 0.01) == 1.0


def steps(budget: Budget, n: int, probe_s: float, step_s: float, start: float = 0.0) -> float:
    """``n`` busy steps of ``step_s`` seconds whose probe work takes ``probe_s``."""
    t = start
    for _ in range(n):
        budget.record(StepTimes(t, t + step_s - probe_s, t + step_s))
        t += step_s
    return t


def test_the_budget_moves_the_level_per_window_and_reports_each_batchs_overhead():
    budget = Budget(0.01, graph_share=1e-4)
    t = steps(budget, WINDOW_STEPS - 1, probe_s=0.0005, step_s=0.01)  # 5 %: over
    assert budget.level == 1.0  # not before a full window
    t = steps(budget, 1, 0.0005, 0.01, t)
    assert budget.level == 0.5
    overhead = budget.take()
    assert overhead.ratio == pytest.approx(0.05)
    assert (overhead.budget, overhead.sample_level, overhead.graph_cost) == (0.01, 0.5, 1e-4)
    assert budget.take().step_seconds == 0.0  # taken once
    steps(budget, WINDOW_STEPS, 0.00001, 0.01, t)  # 0.1 %: under
    assert budget.level == 0.625
    fixed = Budget(0.01, adaptive=False)  # tensor parallel: measured, not adapted
    steps(fixed, 4 * WINDOW_STEPS, 0.0005, 0.01)
    assert fixed.level == 1.0 and fixed.take().ratio == pytest.approx(0.05)


def test_decode_steps_are_kept_one_in_stride_so_each_requests_tokens_are_evenly_spaced():
    budget = Budget(0.01)
    assert [budget.keeps_step(s) for s in range(1, 4)] == [True] * 3  # level 1: every step
    budget.level = 0.25
    assert budget.stride == 4
    kept_steps = [s for s in range(1, 41) if budget.keeps_step(s)]
    assert kept_steps == list(range(4, 41, 4))
    # A request that starts decoding at step 3 at position 17 advances one position a step.
    positions = [17 + s - 3 for s in kept_steps if s >= 3]
    assert np.diff(positions).tolist() == [4] * (len(positions) - 1)


def plain_step(new=(), finished=(), tokens=None):
    tokens = tokens or {"a": 1, "b": 1}
    return SimpleNamespace(scheduled_new_reqs=list(new), finished_req_ids=set(finished),
                           num_scheduled_tokens=tokens,
                           total_num_scheduled_tokens=sum(tokens.values()))  # fmt: skip


def test_a_plain_decode_step_is_told_apart_from_one_that_starts_finishes_or_prefills():
    assert plain_decode(plain_step())
    assert not plain_decode(plain_step(new=["c"]))
    assert not plain_decode(plain_step(finished=["a"]))
    assert not plain_decode(plain_step(tokens={"a": 1, "b": 7}))


def test_idle_time_between_steps_is_not_step_time():
    budget = Budget(0.01)
    budget.record(StepTimes(0.0, 0.009, 0.01))
    # The next step starts after 5 s of idle: its own 10 ms count, not the 5 s.
    budget.record(StepTimes(5.0, 5.009, 5.01))
    # A busy step: 2 ms of scheduling before execute_model belong to the step.
    budget.record(StepTimes(5.012, 5.021, 5.022))
    assert budget.take().step_seconds == pytest.approx(0.01 + 0.01 + 0.012)
    assert IDLE_GAP_S < 5.0


def test_below_level_one_the_drain_copies_only_the_rows_it_keeps():
    drain, taps, _ = make_drain(ring_rows=64)
    reference, reference_taps, _ = make_drain(ring_rows=64)
    requests = [("a-0000000a", 6, list(range(6))), ("b-0000000b", 2, [5])]
    pending = run_step(drain, taps, 1, requests)  # level 1: every row
    assert pending.tokens == 7
    drain.resolve([pending])
    layout = StepLayout(
        ["a-0000000a", "b-0000000b"], np.array([6, 1]), np.array([6, 2]), np.array([0, 5])
    )
    expected = SpreadSample().select(layout, 0.25)
    pending = drain_step_at(drain, taps, 2, requests, 0.25)
    assert 0 < pending.tokens == expected.shape[0] < 7  # the ring holds the kept rows only
    batch = drain.resolve([pending])
    all_rows = reference.resolve([run_step(reference, reference_taps, 2, requests)])
    np.testing.assert_array_equal(batch.positions, all_rows.positions[expected])
    np.testing.assert_array_equal(batch.values, all_rows.values[expected])
    np.testing.assert_array_equal(batch.phases, all_rows.phases[expected])
    assert [batch.request_ids[i] for i in batch.request_index] == [
        all_rows.request_ids[i] for i in all_rows.request_index[expected]
    ]
    assert drain.ring.in_use() == 0


def drain_step_at(drain, taps, step: int, requests, level: float, finished=()):
    """``run_step`` at a sampling level below 1."""
    collect = drain.collect
    drain.collect = lambda s, layout, f, cached: collect(s, layout, f, cached, level)
    try:
        return run_step(drain, taps, step, requests, finished)
    finally:
        drain.collect = collect


def test_a_step_left_with_no_rows_is_neither_copied_nor_queued_unless_a_request_finished():
    drain, taps, _ = make_drain()
    # A generated token kept at 1/64 only at one position in 64: find two that are not.
    sampler = SpreadSample()
    skipped = [
        p for p in range(1, 200)
        if not sampler.select(one_request_step("g-0000000a", 1, [p])[0], MIN_LEVEL).size
    ][:1]  # fmt: skip
    assert drain_step_at(drain, taps, 1, [("g-0000000a", 1, skipped)], MIN_LEVEL) is None
    finishing = drain_step_at(
        drain, taps, 2, [("g-0000000a", 1, skipped)], MIN_LEVEL, finished=["g-0000000a"]
    )
    assert finishing is not None and finishing.tokens == 0
    batch = drain.resolve([finishing])
    assert batch.finished_request_ids == ["g"] and batch.num_tokens == 0


def test_each_batch_carries_the_overhead_taken_once_for_it():
    taken = iter([ProbeOverhead(0.001, 0.1, 0.005, 0.5, 1e-4)])
    drain, taps, _ = make_drain()
    drain.overhead = lambda: next(taken)
    batch = drain.resolve([run_step(drain, taps, 1, [("a-0000000a", 2, [0, 1])])])
    assert batch.overhead == ProbeOverhead(0.001, 0.1, 0.005, 0.5, 1e-4)


def _wire_batch(overhead: ProbeOverhead | None):
    drain, taps, _ = make_drain()
    drain.overhead = lambda: overhead
    return drain.resolve([run_step(drain, taps, 1, [("a-0000000a", 2, [0, 1])])])


def test_the_overhead_report_round_trips_and_an_old_probe_sends_none():
    for overhead in (ProbeOverhead(0.002, 0.2, 0.005, 0.25, 3e-5), None):
        message = to_message(_wire_batch(overhead)).SerializeToString()
        assert from_message(ingest_pb2.SampleBatch.FromString(message), 5).overhead == overhead


@pytest.mark.parametrize(
    "field, value, reason",
    [
        ("probe_seconds", -1.0, "probe_seconds: -1.0"),
        ("probe_seconds", math.nan, "probe_seconds: nan"),
        ("budget", 2.0, "budget: 2.0 is not a share"),
        ("sample_level", 1.5, "sample_level: 1.5 is not a share"),
        ("step_seconds", math.inf, "step_seconds: inf"),
    ],
)
def test_a_malformed_overhead_report_is_rejected_with_the_reason(field, value, reason):
    message = to_message(_wire_batch(ProbeOverhead(0.002, 0.2, 0.005, 0.25, 3e-5)))
    setattr(message, field, value)
    with pytest.raises(MalformedBatch, match=reason):
        from_message(message, 5)


def test_the_sidecar_exports_the_overhead_by_model_and_rank():
    registry = CollectorRegistry()
    metrics = SidecarMetrics(registry, load_spec(REFERENCE_SPEC).circuits)
    metrics.probe_overhead("m", 1, ProbeOverhead(0.003, 0.1, 0.005, 0.5, 2e-4))
    labels = {"model_name": "m", "rank": "1"}
    value = registry.get_sample_value
    assert value("circuitwatch_probe_overhead_ratio_count", labels) == 1
    assert value("circuitwatch_probe_overhead_ratio_sum", labels) == pytest.approx(0.03)
    assert value("circuitwatch_probe_overhead_ratio_bucket", {**labels, "le": "0.02"}) == 0
    assert value("circuitwatch_probe_overhead_ratio_bucket", {**labels, "le": "0.05"}) == 1
    assert value("circuitwatch_probe_budget_ratio", labels) == 0.005
    assert value("circuitwatch_probe_sample_level", labels) == 0.5
    assert value("circuitwatch_probe_graph_cost_ratio", labels) == 2e-4


def test_the_budget_setting_reads_from_the_environment_with_a_documented_default():
    env = {"CIRCUITWATCH_SPEC": "s.yaml", "CIRCUITWATCH_ENDPOINT": "unix:///x.sock"}
    assert ProbeConfig.from_env(env).budget == DEFAULT_BUDGET == 0.005
    assert ProbeConfig.from_env({**env, ENV_BUDGET: "0.02"}).budget == 0.02
    for bad in ("0", "1.5", "lots"):
        with pytest.raises(ValueError, match=ENV_BUDGET):
            ProbeConfig.from_env({**env, ENV_BUDGET: bad})


def test_the_in_graph_cost_counts_the_specs_flops_against_the_models():
    spec = load_spec(REFERENCE_SPEC)
    config = json.loads((REFERENCE_DIR / "config.json").read_text())
    cost = graph_cost(spec, config)
    d, layers, mlp = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, dh, vocab = config["num_attention_heads"], config["head_dim"], config["vocab_size"]
    kv = config.get("num_key_value_heads", heads)
    per_layer = d * heads * dh * 2 + d * kv * dh * 2 + 3 * d * mlp + 2 * d
    parameters = layers * per_layer + d + vocab * d * (1 if config["tie_word_embeddings"] else 2)
    lookup = 0 if config["tie_word_embeddings"] else vocab * d
    assert model_flops_per_token(config) == 2 * (parameters - lookup)
    # Layer 1's 4 heads by norm are adjacent but span 4 heads: a batched product over their
    # own columns (2·64·64 each); layer 0's head 0 alone joins its site's one product (the
    # same 2·64·64); one direction on the residual stream (2·256) and the sum of vLLM's
    # hidden and residual there (256). Kernels: the position tap, 3 per site, 3 more for
    # the batched norms, 1 for the residual sum.
    assert cost.probe_flops_per_token == 5 * (2 * dh * dh) + 2 * d + d
    assert cost.share == cost.probe_flops_per_token / cost.model_flops_per_token
    assert cost.kernels == 1 + 3 * 3 + 3 + 1
    # A model this small (2.9 MFLOP per token) makes the spec cost 1.5%, above the default
    # budget: the probe says so loudly at start.
    assert cost.share > DEFAULT_BUDGET
    doubled = graph_cost(spec, {**config, "intermediate_size": 2 * mlp})
    assert doubled.model_flops_per_token > cost.model_flops_per_token

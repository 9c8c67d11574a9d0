"""Token attribution, sampling, request ids and the probe's environment settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sidecar.probe.config import ProbeConfig
from sidecar.probe.host.attribution import (
    RequestIds,
    SamplePolicy,
    StepIds,
    TokenRows,
    attribute,
)
from sidecar.probe.vllm_internals import StepLayout, external_request_id
from sidecar.protocol.batch import GENERATED, PROMPT


def layout(req_ids, scheduled, prompts) -> StepLayout:
    return StepLayout(list(req_ids), np.array(scheduled), np.array(prompts))


def test_mixed_step_is_attributed_request_by_request_and_padding_is_dropped():
    # "a" decodes its 6th token, "b" runs a 4-token prefill chunk that crosses nothing,
    # "c" finishes its prompt (positions 3..4 of 5) and the step is padded to 10 tokens.
    step = layout(["a", "b", "c"], [1, 4, 2], [3, 8, 5])
    positions = np.array([5, 0, 1, 2, 3, 3, 4, 0, 0, 0])
    rows = attribute(step, positions)
    assert rows.request_index.tolist() == [0, 1, 1, 1, 1, 2, 2]
    assert rows.positions.tolist() == [5, 0, 1, 2, 3, 3, 4]
    assert rows.phases.tolist() == [GENERATED] + [PROMPT] * 6
    assert rows.request_index.dtype == np.uint32 and rows.positions.dtype == np.int32


def test_phase_switches_at_the_prompt_length():
    # A request whose prefill chunk runs past its prompt: possible after preemption,
    # when vLLM recomputes prompt and generated tokens together.
    rows = attribute(layout(["r"], [4], [2]), np.array([0, 1, 2, 3]))
    assert rows.phases.tolist() == [PROMPT, PROMPT, GENERATED, GENERATED]


def test_too_few_positions_is_an_error():
    with pytest.raises(ValueError, match="3 positions for a step of 4"):
        attribute(layout(["r"], [4], [2]), np.array([0, 1, 2]))


@pytest.mark.parametrize(
    ("internal", "external"),
    [
        ("0-1a2b3c4d", "0"),
        ("chatcmpl-abc-9f8e7d6c", "chatcmpl-abc"),
        ("cmpl-xyz-0-00ff00ff", "cmpl-xyz-0"),
        ("no-suffix", "no-suffix"),
        ("upper-ABCDEF12", "upper-ABCDEF12"),
    ],
)
def test_external_request_id_strips_the_engine_suffix(internal, external):
    assert external_request_id(internal) == external


def test_external_request_id_keeps_ids_when_vllm_does_not_randomize():
    assert external_request_id("user-1a2b3c4d", randomized=False) == "user-1a2b3c4d"


def test_concurrent_requests_with_one_caller_id_are_exported_apart():
    ids = RequestIds()
    # Two requests the caller named "job" run together; a third, "other", alongside.
    first = ids.step(["job-0000000a", "other-0000000c"], [])
    second = ids.step(["job-0000000a", "job-0000000b", "other-0000000c"], [])
    assert first.req_ids == ["job", "other"]
    assert second.req_ids == ["job", "job-0000000b", "other"]  # the later one: its engine id
    # Each keeps its name until it finishes, and finishes under it.
    done = ids.step(["job-0000000b"], ["job-0000000a"])
    assert done == StepIds(["job-0000000b"], ["job"])
    assert ids.step([], ["job-0000000b"]).finished == ["job-0000000b"]
    # "job" is free again: the next request of that name gets it.
    assert ids.step(["job-0000000d"], []).req_ids == ["job"]


def test_a_request_starting_as_its_namesake_finishes_is_not_read_as_it():
    ids = RequestIds()
    ids.step(["job-0000000a"], [])
    step = ids.step(["job-0000000b"], ["job-0000000a"])
    assert step.req_ids == ["job-0000000b"] and step.finished == ["job"]
    assert ids.step(["job-0000000b"], []).req_ids == ["job-0000000b"]  # stable for its life


def test_exported_ids_are_unique_among_live_requests_whatever_the_caller_ids():
    ids = RequestIds()
    # Callers naming requests after other requests' engine ids: the last one's caller id
    # and its engine id are both taken.
    engine_ids = ["q-0000000b-0000000c-0000000d", "q-0000000a", "q-0000000b", "q-0000000b-0000000c"]
    names = ids.step(engine_ids, []).req_ids
    assert names == ["q-0000000b-0000000c", "q", "q-0000000b", "q-0000000b-0000000c#2"]


def test_a_finish_never_seen_running_does_not_finish_its_live_namesake():
    ids = RequestIds()
    ids.step(["job-0000000a"], [])
    assert ids.step([], ["job-0000000f"]).finished == ["job-0000000f"]
    assert ids.step([], ["solo-0000000f"]).finished == ["solo"]
    assert ids.step(["job-0000000a"], []).req_ids == ["job"]


def test_request_ids_keep_engine_ids_when_vllm_does_not_randomize():
    ids = RequestIds(randomized=False)
    assert ids.step(["u-1a2b3c4d", "v"], []).req_ids == ["u-1a2b3c4d", "v"]


def test_live_requests_are_bounded():
    ids = RequestIds(max_live=2)
    ids.step(["a-0000000a", "b-0000000b"], [])
    ids.step(["c-0000000c"], [])  # evicts "a", whose finish was never seen
    assert ids.step(["a-0000000d"], []).req_ids == ["a"]


def rows_of(phases: list[int]) -> TokenRows:
    n = len(phases)
    return TokenRows(
        np.zeros(n, np.uint32), np.arange(n, dtype=np.int32), np.array(phases, np.uint8)
    )


def test_cap_keeps_generated_tokens_first_then_spreads_prompt_tokens():
    phases = [PROMPT] * 10 + [GENERATED] * 3 + [PROMPT] * 10
    keep = SamplePolicy(cap=7).select(rows_of(phases), ["r"], [len(phases)])
    assert keep.shape == (7,) and np.all(np.diff(keep) > 0)
    assert set(range(10, 13)) <= set(keep.tolist())
    prompt_kept = [i for i in keep if phases[i] == PROMPT]
    assert prompt_kept[0] < 10 < 13 <= prompt_kept[-1]  # spread over both prompt runs


def test_cap_above_the_step_keeps_everything_and_thins_generated_when_they_alone_exceed_it():
    keep = SamplePolicy(cap=50).select(rows_of([PROMPT] * 5), ["r"], [5])
    assert keep.tolist() == [0, 1, 2, 3, 4]
    keep = SamplePolicy(cap=4).select(rows_of([GENERATED] * 12), ["r"], [12])
    assert keep.tolist() == [0, 3, 6, 9]


def test_cap_applies_to_each_step_of_a_gathered_batch():
    # Three steps of 12, 2 and 6 generated tokens, cap 4: the first and last are thinned.
    keep = SamplePolicy(cap=4).select(rows_of([GENERATED] * 20), ["r"], [12, 2, 6])
    assert keep.tolist() == [0, 3, 6, 9, 12, 13, 14, 15, 17, 18]


def test_fraction_is_deterministic_per_token_whatever_the_batch():
    policy = SamplePolicy(fraction=0.3)
    alone = TokenRows(
        np.zeros(400, np.uint32), np.arange(400, dtype=np.int32), np.zeros(400, np.uint8)
    )
    kept_alone = set(alone.positions[policy.select(alone, ["req-a"], [400])].tolist())
    # The same request's tokens, now second in a batch with another request.
    mixed = TokenRows(
        np.repeat(np.array([0, 1], np.uint32), 400),
        np.tile(np.arange(400, dtype=np.int32), 2),
        np.zeros(800, np.uint8),
    )
    keep = policy.select(mixed, ["req-b", "req-a"], [800])
    kept_mixed = set(mixed.positions[keep[mixed.request_index[keep] == 1]].tolist())
    assert kept_alone == kept_mixed
    assert 80 < len(kept_alone) < 160  # about 30% of 400
    other = set(mixed.positions[keep[mixed.request_index[keep] == 0]].tolist())
    assert other != kept_alone  # a different request draws different tokens


@pytest.mark.parametrize(
    "policy", [SamplePolicy(fraction=0.3), SamplePolicy(cap=5), SamplePolicy(fraction=1.0)]
)
def test_count_is_what_select_keeps_of_the_step_the_model_runs(policy):
    # What a drop before the rows are read loses: the layout alone must tell.
    step = StepLayout(
        ["a-1", "b-2", "c-3"], np.array([40, 1, 3]), np.array([60, 9, 20]), np.array([0, 11, 17])
    )
    positions = np.concatenate([np.arange(40), [11], [17, 18, 19], np.zeros(4)])  # padded
    kept = policy.select(attribute(step, positions), step.req_ids, [44])
    assert policy.count(step) == kept.shape[0]


def test_fraction_one_keeps_everything():
    assert SamplePolicy(fraction=1.0).select(rows_of([0, 1, 0]), ["r"], [3]).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    ("text", "policy"),
    [("0.25", SamplePolicy(fraction=0.25)), ("1.0", SamplePolicy(fraction=1.0))]
    + [("256", SamplePolicy(cap=256)), (" 1 ", SamplePolicy(cap=1))],
)
def test_sample_policy_parses(text, policy):
    assert SamplePolicy.parse(text) == policy


@pytest.mark.parametrize("text", ["0", "0.0", "1.5", "-3", "all", ""])
def test_sample_policy_rejects(text):
    with pytest.raises(ValueError):
        SamplePolicy.parse(text)


def test_config_is_off_without_a_spec():
    assert ProbeConfig.from_env({}) is None
    assert ProbeConfig.from_env({"CIRCUITWATCH_ENDPOINT": "localhost:1"}) is None


def test_config_reads_the_environment_with_defaults():
    config = ProbeConfig.from_env(
        {"CIRCUITWATCH_SPEC": "/specs/a.yaml", "CIRCUITWATCH_ENDPOINT": "unix:///run/cw.sock"}
    )
    assert config == ProbeConfig(Path("/specs/a.yaml"), "unix:///run/cw.sock")
    assert config.sample == SamplePolicy(cap=512) and config.queue_size == 256
    assert config.linger_ms == 50.0
    config = ProbeConfig.from_env(
        {
            "CIRCUITWATCH_SPEC": "a.yaml",
            "CIRCUITWATCH_ENDPOINT": "localhost:50051",
            "CIRCUITWATCH_SAMPLE": "0.5",
            "CIRCUITWATCH_QUEUE_SIZE": "8",
            "CIRCUITWATCH_LINGER_MS": "0",
        }
    )
    assert config.sample == SamplePolicy(fraction=0.5) and config.queue_size == 8
    assert config.linger_ms == 0.0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "CIRCUITWATCH_ENDPOINT is not"),
        ({"CIRCUITWATCH_ENDPOINT": "x:1", "CIRCUITWATCH_SAMPLE": "lots"}, "CIRCUITWATCH_SAMPLE"),
        ({"CIRCUITWATCH_ENDPOINT": "x:1", "CIRCUITWATCH_QUEUE_SIZE": "big"}, "QUEUE_SIZE"),
        ({"CIRCUITWATCH_ENDPOINT": "x:1", "CIRCUITWATCH_QUEUE_SIZE": "0"}, "QUEUE_SIZE"),
        ({"CIRCUITWATCH_ENDPOINT": "x:1", "CIRCUITWATCH_LINGER_MS": "soon"}, "LINGER_MS"),
        ({"CIRCUITWATCH_ENDPOINT": "x:1", "CIRCUITWATCH_LINGER_MS": "-1"}, "LINGER_MS: '-1'"),
    ],
)
def test_config_names_the_bad_variable(env, message):
    with pytest.raises(ValueError, match=message):
        ProbeConfig.from_env({"CIRCUITWATCH_SPEC": "a.yaml", **env})

"""The latency budget on a real engine: the reference model served by vLLM in its default
compiled mode with the plugin, the real sidecar, and the probe's measured overhead and
sampling level read from the sidecar's /metrics as an operator would.

One engine, with the default sampling policy (``CIRCUITWATCH_SAMPLE=1.0``, every token, would
pin the level at 1). Its budget is changed while it serves (``probe_set_budget``): loose, then
tight (below what the probe costs at full sampling), then loose again. Under the tight budget
the level must fall and the overhead measured after it settled must stay under the budget;
under the loose one the level must come back to 1. Then, on the same engine: the row choice
reads where each request starts in the step from the scheduler's output (so that a GPU
engine need not read its positions), and that must be where the model's positions start.
"""

from __future__ import annotations

import os
import random
import time
import urllib.request
from dataclasses import dataclass
from unittest import mock

import pytest
from probe_engine_helpers import generate, stop_engine, unwatch_collect, watch_collect
from prometheus_client.parser import text_string_to_metric_families

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.config import ENV_BUDGET, ENV_ENDPOINT, ENV_SPEC
from sidecar.probe.host.budget import WINDOW_STEPS
from sidecar.probe.plugin import probe_flush, probe_set_budget
from sidecar.server.service import Sidecar
from sidecar.spec.load import load_spec

pytestmark = pytest.mark.engine

LOOSE = 0.5
REQUESTS = 8
TOKENS = 96  # decode steps per round: a round is about 3 windows of the controller
# From level 1 to 1/64 takes 6 windows, back up 19: enough rounds to settle either way.
SETTLE_ROUNDS = 8
MEASURE_ROUNDS = 4


@dataclass(frozen=True)
class Reading:
    """The probe's series on the sidecar's /metrics (rank 0 of the one model)."""

    overhead_sum: float
    overhead_count: float
    budget: float
    level: float


@dataclass(repr=False)
class Served:
    llm: object
    metrics_url: str
    prompts: list[list[int]]

    def read(self) -> Reading:
        text = urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()
        values = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.labels.get("rank") == "0":
                    values[sample.name] = sample.value
        return Reading(
            values.get("circuitwatch_probe_overhead_ratio_sum", 0.0),
            values.get("circuitwatch_probe_overhead_ratio_count", 0.0),
            values.get("circuitwatch_probe_budget_ratio", 0.0),
            values.get("circuitwatch_probe_sample_level", 0.0),
        )

    def run(self, rounds: int) -> None:
        for _ in range(rounds):
            generate(self.llm, self.prompts, max_tokens=TOKENS)
        assert self.llm.collective_rpc(probe_flush) == [True]
        # The sidecar ingests on its own thread: wait until the count stops moving.
        last = self.read().overhead_count
        while True:
            time.sleep(0.3)
            now = self.read().overhead_count
            if now == last:
                return
            last = now

    def phase(self, budget: float) -> tuple[float, Reading]:
        """Set ``budget``, let the level settle, then the mean overhead of the batches of
        the measured rounds and the reading after them."""
        assert self.llm.collective_rpc(probe_set_budget, args=(budget,)) == [True]
        self.run(SETTLE_ROUNDS)
        before = self.read()
        self.run(MEASURE_ROUNDS)
        after = self.read()
        batches = after.overhead_count - before.overhead_count
        assert batches > 0
        return (after.overhead_sum - before.overhead_sum) / batches, after


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vllm import LLM

    tmp = tmp_path_factory.mktemp("budget")
    listen = f"unix://{tmp}/ingest.sock"
    env = {
        ENV_SPEC: str(REFERENCE_SPEC),
        ENV_ENDPOINT: listen,
        ENV_BUDGET: str(LOOSE),
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # collective_rpc(probe_set_budget)
    }
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 500) for _ in range(rng.randint(8, 40))] for _ in range(REQUESTS)]
    spec = load_spec(REFERENCE_SPEC)
    with (
        Sidecar(spec, listen, metrics_port=0, metrics_host="127.0.0.1") as sidecar,
        mock.patch.dict(os.environ, env),  # collective_rpc reads it in this process too
    ):
        llm = LLM(model=str(REFERENCE_DIR), dtype="float32", gpu_memory_utilization=0.1,
                  max_model_len=512, max_num_seqs=REQUESTS, seed=0,
                  skip_tokenizer_init=True, enable_prefix_caching=False)  # fmt: skip
        try:
            yield Served(llm, sidecar.metrics_url, prompts)
        finally:
            stop_engine(llm)


def test_the_sampling_level_adapts_so_the_overhead_stays_under_the_budget(served):
    full, reading = served.phase(LOOSE)
    print(f"\nbudget {LOOSE}: overhead {full:.4f} at level {reading.level}")
    assert reading.budget == LOOSE and reading.level == 1.0 and 0 < full < LOOSE

    tight = full * 0.6
    overhead, reading = served.phase(tight)
    print(f"budget {tight:.4f}: overhead {overhead:.4f} at level {reading.level:.4f}")
    assert reading.budget == pytest.approx(tight)
    assert reading.level < 1.0
    assert overhead < tight

    overhead, reading = served.phase(LOOSE)
    print(f"budget {LOOSE}: overhead {overhead:.4f} at level {reading.level}")
    assert reading.level == 1.0 and overhead < LOOSE
    assert WINDOW_STEPS * 19 < SETTLE_ROUNDS * TOKENS  # the climb back fits in the settling


def test_the_layout_says_where_each_request_starts_in_the_step(served):
    """``StepLayout.num_computed`` (the scheduler's, on the host) is each request's first
    position in the forward, in every step, prefill and decode."""
    llm = served.llm
    assert llm.collective_rpc(watch_collect) == [True]
    generate(llm, served.prompts, max_tokens=12)
    [(steps, mismatched)] = llm.collective_rpc(unwatch_collect)
    print(f"\n{steps} steps checked, {mismatched} where the layout and the positions differ")
    assert steps >= 2 and mismatched == 0

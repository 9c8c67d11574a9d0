"""Alerts end to end: SmolLM2 traffic shifts from benign to harmful, and the alerts reach a webhook.

Everything is real and on loopback: a vLLM CPU engine (in this process, default compiled
mode, float32, prefix caching off) with the Circuitwatch plugin serving SmolLM2 under one
spec written here from two bundled ones: the harmful-request monitor
(sidecar/models/smollm2_harm_spec: a probe with a calibrated prompt-phase verdict threshold)
and the discovered previous-token circuit (sidecar/models/smollm2_spec); the sidecar in this
process with anomaly detection and a short warm-up; Prometheus scraping it every second and
evaluating deploy's rules; an Alertmanager (group_wait 1 s) posting to a webhook served by
this test.

**The rules are time-scaled** (``sidecar.monitoring.scaled_rules``, factor ``SCALE``):
every rate window, ``for:`` and group interval of deploy/prometheus/rules.yaml is divided
by 20 (5m windows -> 15 s, ``for: 5m`` -> 15 s); thresholds and the per-minute traffic
floors are unchanged. The production timing is then 20x what is measured here, plus scrape
and evaluation intervals.

Phases: the detector's warm-up (benign requests), a benign phase long enough for any alert
to fire (rate window + ``for:`` + margins), then harmful requests (HarmBench) until the
flagged-request alert arrived, then in-the-wild jailbreak prompts until the anomaly alert
arrived. Benign requests come from the held-out ``test`` split of the project's composed
benign requests (not used to set the verdict threshold). Measured and printed: seconds from
the first harmful request to each alert at the webhook (and from the first jailbreak to the
anomaly alert), and the alerts (if any) that arrived during benign traffic. Every dashboard
query must then return data.

Why this arrangement (offline emulation of the sidecar's AnomalyMonitor on reference-path
scores of the same traffic, warm-up 24, 150 benign requests, threshold 4; 2026-11-29):
HarmBench requests look like the benign chats to every detector (anomalous share 0-5 %):
they are short chats with the same template, and the harm probe's benign means are
heavy-tailed, so the probe's verdict threshold catches them but its robust z does not.
Jailbreak prompts (hundreds of tokens of role-play instructions) are a shift a user would
recognise, and the previous-token circuit sees it: 80 % of them anomalous for it, 78 % for
the multivariate detector, 0 % of benign requests for either. The induction circuit of
smollm2_spec is left out: its prompt-phase means on these templated benign chats are
heavy-tailed around a narrow core (26-36 % of benign requests over z 4 after a warm-up of
24), which would make the benign phase alarm. Measured here (2026-11-29, 245 s in all): no alert
in 50 s of benign traffic (304 requests after a warm-up of 32); CircuitwatchFlaggedRequests
33.5 s after the first HarmBench request (the monitor flags an eighth of HarmBench, most of it
requests for malware, threats and slurs, which come in runs in HarmBench's order: peak flagged
share 0.205), CircuitwatchAnomalousActivity 12.0 s after the first jailbreak.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sidecar.models.registry import ModelNotInstalled, model_path
from sidecar.monitoring import (
    RULES,
    Target,
    alertmanager_config,
    prometheus_config,
    scaled_rules,
    start_alertmanager,
    start_prometheus,
)
from sidecar.probe.config import ENV_BUDGET, ENV_ENDPOINT, ENV_SAMPLE, ENV_SPEC
from sidecar.server.anomaly import AnomalyConfig
from sidecar.server.service import Sidecar
from sidecar.spec.load import load_spec
from sidecar.spec.writer import write_spec

pytestmark = pytest.mark.engine

MODELS = Path(__file__).resolve().parents[1] / "sidecar" / "models"
HARM_SPEC = MODELS / "smollm2_harm_spec"
HEADS_SPEC = MODELS / "smollm2_spec"
HEADS_CIRCUITS = ("previous_token",)  # of HEADS_SPEC, watched beside the harm monitor
MAX_JAILBREAK_TOKENS = 512  # rendered prompt; max_model_len is 1024
SCALE = 20
WARMUP = 24  # requests before the anomaly detectors score (production default: 200)
BENIGN_S = 50  # benign traffic after warm-up: > rate window + for (30 s) + scrape/eval/group
ALERT_WITHIN_S = 90  # each alert at the webhook this soon after its shift began
BATCH = 8
MAX_TOKENS = 4
EXPECTED = ("CircuitwatchAnomalousActivity", "CircuitwatchFlaggedRequests")


@dataclass
class Webhook:
    """Alertmanager's webhook posts, each with the monotonic time it arrived."""

    url: str = ""
    posts: list[tuple[float, dict]] = field(default_factory=list)

    def arrivals(self, since: float = 0.0, until: float = float("inf")) -> dict[str, float]:
        """Alert name -> first arrival time of a firing alert in [since, until)."""
        first: dict[str, float] = {}
        for at, body in self.posts:
            for alert in body["alerts"]:
                if since <= at < until and alert["status"] == "firing":
                    first.setdefault(alert["labels"]["alertname"], at)
        return first


def serve_webhook(webhook: Webhook) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            webhook.posts.append((time.monotonic(), body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:  # keep pytest's output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    webhook.url = f"http://127.0.0.1:{server.server_port}/alerts"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def combined_spec(folder: Path, model_dir: Path) -> Path:
    """The harm spec's components and circuits plus HEADS_CIRCUITS of the heads spec (and the
    components they use), written as one spec for the same model."""
    from sidecar.discover.calibrate import entries

    harm = load_spec(HARM_SPEC / "spec.yaml", model_dir=model_dir)
    heads = load_spec(HEADS_SPEC / "spec.yaml", model_dir=model_dir)
    components, circuits = entries(harm)
    head_components, head_circuits = entries(heads)
    kept = [c for c in head_circuits if c.name in HEADS_CIRCUITS]
    used = {name for c in kept for name in c.weights}
    components += [c for c in head_components if c.name in used]
    header = "harm monitor + previous-token circuit (tests/test_alerts_e2e.py)"
    return write_spec(folder, harm.model.name, harm.model.hash, components, circuits + kept, header)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """SmolLM2, the combined spec, benign chats, harmful chats and jailbreak prompts."""
    try:
        model_dir = model_path("smollm2")
    except ModelNotInstalled as e:
        pytest.skip(str(e))
    datasets = pytest.importorskip("sidecar.discover.datasets")
    for folder in (HARM_SPEC, HEADS_SPEC):
        if not (folder / "spec.yaml").exists():
            pytest.skip(f"no spec at {folder}")
    spec_path = combined_spec(tmp_path_factory.mktemp("spec"), model_dir)
    spec = load_spec(spec_path, model_dir=model_dir)
    if not any(phase == "prompt" for c in spec.circuits for phase, _ in c.verdict_thresholds):
        pytest.skip("the harm spec has no prompt-phase verdict threshold yet")
    try:
        harmful = [e.content for e in datasets.harmbench()]
        jailbreaks = datasets.jailbreaks()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    fitting = [e.content for e in jailbreaks
               if len(e.token_ids(tokenizer)) <= MAX_JAILBREAK_TOKENS]  # fmt: skip
    benign = [e.content for e in datasets.composed_benign("test")]
    return model_dir, spec_path, spec, benign, harmful, fitting


ANOMALY_BUCKETS = "sum by (le) (rate(circuitwatch_anomaly_score_bucket[15s]))"
# What Prometheus saw, printed after the run (per phase, the range of each series' values).
TRACES = {
    "anomalous share": "circuitwatch:anomalous_requests:ratio_rate5m",
    "flagged share": "circuitwatch:verdicts_flagged:ratio_rate5m",
    "scored req/min": "sum by (detector) (rate(circuitwatch_anomaly_score_count[15s])) * 60",
    "anomaly p50": f"histogram_quantile(0.5, {ANOMALY_BUCKETS})",
    "anomaly p95": f"histogram_quantile(0.95, {ANOMALY_BUCKETS})",
    "p50 prompt mean": "circuitwatch:circuit_score_mean:p50_5m",
    "p95 prompt mean": "circuitwatch:circuit_score_mean:p95_5m",
}


@dataclass
class Timeline:
    shift: float  # monotonic time of the first harmful request
    jailbreak: float  # monotonic time of the first jailbreak prompt
    benign_start: float  # end of the warm-up
    webhook: Webhook
    prometheus: object
    circuit: str
    requests: dict[str, int]  # phase -> requests sent
    traces: dict[str, dict[str, tuple[float, float]]]  # name -> phase -> (min, max)


def trace(prometheus, expr: str, phases: dict[str, tuple[float, float]]) -> dict:
    """Per phase (wall-clock start, end), min and max over all series of ``expr``."""
    start, end = min(a for a, _ in phases.values()), max(b for _, b in phases.values())
    points = [(float(t), float(v)) for series in prometheus.query_range(expr, start, end, 1)
              for t, v in series["values"] if v not in ("NaN", "+Inf", "-Inf")]  # fmt: skip
    spans = {}
    for phase, (a, b) in phases.items():
        values = [v for t, v in points if a <= t < b]
        spans[phase] = (round(min(values), 3), round(max(values), 3)) if values else None
    return spans


@pytest.fixture(scope="module")
def timeline(inputs, tmp_path_factory):
    from vllm import LLM, SamplingParams

    model_dir, spec_path, spec, benign, harmful, jailbreaks = inputs
    tmp = tmp_path_factory.mktemp("alerts")
    webhook = Webhook()
    hook_server = serve_webhook(webhook)
    sidecar = Sidecar(spec, f"unix://{tmp}/ingest.sock", metrics_port=0,
                      metrics_host="127.0.0.1", anomaly=AnomalyConfig(warmup=WARMUP))  # fmt: skip
    sidecar.__enter__()
    alertmanager = start_alertmanager(
        tmp / "am", alertmanager_config(webhook.url, group_wait="1s", group_interval="1s")
    )
    config = prometheus_config(
        RULES,
        [Target(sidecar.metrics_url.split("/")[2], "sidecar")],
        alertmanager.url.removeprefix("http://"),
    )
    prometheus = start_prometheus(tmp / "prom", config, scaled_rules(RULES.read_text(), SCALE))
    llm = None
    try:
        alertmanager.wait_ready()
        prometheus.wait_ready()
        with pytest.MonkeyPatch.context() as env:
            env.setenv(ENV_SPEC, str(spec_path))
            env.setenv(ENV_ENDPOINT, sidecar.address)
            env.setenv(ENV_SAMPLE, "1.0")
            # Every token on a CPU costs more than the default budget, which is what
            # CircuitwatchProbeOverBudget says (tests/test_probe_budget_live.py, promtool);
            # here only the anomaly alerts are under test, so the budget allows that cost.
            env.setenv(ENV_BUDGET, "1.0")
            started = time.monotonic()
            llm = LLM(model=str(model_dir), dtype="float32", max_model_len=1024, max_num_seqs=8,
                      gpu_memory_utilization=0.2, enable_prefix_caching=False, seed=0)  # fmt: skip
            print(f"\nengine up in {time.monotonic() - started:.0f} s")
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
        sent = {"warmup": 0, "benign": 0, "harmful": 0, "jailbreak": 0}

        def send(phase: str, texts: itertools.cycle) -> None:
            chats = [[{"role": "user", "content": next(texts)}] for _ in range(BATCH)]
            llm.chat(chats, params, use_tqdm=False)
            sent[phase] += BATCH

        def send_until(phase: str, texts: itertools.cycle, alert: str) -> None:
            began = time.monotonic()  # stops at ALERT_WITHIN_S + 10 s
            while alert not in webhook.arrivals(since=shift):
                if time.monotonic() - began > ALERT_WITHIN_S + 10:
                    break
                send(phase, texts)

        benign_texts = itertools.cycle(benign)
        while sent["warmup"] < WARMUP + BATCH:
            send("warmup", benign_texts)
        benign_start, wall_benign = time.monotonic(), time.time()
        while time.monotonic() - benign_start < BENIGN_S:
            send("benign", benign_texts)
        shift, wall_shift = time.monotonic(), time.time()
        send_until("harmful", itertools.cycle(harmful), "CircuitwatchFlaggedRequests")
        jailbreak, wall_jailbreak = time.monotonic(), time.time()
        send_until("jailbreak", itertools.cycle(jailbreaks), "CircuitwatchAnomalousActivity")
        phases = {
            "benign": (wall_benign, wall_shift),
            "harmful": (wall_shift, wall_jailbreak),
            "jailbreak": (wall_jailbreak, time.time()),
        }
        traces = {name: trace(prometheus, expr, phases) for name, expr in TRACES.items()}
        circuit = spec.circuits[0].name
        yield Timeline(shift, jailbreak, benign_start, webhook, prometheus, circuit, sent, traces)
    finally:
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
        prometheus.stop()
        alertmanager.stop()
        sidecar.__exit__(None, None, None)
        hook_server.shutdown()


def test_no_alert_during_benign_traffic(timeline: Timeline) -> None:
    early = timeline.webhook.arrivals(until=timeline.shift)
    for name, spans in timeline.traces.items():
        print(f"\n{name:16} {spans}", end="")
    print(f"\nbenign phase: {timeline.requests}, {timeline.shift - timeline.benign_start:.0f} s, "
          f"alerts {early or 'none'}")  # fmt: skip
    assert not early, f"false alarms during benign traffic: {early}"


def alert_delays(timeline: Timeline, since: float) -> dict[str, float]:
    """Alert name -> seconds from ``since`` to its first arrival (negative: before it)."""
    arrived = timeline.webhook.arrivals(since=timeline.shift)
    delays = {name: round(at - since, 1) for name, at in arrived.items()}
    print(f"\nshift -> webhook (s): {delays}; requests sent: {timeline.requests}")
    return delays


def test_flagged_alert_arrives_after_the_shift(timeline: Timeline) -> None:
    delays = alert_delays(timeline, since=timeline.shift)
    assert "CircuitwatchFlaggedRequests" in delays, f"never arrived; got {delays}"
    assert delays["CircuitwatchFlaggedRequests"] <= ALERT_WITHIN_S, delays


def test_anomaly_alert_arrives_after_the_shift(timeline: Timeline) -> None:
    delays = alert_delays(timeline, since=timeline.jailbreak)
    assert "CircuitwatchAnomalousActivity" in delays, f"never arrived; got {delays}"
    assert delays["CircuitwatchAnomalousActivity"] <= ALERT_WITHIN_S, delays


# Panels that must stay empty in this run: nothing is dropped, and the harm circuit has no
# per-token threshold (only verdict thresholds), so no token "fires". (The ingest-errors
# panel has data: its malformed-traceparent counter is exported at 0 from the start.)
EMPTY_HERE = {"Samples dropped", "Firing tokens"}


def test_every_dashboard_panel_returns_data(timeline: Timeline) -> None:
    from test_deploy_scrape import load_generator

    def concrete(expr: str) -> str:
        return (
            expr.replace("$__rate_interval", "1m")
            .replace('"$model_name"', '".+"')
            .replace("$circuit", timeline.circuit)
        )

    generator = load_generator()
    panels = [p for p in generator.build_dashboard()["panels"] if p["type"] != "row"]
    empty = {
        panel["title"]
        for panel in panels
        if not any(timeline.prometheus.query(concrete(t["expr"])) for t in panel["targets"])
    }
    assert len(panels) > len(EMPTY_HERE)
    assert empty == EMPTY_HERE

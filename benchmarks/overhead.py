"""Engine overhead of Circuitwatch: five vLLM configurations side by side, interleaved.

    python -m benchmarks.overhead                          # both models, CPU-sized
    python -m benchmarks.overhead --model dummy --dummy-size 8b --device-label h100   # GPU
    python -m benchmarks.overhead --model smollm2          # the real model (installed)
    python -m benchmarks.overhead --quick                  # a few steps, smoke run

Configurations, same engine settings otherwise:
    1 baseline           vLLM default (compiled; CUDA graphs on GPU), no plugin
    2 probe_default      + Circuitwatch, default sampling, the model's typical spec
    3 probe_every_token  + Circuitwatch, every token (CIRCUITWATCH_SAMPLE=1.0), a spec on every
                         layer (heads by norm, hook_resid_post and mlp.hook_post directions)
    4 naive_eager        enforce_eager=True + hooks registered after load that copy the same
                         sites' activations to the host every forward (eager-only tools' way)
    5 eager              enforce_eager=True, no hooks

Each configuration gets its own engine, all started up front (or, when they do not fit in
memory together, restarted every round; the result says which). Then ``--rounds`` rounds
run the same workload on each engine in turn, the order rotating every round, so that
drift of a shared machine spreads over all configurations; only one engine runs at a time.
Probed engines ship to in-process sidecars (``Sidecar`` on a Unix socket, one per spec),
for real; after each run the probes are flushed and what the sidecar received is checked.

Throughput: output tokens / wall time of ``llm.generate`` (prefill included), the call
repeated until one measurement lasts ``--min-seconds`` (small models finish a call in well
under a second). Ratio vs baseline: per round, then mean ± standard deviation over rounds.
Step latency: p50/p99 of the decode steps' durations, from the engine core's own per-step
stamps (see _engines.py).
Physical limit: the probes' FLOPs per token over the model's (see _models.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks._common import (
    RESULTS_DIR,
    Spread,
    Table,
    load_note,
    machine_info,
    percentiles,
    to_jsonable,
    update_markdown_section,
    write_json,
)
from benchmarks._engines import Config, Device, Engine, Workload, engine_bytes, prepare_process
from benchmarks._models import (
    BenchModel,
    dummy_model,
    every_layer_spec,
    probe_cost,
    reference_model,
    smollm2_model,
    typical_spec,
)

CONFIGS = (
    Config("baseline", "1 vLLM default (compiled), no plugin", enforce_eager=False),
    Config(
        "probe_default",
        "2 + Circuitwatch, default sampling, typical spec",
        enforce_eager=False,
        spec="typical",
        target_ratio=0.995,
    ),
    Config(
        "probe_every_token",
        "3 + Circuitwatch, every token, every-layer spec",
        enforce_eager=False,
        spec="every_layer",
        sample="1.0",
        target_ratio=0.98,
    ),
    Config("naive_eager", "4 eager + naive host-copy hooks", enforce_eager=True, naive_hooks=True),
    Config("eager", "5 eager, no hooks", enforce_eager=True),
)
# --decompose: configuration 2 cut short, to show where its cost goes.
DECOMPOSITION = (
    Config(
        "probe_taps_only",
        "2a = 2 with the taps only (no drain)",
        enforce_eager=False,
        spec="typical",
        probe_stage="taps",
    ),
    Config(
        "probe_no_shipping",
        "2b = 2 with taps and drain, nothing shipped",
        enforce_eager=False,
        spec="typical",
        probe_stage="drain",
    ),
)


@dataclass
class ConfigResult:
    key: str
    label: str
    tokens_per_s: list[float] = field(default_factory=list)  # one per round
    ratio_vs_baseline: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)  # every decode step of every round
    cpu_s_per_token: list[float] = field(default_factory=list)  # all processes, one per round
    cpu_vs_baseline: list[float] = field(default_factory=list)
    probe_flops_per_token: float = 0.0
    probe_share_of_model: float = 0.0
    tokens_scored_by_sidecar: int = 0  # probed configs: what the sidecar counted
    tokens_forwarded: int = 0  # what the engine ran forward on, over the same runs
    probe_drops: dict = field(default_factory=dict)
    compilation: dict = field(default_factory=dict)
    engine_start_s: list[float] = field(default_factory=list)


def _sidecar_tokens(sidecar) -> int:
    total = 0.0
    for family in sidecar.registry.collect():
        for sample in family.samples:
            if sample.name == "circuitwatch_tokens_sampled_total":
                total += sample.value
    return int(total)


class Bench:
    """One model's engines and sidecars, and the rounds over them."""

    def __init__(
        self,
        model: BenchModel,
        workload: Workload,
        device: Device,
        folder: Path,
        min_seconds: float,
        configs: tuple[Config, ...] = CONFIGS,
    ):
        from sidecar.server.service import Sidecar
        from sidecar.spec.load import load_spec

        self.model, self.workload, self.device = model, workload, device
        self.min_seconds = min_seconds
        self.specs = {
            "typical": typical_spec(model, folder),
            "every_layer": every_layer_spec(model, folder),
        }
        self.endpoints = {name: f"unix://{folder}/{name}.sock" for name in self.specs}
        self.sidecars = {
            name: Sidecar(load_spec(path), self.endpoints[name], metrics_port=None)
            for name, path in self.specs.items()
        }
        self.configs = configs
        self.results = {c.key: ConfigResult(c.key, c.label) for c in configs}
        for config in configs:
            if config.spec is not None:
                cost = probe_cost(self.specs[config.spec], model.shape)
            elif config.naive_hooks:
                cost = probe_cost(self.specs["every_layer"], model.shape)
            else:
                continue
            result = self.results[config.key]
            result.probe_flops_per_token = cost.flops_per_token
            result.probe_share_of_model = cost.flops_per_token / model.flops_per_token
        need = len(configs) * engine_bytes(model, workload, device)
        self.together = need < 0.85 * device.free_bytes

    def start(self, config: Config, engines_at_once: int) -> Engine:
        from benchmarks._engines import start_engine

        spec = self.specs.get(config.spec) if config.spec else None
        endpoint = self.endpoints.get(config.spec) if config.spec else None
        print(f"[{self.model.name}] starting engine {config.label}", flush=True)
        engine = start_engine(
            config, self.model, self.workload, self.device, spec, endpoint, engines_at_once
        )
        result = self.results[config.key]
        result.compilation = engine.compilation
        result.engine_start_s.append(round(engine.start_seconds, 1))
        return engine

    def run(self, rounds: int, mode: str, after_round: Callable[[int], None]) -> None:
        from vllm import SamplingParams

        prompts = self.workload.prompts(self.model.vocab_size)
        params = SamplingParams(
            max_tokens=self.workload.max_tokens, ignore_eos=True, temperature=0.0, detokenize=False
        )
        with contextlib.ExitStack() as stack:
            for sidecar in self.sidecars.values():
                stack.enter_context(sidecar)
            engines: dict[str, Engine] = {}
            try:
                if mode == "together":
                    for config in self.configs:
                        engines[config.key] = self.start(config, len(self.configs))
                        engines[config.key].generate(prompts, params)  # warm-up, not counted
                for r in range(rounds):
                    turn = r % len(self.configs)
                    order = self.configs[turn:] + self.configs[:turn]
                    measured = {}
                    for config in order:
                        engine = engines.get(config.key)
                        if engine is None:
                            engine = self.start(config, 1)
                            engine.generate(prompts, params)
                        measured[config.key] = self._measure(engine, prompts, params)
                        if mode != "together":
                            engine.shutdown()
                            self.device.wait_until_free()
                    baseline, baseline_cpu = measured["baseline"]
                    for key, (tps, cpu) in measured.items():
                        result = self.results[key]
                        result.tokens_per_s.append(tps)
                        result.ratio_vs_baseline.append(tps / baseline)
                        result.cpu_s_per_token.append(cpu)
                        result.cpu_vs_baseline.append(cpu / baseline_cpu)
                    line = "  ".join(f"{k} {v:,.1f}" for k, (v, _) in measured.items())
                    print(f"[{self.model.name}] round {r + 1}/{rounds} tok/s: {line}", flush=True)
                    after_round(r + 1)
            finally:
                for engine in engines.values():
                    engine.shutdown()

    def _measure(self, engine: Engine, prompts, params) -> tuple[float, float]:
        """(output tokens/s, CPU seconds per output token) over repeated generate calls
        lasting at least ``min_seconds``; the CPU time includes sending what the probes hold.
        """
        config = engine.config
        sidecar = self.sidecars.get(config.spec) if config.probed else None
        before = _sidecar_tokens(sidecar) if sidecar else 0
        result = self.results[config.key]
        tokens = calls = 0
        wall = 0.0
        cpu_before = engine.cpu.seconds()
        while wall < self.min_seconds or calls == 0:
            n, seconds, steps = engine.generate(prompts, params)
            tokens, wall, calls = tokens + n, wall + seconds, calls + 1
            result.step_s.extend(float(s) for s in steps)
        if sidecar is not None:
            engine.flush_probes()  # outside the timed region: the next run starts clean
            result.tokens_scored_by_sidecar += _sidecar_tokens(sidecar) - before
            result.tokens_forwarded += calls * self.workload.forward_tokens
            stats = engine.probe_stats()[0]
            result.probe_drops = dict(stats.shipper.dropped)
        return tokens / wall, (engine.cpu.seconds() - cpu_before) / tokens


def _table(bench: Bench, done: int, rounds: int, mode: str) -> Table:
    rows = []
    for config in bench.configs:
        r = bench.results[config.key]
        tps, ratio = Spread.of(r.tokens_per_s), Spread.of(r.ratio_vs_baseline)
        steps = percentiles(r.step_s)
        verdict = ""
        if config.target_ratio is not None:
            ok = ratio.mean >= config.target_ratio
            verdict = f"{'met' if ok else 'MISSED'} (>= {config.target_ratio:.1%})"
        shipped = ""
        if config.probed and config.probe_stage is None:
            shipped = f"{r.tokens_scored_by_sidecar:,}/{r.tokens_forwarded:,}"
        cpu, cpu_ratio = Spread.of(r.cpu_s_per_token), Spread.of(r.cpu_vs_baseline)
        rows.append(
            (
                config.label,
                tps.text(".1f"),
                f"{ratio.mean:.2%} ± {ratio.stdev:.2%}",
                f"{cpu.mean * 1e6:,.0f} ± {cpu.stdev * 1e6:,.0f} ({cpu_ratio.mean - 1:+.1%})",
                f"{steps['p50'] * 1e3:.1f} / {steps['p99'] * 1e3:.1f}",
                f"{r.probe_share_of_model:.3%}",
                shipped,
                verdict,
            )
        )
    m = bench.model
    title = (
        f"{m.name}: {m.description}, {m.parameters / 1e6:,.1f} M parameters, "
        f"{m.shape.n_layers} layers, d_model {m.shape.d_model}; batch {bench.workload.batch} x "
        f"{bench.workload.max_tokens} tokens, "
        f"{done} rounds{'' if done == rounds else f' of {rounds} (cut short)'}, engines {mode}"
    )
    columns = (
        "configuration",
        "output tok/s",
        "vs baseline",
        "CPU µs / token (vs baseline)",
        "decode step p50 / p99 ms",
        "probe FLOPs / model FLOPs",
        "tokens scored / forwarded",
        "target",
    )
    return Table(title, columns, tuple(rows))


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.overhead", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--model", choices=("reference", "smollm2", "dummy", "both"), default="both"
    )
    parser.add_argument("--dummy-size", choices=("cpu", "8b"), default="cpu")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 5; quick 1)")
    parser.add_argument("--max-tokens", type=int, help="output tokens per request (default 128)")
    parser.add_argument("--batch", type=int, help="requests per generate call (default 16)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    parser.add_argument(
        "--min-seconds",
        type=float,
        default=3.0,
        help="repeat generate until a measurement lasts this long (default 3)",
    )
    parser.add_argument("--engines", choices=("auto", "together", "per-round"), default="auto")
    parser.add_argument("--quick", action="store_true", help="a few steps: smoke run")
    parser.add_argument(
        "--probe-from",
        type=Path,
        metavar="CHECKOUT",
        help="add configurations 2 and 3 running the probe of another checkout (an earlier "
        "commit, say: git worktree add /tmp/old <commit>), side by side with this one's",
    )
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="add configuration 2 with the taps only, and with the drain but no shipping",
    )
    parser.add_argument("--device-label", help="names the result file (default cpu or the GPU)")
    parser.add_argument(
        "--output", type=Path, help="result JSON (default benchmarks/results/overhead-LABEL.json)"
    )
    parser.add_argument(
        "--update-docs", action="store_true", help="rewrite this device's BENCHMARKS.md section"
    )
    return parser


@dataclass(frozen=True)
class Run:
    """What every result of one invocation shares."""

    command: str
    device: Device
    label: str
    workload: Workload
    rounds: int
    min_seconds: float
    output: Path | None
    update_docs: bool


def main(argv: list[str]) -> int:
    args = _arguments().parse_args(argv)
    prepare_process()
    device = Device.detect()
    label = args.device_label or (device.kind if device.kind == "cpu" else _slug(device.name))
    run = Run(
        command="python -m benchmarks.overhead" + (" " + " ".join(argv) if argv else ""),
        device=device,
        label=label,
        workload=Workload(
            batch=args.batch or (4 if args.quick else 16),
            prompt_tokens=8 if args.quick else args.prompt_tokens,
            max_tokens=args.max_tokens or (8 if args.quick else 128),
        ),
        rounds=args.rounds or (1 if args.quick else 5),
        min_seconds=0.0 if args.quick else args.min_seconds,
        output=args.output or (None if args.quick else RESULTS_DIR / f"overhead-{label}.json"),
        update_docs=args.update_docs,
    )
    models: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="cw-overhead-") as tmp:
        work = Path(tmp)
        choices = []
        if args.model in ("reference", "both"):
            choices.append(reference_model(work))
        if args.model == "smollm2":
            choices.append(smollm2_model())
        if args.model in ("dummy", "both"):
            choices.append(dummy_model(work, args.dummy_size, weights=device.kind == "cpu"))
        for model in choices:
            load_before = os.getloadavg()
            configs = _configs(args.decompose, args.probe_from)
            bench = Bench(model, run.workload, device, work / model.name, run.min_seconds, configs)
            mode = args.engines
            if mode == "auto":
                mode = "together" if bench.together else "per-round"

            def report(done: int, bench=bench, mode=mode, load_before=load_before) -> None:
                # After every round: a run cut short still leaves its completed rounds.
                load = load_note(load_before, os.getloadavg())
                entry = _model_entry(run, bench, mode, done, load)
                _report(run, [*models, entry])
                if done == run.rounds:
                    models.append(entry)

            bench.run(run.rounds, mode, report)
            _table(bench, run.rounds, run.rounds, mode).print()
            print(models[-1]["load"])
    return 0


def _configs(decompose: bool, probe_from: Path | None) -> tuple[Config, ...]:
    configs = CONFIGS[:2] + DECOMPOSITION + CONFIGS[2:] if decompose else CONFIGS
    if probe_from is None:
        return configs
    if not (probe_from / "sidecar" / "probe" / "plugin.py").is_file():
        raise SystemExit(f"--probe-from {probe_from}: no sidecar/probe/plugin.py there")
    name = _revision(probe_from)
    others = tuple(
        replace(
            c,
            key=c.key + "_other",
            label=f"{c.label[0]}' = {c.label[0]} with the probe of {name}",
            target_ratio=None,
            probe_from=str(probe_from.resolve()),
        )
        for c in CONFIGS
        if c.key in ("probe_default", "probe_every_token")
    )
    return configs + others


def _revision(checkout: Path) -> str:
    """The checkout's short commit hash, or its path when it is not a git checkout."""
    try:
        result = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
        return result.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return str(checkout)


def _model_entry(run: Run, bench: Bench, mode: str, done: int, load: str) -> dict:
    table = _table(bench, done, run.rounds, mode)
    model = bench.model
    return {
        "model": model.name,
        "command": run.command,
        "title": table.title,
        "table_markdown": table.markdown(),
        "rounds_completed": done,
        "description": model.description,
        "parameters": model.parameters,
        "shape": model.shape,
        "model_flops_per_token": model.flops_per_token,
        "engines": mode,
        "load": load,
        "configs": [_summary(r) for r in bench.results.values()],
    }


def _summary(result: ConfigResult) -> dict:
    """The result as JSON values, its step times summarised (every step would be ~100 KB)."""
    data = to_jsonable(result)
    steps = data.pop("step_s")
    data["decode_steps"] = {"count": len(steps), **percentiles(steps, (50, 90, 99, 100))}
    return data


def _report(run: Run, models: list[dict]) -> None:
    """Write the results so far; models measured by an earlier run on this device are kept."""
    machine = machine_info()
    measured = {m["model"] for m in models}
    if run.output is not None:
        kept = []
        if run.output.is_file():
            earlier = json.loads(run.output.read_text()).get("models", [])
            kept = [m for m in earlier if m["model"] not in measured]
        models = sorted(kept + models, key=lambda m: (m["model"] != "reference", m["model"]))
        payload = {
            "benchmark": "overhead",
            "device": {"kind": run.device.kind, "name": run.device.name, "label": run.label},
            "workload": run.workload,
            "rounds": run.rounds,
            "min_seconds_per_measurement": run.min_seconds,
            "machine": machine,
            "models": models,
        }
        write_json(run.output, payload)
        print(f"wrote {run.output}")
    if run.update_docs:
        lines = []
        for m in models:
            lines += [f"`{m['command']}` ({m['load']}):", "", f"**{m['title']}**", ""]
            lines += [m["table_markdown"], ""]
        update_markdown_section(f"overhead-{run.label}", "\n".join(lines))


def _slug(name: str) -> str:
    known = re.search(r"(h100|h200|a100|l40s|l4|a10g?)", name.lower())
    return known.group(1) if known else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

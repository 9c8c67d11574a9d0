"""``circuitwatch demo``: the whole live path on the bundled default, shown in the terminal.

Starts the sidecar (in this process, on a Unix socket, with /metrics), then a vLLM engine
in its default compiled mode with the Circuitwatch plugin on, sends rounds of ordinary and
repeated-text requests, and keeps a table of each request's circuit scores up to date as
the sidecar finishes them. Repeated text is what the reference model's induction circuit
exists for: its score should rise there and stay low on ordinary text.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sidecar.models.registry import REFERENCE_DIR, REFERENCE_SPEC
from sidecar.probe.config import ENV_ENDPOINT, ENV_SPEC

ORDINARY = (
    "def read_config(path):\n    with open(path) as handle:\n        return json.load(handle)\n",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "class Queue:\n    def __init__(self, size):\n        self.items = []\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main(sys.argv[1:]))\n",
    "Rain is expected in the north by the evening, with clear skies further south.",
    "for index, value in enumerate(values):\n    if value is None:\n        continue\n",
)
WORDS = (
    "amber basil cedar delta ember fjord glyph heron iris jasper kelp lumen maple nectar "
    "onyx pixel quartz raven sable tundra umber vortex willow xenon yarrow zephyr"
).split()


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    repeated: bool


def demo_prompts(round_index: int, per_kind: int) -> list[DemoPrompt]:
    """Ordinary snippets and, as many, a random word sequence written out twice."""
    rng = random.Random(round_index)
    prompts = []
    for i in range(per_kind):
        prompts.append(DemoPrompt(ORDINARY[(round_index * per_kind + i) % len(ORDINARY)], False))
        span = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
        prompts.append(DemoPrompt(f"{span} {span}", True))
    return prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=REFERENCE_DIR, help="model directory")
    parser.add_argument("--spec", type=Path, default=REFERENCE_SPEC, help="circuit spec YAML")
    parser.add_argument("--metrics-port", type=int, default=9464, help="/metrics port (0: any)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of requests to send")
    parser.add_argument("--per-kind", type=int, default=3, help="requests of each kind a round")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated a request")
    parser.add_argument("--circuit", default="induction", help="circuit the table follows")
    parser.add_argument(
        "--eager", action="store_true", help="run the engine with enforce_eager (default: compiled)"
    )
    parser.add_argument(
        "--linger", type=float, default=0.0, help="keep /metrics up this many seconds at the end"
    )


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from sidecar.server.records import CollectingSink
    from sidecar.server.service import Sidecar
    from sidecar.spec.load import SpecError, load_spec

    console = Console()
    if not (args.model / "config.json").exists() or not args.spec.exists():
        console.print(
            f"[red]no model at {args.model} or no spec at {args.spec}[/red]: the bundled "
            "reference model is made by `circuitwatch train-reference`; or pass --model/--spec"
        )
        return 2
    try:
        spec = load_spec(args.spec, model_dir=args.model)
    except SpecError as e:
        console.print(f"[red]bad spec:[/red] {e}")
        return 2
    circuit_names = [c.name for c in spec.circuits]
    if args.circuit not in circuit_names:
        console.print(f"[red]--circuit {args.circuit!r} is not in the spec: {circuit_names}[/red]")
        return 2

    sink = CollectingSink()
    with tempfile.TemporaryDirectory(prefix="circuitwatch-demo-") as tmp:
        listen = f"unix://{tmp}/ingest.sock"
        with Sidecar(spec, listen, metrics_port=args.metrics_port, sinks=[sink]) as sidecar:
            console.print(f"sidecar on {sidecar.address}, metrics at {sidecar.metrics_url}")
            # The engine's processes inherit these; the plugin reads them at engine start.
            os.environ.update({ENV_SPEC: str(args.spec), ENV_ENDPOINT: listen})
            llm = _start_engine(console, args)
            _run_rounds(console, llm, sink, args)
            console.print(f"\nPrometheus metrics: [bold]{sidecar.metrics_url}[/bold]")
            for line in _metric_lines(sidecar.metrics_url, args.circuit):
                console.print(f"  {line}")
            if args.linger > 0:
                console.print(f"keeping /metrics up for {args.linger:.0f} s (Ctrl-C to stop)")
                try:
                    time.sleep(args.linger)
                except KeyboardInterrupt:
                    pass
            # Stop the engine first, so its stream to the sidecar closes before the server does.
            llm.llm_engine.engine_core.shutdown()
    return 0


def _start_engine(console, args: argparse.Namespace):
    from vllm import LLM

    mode = "eager" if args.eager else "default compiled"
    with console.status(f"starting vLLM ({mode} mode) with the Circuitwatch plugin..."):
        started = time.monotonic()
        llm = LLM(
            model=str(args.model),
            enforce_eager=args.eager,
            gpu_memory_utilization=0.2,
            max_model_len=512,
            max_num_seqs=16,
            seed=0,
        )
    console.print(f"engine up in {time.monotonic() - started:.0f} s ({mode} mode)")
    return llm


def _run_rounds(console, llm, sink, args: argparse.Namespace) -> None:
    from rich.live import Live
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    rows: list[tuple[DemoPrompt, object]] = []
    with Live(_table(rows, args.circuit), console=console, refresh_per_second=4) as live:
        for round_index in range(args.rounds):
            prompts = demo_prompts(round_index, args.per_kind)
            outputs = llm.generate([p.text for p in prompts], params, use_tqdm=False)
            by_id = {o.request_id: p for o, p in zip(outputs, prompts, strict=True)}
            pending = set(by_id)
            deadline = time.monotonic() + 30
            while pending and time.monotonic() < deadline:
                for record in sink.records:
                    if record.request_id in pending:
                        pending.discard(record.request_id)
                        rows.append((by_id[record.request_id], record))
                live.update(_table(rows, args.circuit))
                time.sleep(0.1)
            if pending:
                console.print(f"[yellow]{len(pending)} requests not scored within 30 s[/yellow]")
    _print_summary(console, rows, args.circuit)


def _table(rows, circuit: str):
    from rich.table import Table

    table = Table(title=f"circuit '{circuit}': per-request scores (prompt tokens)")
    for column in ("request", "text", "kind", "tokens", "mean", "max", "gen mean"):
        table.add_column(column, justify="right" if column not in ("text", "kind") else "left")
    for prompt, record in rows[-18:]:
        prompt_stats = record.phase("prompt")
        gen_stats = record.phase("generation")
        stats = prompt_stats.circuit(circuit)
        gen_mean = f"{gen_stats.circuit(circuit).mean:.2f}" if gen_stats else "-"
        style = "bold red" if prompt.repeated else "green"
        kind = "repeated" if prompt.repeated else "ordinary"
        snippet = prompt.text.replace("\n", " ")[:36]
        table.add_row(
            record.request_id,
            snippet,
            f"[{style}]{kind}[/{style}]",
            str(prompt_stats.tokens),
            f"{stats.mean:.2f}",
            f"{stats.max:.2f}",
            gen_mean,
        )
    return table


def _print_summary(console, rows, circuit: str) -> None:
    for repeated, label in ((True, "repeated text"), (False, "ordinary text")):
        means = [r.phase("prompt").circuit(circuit).mean for p, r in rows if p.repeated is repeated]
        if means:
            console.print(
                f"{label:>14}: mean '{circuit}' score {sum(means) / len(means):6.2f} "
                f"over {len(means)} requests"
            )


def _metric_lines(url: str, circuit: str) -> list[str]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    wanted = ("circuitwatch_requests_scored_total", "circuitwatch_tokens_sampled_total")
    return [
        line
        for line in text.splitlines()
        if line.startswith(wanted)
        or (line.startswith("circuitwatch_circuit_score_count") and f'circuit="{circuit}"' in line)
    ]

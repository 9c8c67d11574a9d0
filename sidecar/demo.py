"""``circuitwatch demo``: the whole live path on a model, shown in the terminal.

Starts the sidecar (in this process, on a Unix socket, with /metrics), then a vLLM engine
in its default compiled mode with the Circuitwatch plugin on, sends rounds of ordinary and
repeated-text requests, and keeps a table of each request's circuit scores up to date as
the sidecar finishes them. Repeated text is what an induction circuit exists for: its
score should rise there and stay low on ordinary text.

    --model reference   the bundled reference model and its spec (the default): plain text
    --model smollm2     the installed SmolLM2-135M-Instruct and its discovered spec
                        (sidecar/models/smollm2_spec): chats through its chat template,
                        ordinary questions and requests to repeat a word sequence given twice
    --model DIR         any model directory, with --spec; chats when it has a chat template
    --monitor harm      the bundled harmful-request monitor on SmolLM2
                        (sidecar/models/smollm2_harm_spec)

When the followed circuit has a verdict threshold (a behaviour monitor, ``circuitwatch
calibrate``), the requests are held-out chats instead: HarmBench requests, benign requests
of the test templates and topics, and harmful-sounding safe ("tricky") ones, none of which
trained or calibrated the bundled monitor; the table adds the circuit's configured aggregate
and the sidecar's verdict (flagged / clear). Prefix caching is on only when the followed
circuit aggregates with ``last``: a cached prefix is never run, so its tokens are not scored,
and any other aggregation would then miss the chat template's shared system prompt.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sidecar.models.registry import (
    REFERENCE_SPEC,
    SMOLLM2_HARM_SPEC,
    SMOLLM2_SPEC,
    ModelNotInstalled,
    resolve_model,
)
from sidecar.probe.config import ENV_ENDPOINT, ENV_SPEC
from sidecar.server.records import FLAGGED
from sidecar.spec.schema import AggregationKind, Circuit

ORDINARY = (
    "def read_config(path):\n    with open(path) as handle:\n        return json.load(handle)\n",
    "The committee met on Tuesday to discuss the budget for the coming year.",
    "class Queue:\n    def __init__(self, size):\n        self.items = []\n",
    "import os\nimport sys\n\nif __name__ == '__main__':\n    sys.exit(main(sys.argv[1:]))\n",
    "Rain is expected in the north by the evening, with clear skies further south.",
    "for index, value in enumerate(values):\n    if value is None:\n        continue\n",
)
QUESTIONS = (
    "What is the capital of France?",
    "Give me two tips for sleeping better.",
    "Why is the sky blue?",
    "How do I boil an egg?",
    "Name three planets of the solar system.",
    "What does a compiler do?",
)
WORDS = (
    "amber basil cedar delta ember fjord glyph heron iris jasper kelp lumen maple nectar "
    "onyx pixel quartz raven sable tundra umber vortex willow xenon yarrow zephyr"
).split()


MONITORS = {"harm": ("smollm2", SMOLLM2_HARM_SPEC)}  # --monitor NAME: (model, spec)
# What each kind of request looks like in the table: the kinds a circuit exists to detect red.
KIND_STYLES = {"repeated": "bold red", "harmful": "bold red", "tricky": "yellow"}


@dataclass(frozen=True)
class DemoPrompt:
    text: str
    kind: str  # ordinary | repeated (induction); harmful | benign | tricky (monitors)

    @property
    def repeated(self) -> bool:
        return self.kind == "repeated"


def demo_prompts(round_index: int, per_kind: int, chat: bool = False) -> list[DemoPrompt]:
    """Ordinary text and, as many, a random word sequence written out twice.

    ``chat``: ordinary questions, and requests to repeat the doubled sequence (user turns).
    """
    rng = random.Random(round_index)
    ordinary = QUESTIONS if chat else ORDINARY
    prompts = []
    for i in range(per_kind):
        text = ordinary[(round_index * per_kind + i) % len(ordinary)]
        prompts.append(DemoPrompt(text, "ordinary"))
        span = " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 16)))
        text = f"Repeat this text exactly: {span} {span}" if chat else f"{span} {span}"
        prompts.append(DemoPrompt(text, "repeated"))
    return prompts


def monitor_prompts(round_index: int, per_kind: int) -> list[DemoPrompt]:
    """Held-out chats for a behaviour monitor: ``per_kind`` HarmBench and benign test requests
    and ``per_kind - 1`` (at least one) tricky ones, a different draw each round."""
    from sidecar.discover.datasets import composed_benign, harmbench, tricky_benign

    rng = random.Random(f"monitor/{round_index}")
    pools = (("harmful", harmbench(), per_kind), ("benign", composed_benign("test"), per_kind),
             ("tricky", tricky_benign(), max(1, per_kind - 1)))  # fmt: skip
    return [DemoPrompt(e.content, kind) for kind, pool, n in pools for e in rng.sample(pool, n)]


def default_spec(model: str) -> Path | None:
    """The spec that goes with a named model; None for a model directory (pass --spec)."""
    return {"reference": REFERENCE_SPEC, "smollm2": SMOLLM2_SPEC}.get(model)


def has_chat_template(model_dir: Path) -> bool:
    """Whether the checkpoint ships a chat template (a file, or in tokenizer_config.json)."""
    if (model_dir / "chat_template.jinja").is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    return config.is_file() and "chat_template" in json.loads(config.read_text())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="reference (the default), smollm2, or a model directory")
    parser.add_argument(
        "--monitor", choices=list(MONITORS), help="a bundled behaviour monitor (sets model, spec)"
    )
    parser.add_argument(
        "--spec", type=Path, help="circuit spec YAML (default: the named model's own spec)"
    )
    parser.add_argument("--metrics-port", type=int, default=9464, help="/metrics port (0: any)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of requests to send")
    parser.add_argument("--per-kind", type=int, default=3, help="requests of each kind a round")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated a request")
    parser.add_argument(
        "--circuit", help="circuit the table follows (default: induction, else the spec's first)"
    )
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
    if args.monitor:
        model, monitor_spec = MONITORS[args.monitor]
        args.model = args.model or model
        args.spec = args.spec or monitor_spec
    args.model = args.model or "reference"
    try:
        model_dir = resolve_model(args.model)
    except ModelNotInstalled as e:
        console.print(f"[red]{e}[/red]")
        return 2
    spec_path = args.spec or default_spec(args.model)
    if spec_path is None:
        console.print(f"[red]--model {args.model}: a model directory needs --spec[/red]")
        return 2
    if not (model_dir / "config.json").exists():
        console.print(f"[red]no model at {model_dir}[/red]: the bundled reference model is "
                      "made by `circuitwatch train-reference`; or pass --model")  # fmt: skip
        return 2
    if not spec_path.exists():
        hint = "discovery writes it for the installed model; or pass --spec"
        console.print(f"[red]no spec at {spec_path}[/red]: {hint}")
        return 2
    try:
        spec = load_spec(spec_path, model_dir=model_dir)
    except SpecError as e:
        console.print(f"[red]bad spec:[/red] {e}")
        return 2
    circuit_names = [c.name for c in spec.circuits]
    if args.circuit is None:
        args.circuit = "induction" if "induction" in circuit_names else circuit_names[0]
    if args.circuit not in circuit_names:
        console.print(f"[red]--circuit {args.circuit!r} is not in the spec: {circuit_names}[/red]")
        return 2

    circuit = next(c for c in spec.circuits if c.name == args.circuit)
    if circuit.verdict_thresholds and not has_chat_template(model_dir):
        console.print(f"[red]circuit {args.circuit!r} is a monitor of chats: the model at "
                      f"{model_dir} has no chat template[/red]")  # fmt: skip
        return 2

    sink = CollectingSink()
    with tempfile.TemporaryDirectory(prefix="circuitwatch-demo-") as tmp:
        listen = f"unix://{tmp}/ingest.sock"
        with Sidecar(spec, listen, metrics_port=args.metrics_port, sinks=[sink]) as sidecar:
            console.print(f"sidecar on {sidecar.address}, metrics at {sidecar.metrics_url}")
            # The engine's processes inherit these; the plugin reads them at engine start.
            os.environ.update({ENV_SPEC: str(spec_path), ENV_ENDPOINT: listen})
            prefix_caching = circuit.aggregation.kind is AggregationKind.LAST
            llm = _start_engine(console, model_dir, args.eager, prefix_caching)
            _run_rounds(console, llm, sink, args, has_chat_template(model_dir), circuit)
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


def _start_engine(console, model_dir: Path, eager: bool, prefix_caching: bool):
    from vllm import LLM

    mode = "eager mode" if eager else "default compiled mode"
    mode += ", prefix caching " + ("on" if prefix_caching else "off")
    with console.status(f"starting vLLM ({mode}) with the Circuitwatch plugin..."):
        started = time.monotonic()
        llm = LLM(
            model=str(model_dir),
            enforce_eager=eager,
            gpu_memory_utilization=0.2,
            max_model_len=512,
            max_num_seqs=16,
            seed=0,
            enable_prefix_caching=prefix_caching,
            served_model_name=model_dir.name,  # the model_name label, not a whole path
        )
    console.print(f"engine up in {time.monotonic() - started:.0f} s ({mode})")
    return llm


def _run_rounds(console, llm, sink, args: argparse.Namespace, chat: bool, circuit: Circuit):
    from rich.live import Live
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
    monitor = bool(circuit.verdict_thresholds)
    rows: list[tuple[DemoPrompt, object]] = []
    with Live(_table(rows, circuit), console=console, refresh_per_second=4) as live:
        for round_index in range(args.rounds):
            if monitor:
                prompts = monitor_prompts(round_index, args.per_kind)
            else:
                prompts = demo_prompts(round_index, args.per_kind, chat)
            if chat:  # the model's chat template, as vLLM's OpenAI server applies it
                turns = [[{"role": "user", "content": p.text}] for p in prompts]
                outputs = llm.chat(turns, params, use_tqdm=False)
            else:
                outputs = llm.generate([p.text for p in prompts], params, use_tqdm=False)
            by_id = {o.request_id: p for o, p in zip(outputs, prompts, strict=True)}
            pending = set(by_id)
            deadline = time.monotonic() + 30
            while pending and time.monotonic() < deadline:
                for record in sink.records:
                    if record.request_id in pending:
                        pending.discard(record.request_id)
                        rows.append((by_id[record.request_id], record))
                live.update(_table(rows, circuit))
                time.sleep(0.1)
            if pending:
                console.print(f"[yellow]{len(pending)} requests not scored within 30 s[/yellow]")
    _print_summary(console, rows, circuit)


def _table(rows, circuit: Circuit):
    from rich.table import Table

    name, threshold = circuit.name, circuit.verdict_threshold("prompt")
    title = f"circuit '{name}': per-request scores (prompt tokens)"
    columns = ["request", "text", "kind", "tokens", "mean", "max"]
    if threshold is not None:
        title += f"; verdict: {circuit.aggregation.kind.value} > {threshold:.4g}"
        columns += ["aggregate", "verdict"]
    table = Table(title=title)
    for column in [*columns, "gen mean"]:
        table.add_column(column, justify="left" if column in ("text", "kind") else "right")
    for prompt, record in rows[-18:]:
        prompt_stats = record.phase("prompt")
        gen_stats = record.phase("generation")
        stats = prompt_stats.circuit(name)
        style = KIND_STYLES.get(prompt.kind, "green")
        cells = [record.request_id, prompt.text.replace("\n", " ")[:44],
                 f"[{style}]{prompt.kind}[/{style}]", str(prompt_stats.tokens),
                 f"{stats.mean:.2f}", f"{stats.max:.2f}"]  # fmt: skip
        if threshold is not None:
            mark = "bold red" if stats.verdict == FLAGGED else "green"
            cells += [f"{stats.aggregate:.2f}", f"[{mark}]{stats.verdict}[/{mark}]"]
        cells.append(f"{gen_stats.circuit(name).mean:.2f}" if gen_stats else "-")
        table.add_row(*cells)
    return table


def _print_summary(console, rows, circuit: Circuit) -> None:
    name = circuit.name
    for kind in dict.fromkeys(p.kind for p, _ in rows):
        stats = [r.phase("prompt").circuit(name) for p, r in rows if p.kind == kind]
        mean = sum(s.mean for s in stats) / len(stats)
        line = f"{kind:>9}: mean '{name}' prompt score {mean:6.2f} over {len(stats)} requests"
        if circuit.verdict_threshold("prompt") is not None:
            line += f", flagged {sum(s.verdict == FLAGGED for s in stats)}/{len(stats)}"
        console.print(line)


def _metric_lines(url: str, circuit: str) -> list[str]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    wanted = ("circuitwatch_requests_scored_total", "circuitwatch_tokens_sampled_total")
    per_circuit = ("circuitwatch_circuit_score_count", "circuitwatch_verdicts_total")
    return [
        line
        for line in text.splitlines()
        if line.startswith(wanted)
        or (line.startswith(per_circuit) and f'circuit="{circuit}"' in line)
    ]

"""``circuitwatch report``: find and prove the induction circuit of a model, print the evidence.

For the bundled reference model (or ``--model DIR``): per-head induction and previous-token
scores, the heads above threshold, what mean-ablating them costs on repeated random text and
on ordinary text, and how well the repeat probe separates repeated tokens. With
``--write-spec DIR`` it also writes the circuit spec built from these findings. Under a minute
on a CPU.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from sidecar.discover.ablation import AblationResult, ablate_heads
from sidecar.discover.induction import (
    INDUCTION_THRESHOLD,
    PREVIOUS_TOKEN_THRESHOLD,
    HeadRef,
    HeadScores,
    head_scores,
    make_eval_set,
)
from sidecar.discover.probe_training import ProbeResult, auroc, save_probe, train_repeat_probe
from sidecar.discover.scorer import ReferenceScorer, ScoredTokens
from sidecar.models import data
from sidecar.models.tokenizer import special_ids
from sidecar.models.train import REFERENCE_DIR
from sidecar.spec.identity import model_hash
from sidecar.spec.load import load_spec


@dataclass(frozen=True, eq=False)
class InductionReport:
    model_dir: Path
    scores: HeadScores
    induction_heads: tuple[HeadRef, ...]
    previous_token_heads: tuple[HeadRef, ...]
    induction_ablation: AblationResult
    previous_token_ablation: AblationResult
    probe: ProbeResult
    seconds: float


def load_model(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def held_out_corpus(tokenizer: PreTrainedTokenizerFast) -> np.ndarray:
    """The standard-library files the training never saw, as one token stream."""
    _, held_out = data.split_files(data.stdlib_files())
    return data.encode_corpus(tokenizer, data.read_texts(held_out))


def analyse(model_dir: str | Path = REFERENCE_DIR) -> InductionReport:
    started = time.monotonic()
    model, tokenizer = load_model(model_dir)
    corpus = held_out_corpus(tokenizer)
    eval_set = make_eval_set(tokenizer, corpus)
    scores = head_scores(model, eval_set)
    induction_heads = tuple(scores.induction_heads())
    previous_heads = tuple(scores.previous_token_heads())
    return InductionReport(
        model_dir=Path(model_dir),
        scores=scores,
        induction_heads=induction_heads,
        previous_token_heads=previous_heads,
        induction_ablation=ablate_heads(model, eval_set, induction_heads),
        previous_token_ablation=ablate_heads(model, eval_set, previous_heads),
        probe=train_repeat_probe(model, tokenizer, corpus),
        seconds=time.monotonic() - started,
    )


def format_report(report: InductionReport) -> str:
    scores = report.scores
    lines = [
        f"Induction circuit report: {report.model_dir}",
        "",
        "head   induction  prev-token",
    ]
    n_layers, n_heads = scores.induction.shape
    for layer in range(n_layers):
        for head in range(n_heads):
            ref = HeadRef(layer, head)
            tags = [
                tag
                for tag, heads in (
                    ("induction", report.induction_heads),
                    ("previous-token", report.previous_token_heads),
                )
                if ref in heads
            ]
            lines.append(
                f"{ref.name:<6} {scores.induction[layer, head]:9.3f}  "
                f"{scores.previous_token[layer, head]:10.3f}  {', '.join(tags)}"
            )
    lines += [
        "",
        f"induction heads (score > {INDUCTION_THRESHOLD}): {_names(report.induction_heads)}",
        f"previous-token heads (score > {PREVIOUS_TOKEN_THRESHOLD}): "
        f"{_names(report.previous_token_heads)}",
        "",
        "mean-ablation           repeated loss (2nd copy)        natural-text loss",
    ]
    for label, result in (
        ("induction heads", report.induction_ablation),
        ("previous-token heads", report.previous_token_ablation),
    ):
        lines.append(
            f"{label:<22}  {result.repeated_before:5.2f} -> {result.repeated_after:5.2f} "
            f"(x{result.repeated_factor:6.1f})     {result.natural_before:5.2f} -> "
            f"{result.natural_after:5.2f} (x{result.natural_factor:4.2f})"
        )
    probe = report.probe
    lines += [
        "",
        f"repeat probe at {probe.site.name}: held-out AUROC {probe.test_auroc:.3f}, "
        f"balanced accuracy {probe.test_balanced_accuracy:.3f} "
        f"({probe.test_positives} of {probe.test_tokens} tokens in second copies)",
        f"({report.seconds:.1f}s)",
    ]
    return "\n".join(lines)


def _names(heads: tuple[HeadRef, ...]) -> str:
    return ", ".join(h.name for h in heads) or "none"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        default=REFERENCE_DIR,
        help="Hugging Face model directory (default: the bundled reference model)",
    )
    parser.add_argument(
        "--write-spec",
        type=Path,
        default=None,
        metavar="DIR",
        help="also write the circuit spec (spec.yaml + safetensors) built from the findings to DIR",
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    report = analyse(args.model)
    print(format_report(report))
    if args.write_spec is not None:
        path = write_spec(report, args.write_spec)
        check = check_spec(path, args.model)
        print(f"\nwrote {path}\n{format_spec_check(check)}")
    return 0 if report.induction_heads and report.previous_token_heads else 1


# --- the circuit spec built from the findings -----------------------------------------------

SPEC_MODEL_NAME = "circuitwatch-reference"
PROBE_FILE = "repeat_probe.safetensors"
FALSE_POSITIVE_RATE = 0.01  # thresholds: 1% of ordinary-text tokens fire (benign control)
CALIBRATION_SEED, CHECK_SEED = 21, 22
REQUESTS = 24  # windows per kind and split


@dataclass(frozen=True)
class SpecCheck:
    """How the written spec's circuits score whole requests of each kind (held-out text)."""

    circuit: str
    ordinary_means: tuple[float, ...]  # per-request mean score, natural text
    repeated_means: tuple[float, ...]  # per-request mean score, text with repeated random spans
    auroc: float  # separation of the two sets of request means
    ordinary_firing: float  # share of ordinary tokens above the threshold
    repeated_firing: float  # share of second-copy tokens above the threshold


def write_spec(report: InductionReport, out_dir: str | Path) -> Path:
    """Write ``spec.yaml`` + the probe to ``out_dir``; weights z-score each component.

    Every circuit score is a weighted mean, over its components, of ``(value - mu) / sigma``
    with mu and sigma taken over ordinary (natural, unrepeated) tokens, so ordinary text
    scores about 0 and the unit is "standard deviations of ordinary text". The weights are
    each component's effect size on second copies of repeated spans. The threshold is set where 1%
    of ordinary tokens fire. Calibration uses the first half of the held-out text; ``check_spec``
    measures on the second half.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_probe(report.probe, out_dir / PROBE_FILE)
    components = [
        *(_head_entry(f"induction_{h.name}", h) for h in report.induction_heads),
        *(_head_entry(f"previous_token_{h.name}", h) for h in report.previous_token_heads),
        {
            "name": "repeat_probe",
            "kind": "direction",
            "site": report.probe.site.name,
            "direction": {"file": PROBE_FILE, "tensor": "weight"},
            "bias": report.probe.bias,
        },
    ]
    groups = {
        "induction": (
            "induction heads (layer 1) and the repeat probe: copying from earlier context",
            [c["name"] for c in components if c["name"].startswith(("induction_", "repeat_"))],
        ),
        "previous_token": (
            "previous-token heads (layer 0), which the induction heads read their keys from",
            [c["name"] for c in components if c["name"].startswith("previous_token_")],
        ),
    }
    path = out_dir / "spec.yaml"
    # A first pass with unit weights gives the component values through the reference scorer.
    _dump(
        path,
        report.model_dir,
        components,
        [_circuit(n, d, {m: 1.0 for m in ms}) for n, (d, ms) in groups.items()],
    )
    scorer = ReferenceScorer(load_spec(path), report.model_dir)
    corpus = held_out_corpus(scorer.tokenizer)
    ordinary, repeated = _requests(scorer, corpus[: len(corpus) // 2], CALIBRATION_SEED)
    values = np.concatenate([s.values for s in ordinary]).astype(np.float64)
    second = np.concatenate(
        [s.values[mask] for s, mask in zip(repeated.scored, repeated.masks, strict=True)]
    ).astype(np.float64)
    names = list(ordinary[0].component_names)
    mean, std = values.mean(axis=0), values.std(axis=0)
    # Each component's effect size on second copies, in ordinary-text standard deviations:
    # components that tell repeats apart weigh more, and one that falls on repeats counts
    # with a negative sign (a diagonal linear discriminant).
    effect = (second.mean(axis=0) - mean) / std
    circuits = []
    for name, (description, members) in groups.items():
        columns = [names.index(m) for m in members]
        total = sum(abs(effect[i]) for i in columns)
        weights = {m: effect[i] / (total * std[i]) for m, i in zip(members, columns, strict=True)}
        bias = -sum(mean[i] * weights[m] for m, i in zip(members, columns, strict=True))
        scores = values[:, columns] @ np.array([weights[m] for m in members]) + bias
        threshold = float(np.quantile(scores, 1 - FALSE_POSITIVE_RATE))
        circuits.append(_circuit(name, description, weights, bias, threshold))
    _dump(path, report.model_dir, components, circuits)
    return path


def check_spec(spec_path: str | Path, model_dir: str | Path) -> tuple[SpecCheck, ...]:
    """Score fresh held-out requests of both kinds with ``spec_path`` and summarise."""
    scorer = ReferenceScorer(load_spec(spec_path, model_dir), model_dir)
    corpus = held_out_corpus(scorer.tokenizer)
    ordinary, repeated = _requests(scorer, corpus[len(corpus) // 2 :], CHECK_SEED)
    checks = []
    for j, circuit in enumerate(scorer.spec.circuits):
        threshold = circuit.threshold if circuit.threshold is not None else np.inf
        ordinary_means = tuple(float(s.scores[:, j].mean()) for s in ordinary)
        repeated_means = tuple(float(s.scores[:, j].mean()) for s in repeated.scored)
        second = np.concatenate(
            [s.scores[mask, j] for s, mask in zip(repeated.scored, repeated.masks, strict=True)]
        )
        checks.append(
            SpecCheck(
                circuit=circuit.name,
                ordinary_means=ordinary_means,
                repeated_means=repeated_means,
                auroc=auroc(
                    torch.tensor(repeated_means + ordinary_means),
                    torch.tensor([True] * len(repeated_means) + [False] * len(ordinary_means)),
                ),
                ordinary_firing=float(
                    np.mean(np.concatenate([s.scores[:, j] for s in ordinary]) > threshold)
                ),
                repeated_firing=float(np.mean(second > threshold)),
            )
        )
    return tuple(checks)


def format_spec_check(checks: tuple[SpecCheck, ...]) -> str:
    lines = ["circuit          request mean: ordinary (max)  repeated (min)   AUROC  firing o/r"]
    for c in checks:
        lines.append(
            f"{c.circuit:<16} {np.mean(c.ordinary_means):8.2f} ({max(c.ordinary_means):6.2f})"
            f"  {np.mean(c.repeated_means):8.2f} ({min(c.repeated_means):6.2f})   {c.auroc:.3f}"
            f"  {c.ordinary_firing:.3f}/{c.repeated_firing:.3f}"
        )
    return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class _Repeated:
    scored: list[ScoredTokens]
    masks: list[np.ndarray]  # bool [T]: second-copy tokens


def _requests(
    scorer: ReferenceScorer, corpus: np.ndarray, seed: int
) -> tuple[list[ScoredTokens], _Repeated]:
    tokenizer = scorer.tokenizer
    sampler = data.WindowSampler(
        corpus, len(tokenizer), special_ids(tokenizer), tokenizer.bos_token_id, seed
    )
    ordinary = sampler.batch(REQUESTS, data.SpanConfig(repeat_fraction=0.0))
    repeated = sampler.batch(REQUESTS, data.SpanConfig(repeat_fraction=1.0))
    return (
        [scorer.score(row.tolist()) for row in ordinary.input_ids],
        _Repeated(
            scored=[scorer.score(row.tolist()) for row in repeated.input_ids],
            masks=[mask.numpy() for mask in repeated.second_copy],
        ),
    )


def _head_entry(name: str, head: HeadRef) -> dict:
    return {
        "name": name,
        "kind": "head",
        "site": f"blocks.{head.layer}.attn.hook_z",
        "head": head.head,
    }


def _circuit(
    name: str,
    description: str,
    weights: dict[str, float],
    bias: float = 0.0,
    threshold: float | None = None,
) -> dict:
    entry = {
        "name": name,
        "description": description,
        "components": {k: _round(v) for k, v in weights.items()},
        "bias": _round(bias),
    }
    if threshold is not None:
        entry["threshold"] = _round(threshold)
    return entry


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def _dump(path: Path, model_dir: Path, components: list[dict], circuits: list[dict]) -> None:
    doc = {
        "version": 1,
        "model": {"name": SPEC_MODEL_NAME, "hash": model_hash(model_dir)},
        "components": [{**c, "bias": _round(c["bias"])} if "bias" in c else c for c in components],
        "circuits": circuits,
    }
    header = (
        "# The reference model's induction circuit, written by `circuitwatch report --write-spec`\n"
        "# from the heads and probe that report found; re-run it rather than editing by hand.\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))

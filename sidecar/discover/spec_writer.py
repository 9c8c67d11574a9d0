"""The circuit spec built from ``circuitwatch report``'s findings, and a check of it.

``write_spec`` turns the heads and the repeat probe a report found into ``spec.yaml`` (plus
the probe's safetensors), calibrated on held-out text; ``check_spec`` scores fresh held-out
requests with the written spec and says how well each circuit separates repeated text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from sidecar.discover.induction import HeadRef
from sidecar.discover.probe_training import auroc, save_probe
from sidecar.discover.report import InductionReport, held_out_corpus
from sidecar.discover.scorer import ReferenceScorer, ScoredTokens
from sidecar.models import data
from sidecar.models.tokenizer import special_ids
from sidecar.spec.identity import model_hash
from sidecar.spec.load import load_spec

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

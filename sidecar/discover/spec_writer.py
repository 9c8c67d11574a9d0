"""The draft circuit spec built from discovered heads, calibrated on natural text, and a check.

``write_draft_spec`` turns named induction and previous-token heads (plus, for the reference
model, its repeat probe) into ``spec.yaml`` through the one spec writer; ``check_spec`` scores
fresh held-out requests with the written spec and says how well each circuit separates text
with repeated random spans from ordinary text. Both score with ``ReferenceScorer``, the
offline ground truth, on windows of the held-out natural corpus (``induction.held_out_corpus``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sidecar.discover.induction import HeadRef, special_token_ids
from sidecar.discover.probe_training import ProbeResult, auroc
from sidecar.discover.scorer import ReferenceScorer, ScoredTokens
from sidecar.models import data
from sidecar.spec.identity import model_hash
from sidecar.spec.load import load_spec
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

FALSE_POSITIVE_RATE = 0.01  # thresholds: 1% of ordinary-text tokens fire (benign control)
CALIBRATION_SEED, CHECK_SEED = 21, 22
REQUESTS = 24  # windows per kind and split (default)
PROBE_COMPONENT = "repeat_probe"


@dataclass(frozen=True)
class SpecCheck:
    """How the written spec's circuits score whole requests of each kind (held-out text)."""

    circuit: str
    ordinary_means: tuple[float, ...]  # per-request mean score, natural text
    repeated_means: tuple[float, ...]  # per-request mean score, text with repeated random spans
    auroc: float  # separation of the two sets of request means
    ordinary_firing: float  # share of ordinary tokens above the threshold
    repeated_firing: float  # share of second-copy tokens above the threshold


def write_draft_spec(
    out_dir: str | Path,
    model_dir: str | Path,
    model_name: str,
    corpus: np.ndarray,
    induction_heads: Sequence[HeadRef],
    previous_token_heads: Sequence[HeadRef],
    probe: ProbeResult | None = None,
    requests: int = REQUESTS,
) -> Path:
    """Write ``out_dir/spec.yaml``: one head component per named head, two circuits.

    Every circuit score is a weighted sum, over its components, of ``(value - mu) / sigma``
    with mu and sigma taken over ordinary (natural, unrepeated) tokens, so ordinary text
    scores about 0 and the unit is "standard deviations of ordinary text". The weights are
    each component's effect size on second copies of repeated spans (a diagonal linear
    discriminant: a component that falls on repeats counts with a negative sign). The
    per-token threshold is set where 1% of ordinary tokens fire. Calibration uses the first
    half of ``corpus``; ``check_spec`` measures on the second half. Refuses (ValueError) a
    component with no spread on ordinary text or a circuit whose members show no effect.
    """
    if not induction_heads or not previous_token_heads:
        raise ValueError("a draft spec needs at least one induction and one previous-token head")
    components = [
        *(_head_entry(f"induction_{h.name}", h) for h in induction_heads),
        *(_head_entry(f"previous_token_{h.name}", h) for h in previous_token_heads),
    ]
    if probe is not None:
        components.append(
            ComponentEntry(
                PROBE_COMPONENT, probe.site.name, direction=probe.weight.numpy(), bias=probe.bias
            )
        )
    groups = {
        "induction": (
            "induction heads: copy the token after the current token's earlier occurrence",
            [c.name for c in components if c.name.startswith(("induction_", PROBE_COMPONENT))],
        ),
        "previous_token": (
            "previous-token heads, which the induction heads read their keys from",
            [c.name for c in components if c.name.startswith("previous_token_")],
        ),
    }
    write = _writer(out_dir, model_dir, model_name, components)
    # A first pass with unit weights gives the component values through the reference scorer.
    path = write([CircuitEntry(n, {m: 1.0 for m in ms}, d) for n, (d, ms) in groups.items()])
    scorer = ReferenceScorer(load_spec(path), model_dir)
    ordinary, repeated = _requests(scorer, corpus[: len(corpus) // 2], CALIBRATION_SEED, requests)
    values = np.concatenate([s.values for s in ordinary]).astype(np.float64)
    second = np.concatenate(
        [s.values[mask] for s, mask in zip(repeated.scored, repeated.masks, strict=True)]
    ).astype(np.float64)
    names = list(ordinary[0].component_names)
    mean, std = values.mean(axis=0), values.std(axis=0)
    flat = [names[i] for i in np.flatnonzero(std == 0)]
    if flat:
        raise ValueError(f"components with zero spread on ordinary text: {', '.join(flat)}")
    effect = (second.mean(axis=0) - mean) / std
    circuits = []
    for name, (description, members) in groups.items():
        columns = [names.index(m) for m in members]
        total = sum(abs(effect[i]) for i in columns)
        if total == 0:
            raise ValueError(f"circuit {name}: its components do not move on repeated text")
        weights = {m: effect[i] / (total * std[i]) for m, i in zip(members, columns, strict=True)}
        bias = -sum(mean[i] * weights[m] for m, i in zip(members, columns, strict=True))
        scores = values[:, columns] @ np.array([weights[m] for m in members]) + bias
        threshold = float(np.quantile(scores, 1 - FALSE_POSITIVE_RATE))
        circuits.append(CircuitEntry(name, weights, description, bias, threshold))
    return write(circuits)


def _writer(out_dir, model_dir, model_name, components):
    header = (
        f"Draft circuit spec for {model_name}, written by `circuitwatch discover heads` from the\n"
        "heads it named, calibrated on held-out natural text; re-run it rather than editing."
    )
    digest = model_hash(model_dir)
    return lambda circuits: write_spec(out_dir, model_name, digest, components, circuits, header)


def check_spec(
    spec_path: str | Path, model_dir: str | Path, corpus: np.ndarray, requests: int = REQUESTS
) -> tuple[SpecCheck, ...]:
    """Score fresh requests of both kinds (second half of ``corpus``) with ``spec_path``."""
    scorer = ReferenceScorer(load_spec(spec_path, model_dir), model_dir)
    ordinary, repeated = _requests(scorer, corpus[len(corpus) // 2 :], CHECK_SEED, requests)
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
    scorer: ReferenceScorer, corpus: np.ndarray, seed: int, requests: int
) -> tuple[list[ScoredTokens], _Repeated]:
    tokenizer = scorer.tokenizer
    specials = special_token_ids(tokenizer)
    bos = tokenizer.bos_token_id
    # The sampler always writes a first token; without a BOS it is written and dropped.
    first = 0 if bos is not None else 1
    sampler = data.WindowSampler(
        corpus, len(tokenizer), specials, bos if bos is not None else specials[0], seed
    )
    ordinary = sampler.batch(requests, data.SpanConfig(repeat_fraction=0.0))
    repeated = sampler.batch(requests, data.SpanConfig(repeat_fraction=1.0))
    rows = tqdm([*ordinary.input_ids, *repeated.input_ids], desc=f"spec windows (seed {seed})")
    scored = [scorer.score(row[first:].tolist()) for row in rows]
    return scored[:requests], _Repeated(
        scored=scored[requests:], masks=[mask[first:].numpy() for mask in repeated.second_copy]
    )


def _head_entry(name: str, head: HeadRef) -> ComponentEntry:
    return ComponentEntry(name, f"blocks.{head.layer}.attn.hook_z", head=head.head)

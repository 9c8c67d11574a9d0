"""``circuitwatch discover heads``: induction and previous-token heads of any Llama-family model.

For ``--model DIR|smollm2|reference``: every head's induction score on fresh repeated random
tokens (``[BOS] + x + x``, lengths the model was not tuned on) and previous-token score on
held-out natural text; the named heads (above threshold, else the top ``k``); mean-, zero- and
resample-ablation of each named group, with second-copy loss on the repeats and loss on
natural text before and after; and a draft spec with one head component per named head and
circuits ``induction`` and ``previous_token`` calibrated on natural text. Writes to ``--out``:

    report.json                  settings, seeds, model hash, per-head scores, named heads,
                                 ablations, the spec's held-out check, timings
    induction_scores.png, previous_token_scores.png, ablations.png
    spec/spec.yaml               the draft spec (``spec_writer.write_draft_spec``)

Natural text for every model is the same source: the held-out standard-library files of the
reference model's corpus (``induction.held_out_corpus``), encoded with the model's tokenizer.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sidecar.discover import plots
from sidecar.discover.ablation import (
    AblationKind,
    AblationResult,
    ablate_heads,
    clean_run,
    d_head,
)
from sidecar.discover.induction import (
    EVAL_LENGTHS,
    EVAL_SEEDS,
    INDUCTION_THRESHOLD,
    PREVIOUS_TOKEN_THRESHOLD,
    EvalSet,
    HeadRef,
    HeadScores,
    head_scores,
    held_out_corpus,
    load_model,
    make_eval_set,
    top_heads,
)
from sidecar.discover.probe_training import ProbeResult
from sidecar.discover.spec_writer import (
    CALIBRATION_SEED,
    CHECK_SEED,
    REQUESTS,
    SpecCheck,
    check_spec,
    format_spec_check,
    write_draft_spec,
)
from sidecar.models.registry import REFERENCE_DIR, resolve_model
from sidecar.spec.identity import model_hash

# Any model but the reference: repeats of 30 and 50 tokens (nothing was tuned on them), one
# batch of 8 per length, so a 135M model runs in minutes on two CPU cores.
DEFAULT_LENGTHS = (30, 50)
DEFAULT_SEEDS = (1001,)
SPEC_REQUESTS = 16  # 2048 ordinary tokens: the 1% threshold rests on about 20 of them
REFERENCE_MODEL_NAME = "circuitwatch-reference"
NATURAL_TEXT = (
    "held-out Python standard-library files (every 20th *.py of this interpreter's stdlib, "
    "sorted; tests, site-packages, encodings left out), encoded with the model's tokenizer"
)
GROUPS = ("induction", "previous_token")


@dataclass(frozen=True)
class Settings:
    lengths: tuple[int, ...]  # lengths of x in [BOS] + x + x
    seeds: tuple[int, ...]  # one batch of repeats per length and seed; natural windows too
    batch: int
    natural_len: int
    induction_threshold: float
    previous_token_threshold: float
    top_k: int  # heads named per group when none passes its threshold
    ablations: tuple[AblationKind, ...]
    spec_requests: int  # windows per kind (ordinary, repeated) to calibrate and to check the spec
    calibration_seed: int = CALIBRATION_SEED
    check_seed: int = CHECK_SEED
    natural_text: str = NATURAL_TEXT


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: str
    hash: str
    n_layers: int
    n_heads: int  # query heads: one hook_z slice each
    n_kv_heads: int
    d_head: int
    bos_token_id: int | None


@dataclass(frozen=True)
class HeadEntry:
    name: str
    layer: int
    head: int
    induction: float
    previous_token: float


@dataclass(frozen=True)
class AblationEffect:
    group: str  # induction | previous_token
    kind: AblationKind
    heads: tuple[str, ...]
    repeated_before: float  # second-copy loss on repeated random tokens, nats/token
    repeated_after: float
    repeated_factor: float
    natural_before: float  # loss on held-out natural text
    natural_after: float
    natural_factor: float

    @classmethod
    def of(cls, group: str, r: AblationResult) -> AblationEffect:
        return cls(
            group, r.kind, tuple(h.name for h in r.heads), r.repeated_before, r.repeated_after,
            r.repeated_factor, r.natural_before, r.natural_after, r.natural_factor,
        )  # fmt: skip


@dataclass(frozen=True)
class Timings:
    load_s: float
    scores_s: float
    ablations_s: float
    spec_s: float
    total_s: float


@dataclass(frozen=True)
class HeadsReport:
    """What ``report.json`` holds."""

    model: ModelInfo
    settings: Settings
    heads: tuple[HeadEntry, ...]  # every layer x head
    induction_heads: tuple[str, ...]
    previous_token_heads: tuple[str, ...]
    ablations: tuple[AblationEffect, ...]
    spec: str  # spec.yaml, relative to the report folder
    spec_check: tuple[SpecCheck, ...]
    timings: Timings


@dataclass(frozen=True, eq=False)
class Discovery:
    """The in-memory analysis, before anything is written (``report.py`` adds the probe)."""

    model_dir: Path
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    corpus: np.ndarray
    eval_set: EvalSet
    settings: Settings
    scores: HeadScores
    induction_heads: tuple[HeadRef, ...]
    previous_token_heads: tuple[HeadRef, ...]
    ablations: tuple[tuple[str, AblationResult], ...]  # (group, result)
    load_s: float
    scores_s: float
    ablations_s: float


def default_settings(model_dir: Path, **overrides) -> Settings:
    """The reference model keeps its evaluation lengths (50, 60) and two seeds."""
    reference = model_dir.resolve() == REFERENCE_DIR.resolve()
    values = {
        "lengths": EVAL_LENGTHS if reference else DEFAULT_LENGTHS,
        "seeds": EVAL_SEEDS if reference else DEFAULT_SEEDS,
        "batch": 8,
        "natural_len": 128,
        "induction_threshold": INDUCTION_THRESHOLD,
        "previous_token_threshold": PREVIOUS_TOKEN_THRESHOLD,
        "top_k": 3,
        "ablations": tuple(AblationKind),
        "spec_requests": REQUESTS if reference else SPEC_REQUESTS,
    }
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values)


def discover(model_dir: Path, settings: Settings, progress: bool = True) -> Discovery:
    started = time.monotonic()
    model, tokenizer = load_model(model_dir)
    corpus = held_out_corpus(tokenizer)
    eval_set = make_eval_set(
        tokenizer, corpus, settings.lengths, settings.seeds, settings.batch, settings.natural_len
    )
    loaded = time.monotonic()
    scores = head_scores(model, eval_set, progress=progress)
    induction = tuple(top_heads(scores.induction, settings.induction_threshold, settings.top_k))
    previous = tuple(
        top_heads(scores.previous_token, settings.previous_token_threshold, settings.top_k)
    )
    scored = time.monotonic()
    clean = clean_run(model, eval_set)
    runs = [
        (g, h, k)
        for g, h in zip(GROUPS, (induction, previous), strict=True)
        for k in settings.ablations
    ]
    ablations = tuple(
        (group, ablate_heads(model, eval_set, heads, kind, clean))
        for group, heads, kind in tqdm(runs, desc="ablations", disable=not progress)
    )
    return Discovery(
        model_dir=model_dir, model=model, tokenizer=tokenizer, corpus=corpus, eval_set=eval_set,
        settings=settings, scores=scores, induction_heads=induction, previous_token_heads=previous,
        ablations=ablations, load_s=loaded - started, scores_s=scored - loaded,
        ablations_s=time.monotonic() - scored,
    )  # fmt: skip


def write_report(
    found: Discovery,
    out: Path,
    probe: ProbeResult | None = None,
    started: float | None = None,
    spec_dir: Path | None = None,
) -> HeadsReport:
    """Draft spec (and its held-out check), figures and ``report.json`` under ``out``; the
    spec goes to ``spec_dir`` when given, else ``out/spec``."""
    out.mkdir(parents=True, exist_ok=True)
    spec_started = time.monotonic()
    reference = found.model_dir.resolve() == REFERENCE_DIR.resolve()
    name = REFERENCE_MODEL_NAME if reference else found.model_dir.name
    spec_path = write_draft_spec(
        spec_dir if spec_dir is not None else out / "spec", found.model_dir, name, found.corpus,
        found.induction_heads, found.previous_token_heads, probe, found.settings.spec_requests,
    )  # fmt: skip
    checks = check_spec(spec_path, found.model_dir, found.corpus, found.settings.spec_requests)
    spec_s = time.monotonic() - spec_started
    s = found.settings
    plots.heatmap(
        found.scores.induction.numpy(), f"{name}: induction score (repeats {s.lengths})",
        found.induction_heads, s.induction_threshold, out / "induction_scores.png",
    )  # fmt: skip
    plots.heatmap(
        found.scores.previous_token.numpy(), f"{name}: previous-token score (natural text)",
        found.previous_token_heads, s.previous_token_threshold, out / "previous_token_scores.png",
    )  # fmt: skip
    plots.ablation_bars(found.ablations, out / "ablations.png")
    config = found.model.config
    n_layers, n_heads = found.scores.induction.shape
    report = HeadsReport(
        model=ModelInfo(
            name, str(found.model_dir), model_hash(found.model_dir), n_layers, n_heads,
            getattr(config, "num_key_value_heads", None) or n_heads, d_head(found.model),
            found.tokenizer.bos_token_id,
        ),
        settings=s,
        heads=tuple(
            HeadEntry(
                HeadRef(layer, head).name, layer, head,
                float(found.scores.induction[layer, head]),
                float(found.scores.previous_token[layer, head]),
            )
            for layer in range(n_layers)
            for head in range(n_heads)
        ),
        induction_heads=tuple(h.name for h in found.induction_heads),
        previous_token_heads=tuple(h.name for h in found.previous_token_heads),
        ablations=tuple(AblationEffect.of(g, r) for g, r in found.ablations),
        spec=os.path.relpath(spec_path, out),
        spec_check=checks,
        timings=Timings(
            found.load_s, found.scores_s, found.ablations_s, spec_s,
            time.monotonic() - (started if started is not None else spec_started),
        ),
    )  # fmt: skip
    (out / "report.json").write_text(json.dumps(asdict(report), indent=1, default=_jsonable) + "\n")
    return report


def _jsonable(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def format_summary(report: HeadsReport) -> str:
    by_name = {h.name: h for h in report.heads}
    s = report.settings
    lines = [
        f"{report.model.name}: {report.model.n_layers} layers x {report.model.n_heads} heads "
        f"({report.model.n_kv_heads} KV), repeats of {s.lengths} tokens",
        f"induction heads (score > {s.induction_threshold}, else top {s.top_k}): "
        + ", ".join(f"{n} {by_name[n].induction:.2f}" for n in report.induction_heads),
        f"previous-token heads (score > {s.previous_token_threshold}, else top {s.top_k}): "
        + ", ".join(f"{n} {by_name[n].previous_token:.2f}" for n in report.previous_token_heads),
        "",
        "ablation                  2nd-copy loss (repeats)     natural-text loss",
    ]
    for a in report.ablations:
        lines.append(
            f"{a.group:<14} {a.kind.value:<9} {a.repeated_before:5.2f} -> {a.repeated_after:5.2f} "
            f"(x{a.repeated_factor:5.1f})     {a.natural_before:5.2f} -> {a.natural_after:5.2f} "
            f"(x{a.natural_factor:4.2f})"
        )
    lines += [
        "",
        f"draft spec {report.spec}, held-out check:",
        format_spec_check(report.spec_check),
    ]
    t = report.timings
    lines.append(
        f"({t.total_s:.0f}s: load {t.load_s:.0f}, scores {t.scores_s:.0f}, "
        f"ablations {t.ablations_s:.0f}, spec {t.spec_s:.0f})"
    )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, out_required: bool = True) -> None:
    parser.add_argument(
        "--model", default="reference", help="model directory, smollm2 or reference (default)"
    )
    parser.add_argument(
        "--out", type=Path, required=out_required, default=None, help="report folder to write"
    )
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=None,
        help=f"repeat lengths (default: {DEFAULT_LENGTHS}; the reference model {EVAL_LENGTHS})",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="repeat batch seeds")
    parser.add_argument("--batch", type=int, default=None, help="sequences per batch (8)")
    parser.add_argument(
        "--top-k", type=int, default=None, help="heads named per group if none passes (3)"
    )
    parser.add_argument(
        "--spec-requests", type=int, default=None,
        help=f"128-token windows per kind to calibrate and to check the spec "
        f"(default {SPEC_REQUESTS}; the reference model {REQUESTS})",
    )  # fmt: skip
    parser.add_argument("--induction-threshold", type=float, default=None)
    parser.add_argument("--previous-token-threshold", type=float, default=None)


def settings_from(args: argparse.Namespace, model_dir: Path) -> Settings:
    return default_settings(
        model_dir,
        lengths=tuple(args.lengths) if args.lengths else None,
        seeds=tuple(args.seeds) if args.seeds else None,
        batch=args.batch,
        top_k=args.top_k,
        spec_requests=args.spec_requests,
        induction_threshold=args.induction_threshold,
        previous_token_threshold=args.previous_token_threshold,
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model_dir = resolve_model(args.model)
    found = discover(model_dir, settings_from(args, model_dir))
    report = write_report(found, args.out, started=started)
    print(format_summary(report))
    print(f"\nwrote {args.out}")
    return 0

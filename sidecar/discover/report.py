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
from sidecar.discover.probe_training import ProbeResult, train_repeat_probe
from sidecar.models import data
from sidecar.models.registry import REFERENCE_DIR


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
        # Imported here: the spec writer builds on this module's report.
        from sidecar.discover.spec_writer import check_spec, format_spec_check, write_spec

        path = write_spec(report, args.write_spec)
        check = check_spec(path, args.model)
        print(f"\nwrote {path}\n{format_spec_check(check)}")
    return 0 if report.induction_heads and report.previous_token_heads else 1

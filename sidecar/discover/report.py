"""``circuitwatch report``: ``circuitwatch discover heads`` on the bundled reference model, plus
its repeat probe.

The same analysis, figures and report folder as ``discover heads`` (per-head scores, named
heads, mean/zero/resample ablations, draft spec and its held-out check; ``--out``, default
``./circuitwatch-report``); the reference report also trains the linear repeat probe at the
last residual stream and adds it to the spec's ``induction`` circuit. ``--write-spec DIR``
puts the spec in DIR (how ``sidecar/models/reference_spec`` is made). About a minute on an
idle CPU.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from sidecar.discover import heads
from sidecar.discover.probe_training import ProbeResult, train_repeat_probe
from sidecar.models.registry import resolve_model

DEFAULT_OUT = Path("circuitwatch-report")


def format_probe(probe: ProbeResult) -> str:
    return (
        f"repeat probe at {probe.site.name}: held-out AUROC {probe.test_auroc:.3f}, "
        f"balanced accuracy {probe.test_balanced_accuracy:.3f} "
        f"({probe.test_positives} of {probe.test_tokens} tokens in second copies)"
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    heads.add_arguments(parser, out_required=False)
    parser.set_defaults(out=DEFAULT_OUT)
    parser.add_argument(
        "--write-spec",
        type=Path,
        default=None,
        metavar="DIR",
        help="write the spec (spec.yaml + directions.safetensors) to DIR instead of OUT/spec",
    )


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    model_dir = resolve_model(args.model)
    found = heads.discover(model_dir, heads.settings_from(args, model_dir))
    probe = train_repeat_probe(found.model, found.tokenizer, found.corpus)
    report = heads.write_report(found, args.out, probe, started, args.write_spec)
    print(heads.format_summary(report))
    print(format_probe(probe))
    print(f"\nwrote {args.out}")
    return 0

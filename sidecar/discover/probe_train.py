"""``circuitwatch probe-train``: linear behaviour probes on a real model, reported as is usual.

Labelled requests (``datasets``: the bundled harmful/benign composition, or a JSONL file)
are rendered exactly as the engine renders them, run through the HF model in batches (one
forward pass each, right-padded: causal attention keeps real tokens blind to the padding),
and pooled per site at each token position choice:

    last   the final prompt token (the opened assistant turn), where the model settles its
           answer; the sidecar's ``last`` aggregation of the prompt phase
    mean   the mean over every prompt token; the sidecar's ``mean`` aggregation

A class-balanced logistic regression (``probe_training.fit_logistic``) is fitted per site
and position on the *training* sources. Examples are split by source, never at random
across one: held-out sources (default: HarmBench and the benign test templates) report
AUROC and the TPR at the target FPR, whose threshold comes from a separate benign
calibration source, never from the reported set; report-only sources (default: the tricky
benign set and jailbreaks) report how often they are flagged at that threshold. The probe
that goes into the spec is the one with the lowest log-loss on a validation fifth of the
training sources (by a hash of the text), each class weighing half and each source within a
class the same (so the few harmful-sounding safe contrast requests count as much as the many
plain benign ones), among the positions ``--positions`` allows (``last`` alone: the only
position immune to vLLM's prefix caching, which skips cached prompt tokens and so changes a
live ``mean``), or the one named by ``--choose``. The report lists every position.

The spec gets one ``direction`` component and one circuit with the matching aggregation and
no verdict thresholds: ``circuitwatch calibrate`` sets those on the calibration requests
this command writes next to its report (``benign_calibration.jsonl``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from sidecar.discover.calibrate import flagged_rate, threshold_at_fpr
from sidecar.discover.capture import capture
from sidecar.discover.datasets import PROVENANCE, Example, read_jsonl, standard_dataset, write_jsonl
from sidecar.discover.probe_training import L2, auroc, fit_logistic
from sidecar.spec.identity import model_hash
from sidecar.spec.schema import Aggregation, AggregationKind
from sidecar.spec.sites import Site, SiteKind
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

POSITIONS = {"last": AggregationKind.LAST, "mean": AggregationKind.MEAN}
COMPONENT = "harm_probe"
CIRCUIT = "harmful_request"
VALIDATION_SHARE = 5  # one in five training examples (by text hash) validates the choice


@dataclass(frozen=True)
class Roles:
    """Which sources play which part; a source matches its name or any ``name/...`` below it."""

    heldout: tuple[str, ...] = ("harmbench", "benign/test", "twin/test")
    calibration: tuple[str, ...] = ("benign/calibration", "twin/calibration")
    report: tuple[str, ...] = ("tricky", "jailbreak")

    def role(self, example: Example) -> str:
        for role in ("heldout", "calibration", "report"):
            if any(_matches(example.source, s) for s in getattr(self, role)):
                return role
        digest = hashlib.sha256(example.content.encode()).digest()
        return "validation" if digest[0] % VALIDATION_SHARE == 0 else "train"


def _matches(source: str, name: str) -> bool:
    return source == name or source.startswith(name + "/")


@dataclass(frozen=True)
class ProbeRow:
    """One probe (site x position), measured on data it was not fitted to."""

    site: str
    layer: int
    position: str
    validation_loss: float  # class- and source-balanced log-loss; chooses the probe
    validation_auroc: float
    heldout_auroc: float
    threshold: float  # logit at the target FPR on the calibration benign requests
    heldout_tpr: float  # held-out harmful requests flagged at that threshold
    heldout_fpr: float  # held-out benign requests flagged at that threshold
    # per held-out benign source: (source, AUROC against all held-out harmful, FPR)
    heldout_by_source: tuple[tuple[str, float, float], ...]
    flagged: tuple[tuple[str, float], ...]  # report-only source -> fraction flagged


@dataclass(frozen=True, eq=False)
class Probe:
    row: ProbeRow
    weight: torch.Tensor  # float32 [width], on raw activations
    bias: float


def pooled_features(
    model, tokenizer, token_ids: Sequence[list[int]], sites: Sequence[Site], batch_size: int = 32
) -> dict[tuple[Site, str], torch.Tensor]:
    """(site, position) -> [N, width] float32: the final prompt token's and the prompt mean."""
    order = np.argsort([len(ids) for ids in token_ids], kind="stable")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[tuple[Site, str], list[torch.Tensor]] = {(s, p): [] for s in sites for p in POSITIONS}
    for start in tqdm(range(0, len(order), batch_size), desc="activations", unit="batch"):
        batch = [token_ids[i] for i in order[start : start + batch_size]]
        lengths = torch.tensor([len(ids) for ids in batch])
        ids = torch.full((len(batch), int(lengths.max())), pad, dtype=torch.long)
        for row, sequence in enumerate(batch):
            ids[row, : len(sequence)] = torch.tensor(sequence)
        mask = (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).float()[..., None]
        captured = capture(model, ids, tuple(sites))
        for site in sites:
            x = captured[site]
            out[(site, "last")].append(x[torch.arange(len(batch)), lengths - 1])
            out[(site, "mean")].append((x * mask).sum(1) / lengths[:, None])
    inverse = torch.from_numpy(np.argsort(order, kind="stable"))
    return {key: torch.cat(parts)[inverse] for key, parts in out.items()}


def cached_features(
    cache: Path | None, model, tokenizer, token_ids: Sequence[list[int]], sites: Sequence[Site]
) -> dict[tuple[Site, str], torch.Tensor]:
    """``pooled_features``, kept in ``cache`` (safetensors) under a hash of the token ids and
    sites, so that a re-run with other roles, L2 or choice skips the forward passes."""
    if cache is None:
        return pooled_features(model, tokenizer, token_ids, sites)
    digest = hashlib.sha256(json.dumps([list(map(int, t)) for t in token_ids]).encode())
    digest.update(" ".join(s.name for s in sites).encode())
    key = digest.hexdigest()
    if cache.is_file():
        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return {(s, p): f.get_tensor(f"{s.name}|{p}") for s in sites for p in POSITIONS}
    features = pooled_features(model, tokenizer, token_ids, sites)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{s.name}|{p}": x.contiguous() for (s, p), x in features.items()}
    save_file(tensors, str(cache), metadata={"key": key})
    return features


def balanced_log_loss(logits: torch.Tensor, labels: torch.Tensor, sources: np.ndarray) -> float:
    """Log-loss with each class weighing half and each source within its class the same, so
    that a small source (the harmful-sounding safe contrast requests) counts as much as a
    large one."""
    losses = F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="none")
    per_class = []
    for label in (True, False):
        names = sorted(set(sources[(labels == label).numpy()]))
        per_class.append(
            np.mean([float(losses[torch.from_numpy(sources == n)].mean()) for n in names])
        )
    return float(np.mean(per_class))


def auroc_by_benign_source(
    scores: torch.Tensor, labels: torch.Tensor, sources: np.ndarray, part: torch.Tensor
) -> list[tuple[str, float]]:
    """AUROC of every harmful request in ``part`` against each benign source in it."""
    harmful = part & labels
    names = sorted(set(sources[(part & ~labels).numpy()]))
    pairs = [harmful | (part & torch.from_numpy(sources == name)) for name in names]
    return [
        (name, auroc(scores[pair], labels[pair])) for name, pair in zip(names, pairs, strict=True)
    ]


def evaluate_probe(
    site: Site,
    position: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    roles: np.ndarray,
    sources: np.ndarray,
    fpr: float,
    l2: float = L2,
) -> Probe:
    """Fit on the training role; measure on validation, held-out and report-only roles."""
    train = torch.from_numpy(roles == "train")
    weight, bias = fit_logistic(x[train], labels[train], l2)
    logits = (x.double() @ weight.double() + bias).float()

    def part(role: str) -> torch.Tensor:
        return torch.from_numpy(roles == role)

    val, held = part("validation"), part("heldout")
    calibration = part("calibration") & ~labels
    threshold = threshold_at_fpr(logits[calibration].numpy(), fpr)
    held_logits, held_labels = logits[held].numpy(), labels[held].numpy()
    report_sources = sorted(set(sources[roles == "report"]))
    by_source = tuple(
        (name, value, flagged_rate(logits.numpy()[(sources == name) & held.numpy()], threshold))
        for name, value in auroc_by_benign_source(logits, labels, sources, held)
    )
    row = ProbeRow(
        site=site.name,
        layer=site.layer,
        position=position,
        validation_loss=balanced_log_loss(logits[val], labels[val], sources[val.numpy()]),
        validation_auroc=auroc(logits[val], labels[val]),
        heldout_auroc=auroc(logits[held], labels[held]),
        threshold=threshold,
        heldout_tpr=flagged_rate(held_logits[held_labels], threshold),
        heldout_fpr=flagged_rate(held_logits[~held_labels], threshold),
        heldout_by_source=by_source,
        flagged=tuple(
            (s, flagged_rate(logits.numpy()[sources == s], threshold)) for s in report_sources
        ),
    )
    return Probe(row, weight, bias)


def train_probes(
    model,
    tokenizer,
    examples: Sequence[Example],
    sites: Sequence[Site],
    roles: Roles = Roles(),
    fpr: float = 0.01,
    l2: float = L2,
    cache: Path | None = None,
) -> tuple[list[Probe], dict]:
    """Every (site, position) probe, and the length-only baseline and split sizes."""
    token_ids = [e.token_ids(tokenizer) for e in examples]
    labels = torch.tensor([e.label == 1 for e in examples])
    role_of = np.array([roles.role(e) for e in examples])
    sources = np.array([e.source for e in examples])
    for needed in ("train", "validation", "calibration", "heldout"):
        if not (role_of == needed).any():
            raise ValueError(f"no examples in the {needed} role: check the source names")
    features = cached_features(cache, model, tokenizer, token_ids, sites)
    probes = [
        evaluate_probe(site, pos, features[(site, pos)], labels, role_of, sources, fpr, l2)
        for site, pos in tqdm(features, desc="probes", unit="probe")
    ]
    lengths = torch.tensor([len(ids) for ids in token_ids], dtype=torch.float64)
    summary = {
        "length_auroc": {
            role: auroc(lengths[mask], labels[mask])
            for role in ("train", "heldout")
            for mask in [torch.from_numpy(role_of == role)]
        },
        "length_auroc_heldout_by_source": dict(
            auroc_by_benign_source(lengths, labels, sources, torch.from_numpy(role_of == "heldout"))
        ),
        "counts": {
            f"{role}/{source}": int(((role_of == role) & (sources == source)).sum())
            for role, source in sorted(set(zip(role_of, sources, strict=True)))
        },
    }
    return probes, summary


def choose(probes: Sequence[Probe], named: str | None) -> Probe:
    """``SITE:POSITION`` if named, else the lowest validation log-loss."""
    if named:
        site, _, position = named.rpartition(":")
        for probe in probes:
            if probe.row.site == site and probe.row.position == position:
                return probe
        raise ValueError(
            f"--choose {named}: no such probe (SITE:POSITION, e.g. blocks.28.hook_resid_post:last)"
        )
    return min(probes, key=lambda p: p.row.validation_loss)


def write_probe_spec(folder: Path, model_name: str, model_dir: Path, probe: Probe) -> Path:
    row = probe.row
    component = ComponentEntry(COMPONENT, row.site, direction=probe.weight, bias=probe.bias)
    circuit = CircuitEntry(
        name=CIRCUIT,
        weights={COMPONENT: 1.0},
        description=(
            f"logit of a harmful request: logistic probe at {row.site}, {row.position} prompt "
            f"token{'s' if row.position == 'mean' else ''}"
        ),
        aggregation=Aggregation(POSITIONS[row.position]),
    )
    header = (
        f"Written by `circuitwatch probe-train` ({row.site}, position {row.position});\n"
        "verdict thresholds come from `circuitwatch calibrate`. Re-run them rather than editing."
    )
    return write_spec(folder, model_name, model_hash(model_dir), [component], [circuit], header)


def plot(rows: Sequence[ProbeRow], fpr: float, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r.site.split(".", 2)[2] for r in rows})
    panels = [
        ("heldout_auroc", "held-out AUROC", "auroc_by_layer.png"),
        ("heldout_tpr", f"held-out TPR at {fpr:.0%} FPR", "tpr_by_layer.png"),
        (None, f"tricky-benign flagged at the {fpr:.0%}-FPR threshold", "tricky_fpr_by_layer.png"),
    ]
    paths = []
    for field, title, name in panels:
        figure, axis = plt.subplots(figsize=(7, 4))
        for kind in kinds:
            for position in POSITIONS:
                line = sorted(
                    (r for r in rows if r.site.endswith(kind) and r.position == position),
                    key=lambda r: r.layer,
                )
                if not line:
                    continue
                values = [
                    getattr(r, field) if field else dict(r.flagged).get("tricky", np.nan)
                    for r in line
                ]
                axis.plot(
                    [r.layer for r in line], values, marker="o", ms=3, label=f"{kind}, {position}"
                )
        axis.set_xlabel("layer")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
        figure.tight_layout()
        figure.savefig(folder / name, dpi=120)
        plt.close(figure)
        paths.append(folder / name)
    return paths


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="model name or directory")
    parser.add_argument(
        "--data", default="bundled", help="labelled JSONL, or 'bundled' (datasets.standard_dataset)"
    )
    parser.add_argument("--out", required=True, help="folder for the spec (spec.yaml + directions)")
    parser.add_argument(
        "--report", help="folder for the report, plots and benign splits (default: --out)"
    )
    parser.add_argument(
        "--sites", nargs="+", help="site names (default: every layer's hook_resid_post)"
    )
    parser.add_argument(
        "--positions",
        nargs="+",
        choices=list(POSITIONS),
        default=list(POSITIONS),
        help="positions the chosen probe may use (the report lists every one); 'last' alone "
        "is immune to vLLM prefix caching, which skips cached prompt tokens",
    )
    parser.add_argument(
        "--heldout", nargs="+", default=list(Roles.heldout), help="held-out sources"
    )
    parser.add_argument(
        "--calibration", nargs="+", default=list(Roles.calibration), help="benign threshold sources"
    )
    parser.add_argument(
        "--report-only", nargs="*", default=list(Roles.report), help="sources only reported on"
    )
    parser.add_argument("--fpr", type=float, default=0.01, help="FPR of the reported threshold")
    parser.add_argument("--choose", help="SITE:POSITION to write (default: best validation loss)")
    parser.add_argument("--l2", type=float, default=L2, help="L2 on standardised features")
    parser.add_argument("--cache", help="safetensors file caching the pooled activations")


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidecar.models.registry import SOURCES, resolve_model

    started = time.monotonic()
    model_dir = resolve_model(args.model)
    model_name = args.model if args.model in SOURCES else model_dir.name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    if args.sites:
        sites = [Site.parse(name) for name in args.sites]
    else:
        sites = [Site(layer, SiteKind.RESID_POST) for layer in range(n_layers)]
    examples = standard_dataset() if args.data == "bundled" else read_jsonl(args.data)
    roles = Roles(tuple(args.heldout), tuple(args.calibration), tuple(args.report_only))
    cache = Path(args.cache) if args.cache else None
    probes, summary = train_probes(
        model, tokenizer, examples, sites, roles, args.fpr, args.l2, cache
    )
    chosen = choose([p for p in probes if p.row.position in args.positions], args.choose)
    out = Path(args.out)
    spec_path = write_probe_spec(out, model_name, model_dir, chosen)
    report_dir = Path(args.report or out)
    report_dir.mkdir(parents=True, exist_ok=True)
    for name, role in (("benign_calibration", "calibration"), ("benign_heldout", "heldout")):
        benign = [e for e in examples if e.label == 0 and roles.role(e) == role]
        write_jsonl(report_dir / f"{name}.jsonl", benign)
    rows = [p.row for p in probes]
    report = {
        "model": model_name,
        "model_hash": model_hash(model_dir),
        "data": args.data,
        "provenance": [asdict(p) for p in PROVENANCE],
        "roles": asdict(roles),
        "target_fpr": args.fpr,
        "l2": args.l2,
        **summary,
        "chosen": asdict(chosen.row),
        "chosen_by": "--choose" if args.choose else "lowest validation log-loss",
        "chosen_positions": list(args.positions),
        "probes": [asdict(r) for r in rows],
        "seconds": round(time.monotonic() - started, 1),
    }
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.fpr, report_dir)
    _print_table(rows, chosen.row, summary, args.fpr)
    print(f"wrote {spec_path} and {report_dir / 'report.json'} ({report['seconds']} s)")
    return 0


def _print_table(rows: Sequence[ProbeRow], chosen: ProbeRow, summary: dict, fpr: float) -> None:
    length = summary["length_auroc"]
    print(f"length-only AUROC: train {length['train']:.3f}, held-out {length['heldout']:.3f}")
    for source, value in summary["length_auroc_heldout_by_source"].items():
        print(f"  held-out harmful vs {source}: {value:.3f}")
    print(f"{'site':28} {'pos':5} {'val loss':>8} {'AUROC':>6} {f'TPR@{fpr:.0%}':>8} "
          f"{'FPR':>6}  flagged (report-only)")  # fmt: skip
    for r in rows:
        flagged = ", ".join(f"{s} {v:.2f}" for s, v in r.flagged)
        mark = " *" if r == chosen else ""
        print(f"{r.site:28} {r.position:5} {r.validation_loss:8.4f} {r.heldout_auroc:6.3f} "
              f"{r.heldout_tpr:8.3f} {r.heldout_fpr:6.3f}  {flagged}{mark}")  # fmt: skip

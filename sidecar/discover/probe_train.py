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
plain benign ones), after a two-parameter logistic recalibration of the scores on those same
requests (``probe_eval.recalibrated_loss``: positions score on different scales), among the
positions ``--positions`` allows (``last`` alone: the only position immune to vLLM's prefix
caching, which skips cached prompt tokens and so changes a
live ``mean``), or the one named by ``--choose``. The report lists every position.

``--per-token AGGREGATION ...`` adds per-token probes (``token_probes``): trained on token
labels (``datasets``: by default a harmful request's tokens from its user message on, or the
spans or token labels the data gives), each judged per request by the named aggregations of
its prompt tokens' scores; their rows have position ``tokens/<aggregation>`` and compete in
the same choice.

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
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from sidecar.discover.capture import capture
from sidecar.discover.datasets import (
    DECONTAMINATE,
    PROVENANCE,
    Example,
    near_duplicates,
    read_jsonl,
    standard_dataset,
    write_jsonl,
)
from sidecar.discover.probe_eval import Probe, ProbeRow, Roles, auroc_by_benign_source, measure
from sidecar.discover.probe_training import L2, auroc, fit_logistic
from sidecar.discover.token_probes import TOKENS, parse_aggregation, token_probes, token_table
from sidecar.spec.identity import model_hash
from sidecar.spec.schema import Aggregation, AggregationKind
from sidecar.spec.sites import Site, SiteKind
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec

POSITIONS = {"last": AggregationKind.LAST, "mean": AggregationKind.MEAN}
COMPONENT = "harm_probe"
CIRCUIT = "harmful_request"


@dataclass(frozen=True, eq=False)
class Activations:
    """What one forward pass per request leaves: pooled prompt features per (site, position),
    [requests, width], and every token's activations per token site, [tokens, width] in
    request order (prompt, then generated)."""

    pooled: dict[tuple[Site, str], torch.Tensor]
    tokens: dict[Site, torch.Tensor]


def activations(
    model,
    tokenizer,
    sequences: Sequence[list[int]],
    prompt_lengths: Sequence[int],
    sites: Sequence[Site],
    token_sites: Sequence[Site] = (),
    batch_size: int = 32,
) -> Activations:
    """Batched, right-padded forward passes (causal attention keeps real tokens blind to the
    padding, and prompt tokens blind to the generated ones after them)."""
    order = np.argsort([len(ids) for ids in sequences], kind="stable")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    pooled: dict[tuple[Site, str], list[torch.Tensor]] = {
        (s, p): [] for s in sites for p in POSITIONS
    }
    tokens: dict[Site, list[torch.Tensor]] = {s: [None] * len(sequences) for s in token_sites}
    wanted = tuple(dict.fromkeys([*sites, *token_sites]))
    for start in tqdm(range(0, len(order), batch_size), desc="activations", unit="batch"):
        index = order[start : start + batch_size]
        lengths = torch.tensor([len(sequences[i]) for i in index])
        prompt = torch.tensor([prompt_lengths[i] for i in index])
        ids = torch.full((len(index), int(lengths.max())), pad, dtype=torch.long)
        for row, i in enumerate(index):
            ids[row, : lengths[row]] = torch.tensor(sequences[i])
        mask = (torch.arange(ids.shape[1])[None, :] < prompt[:, None]).float()[..., None]
        captured = capture(model, ids, wanted)
        for site in sites:
            x = captured[site]
            pooled[(site, "last")].append(x[torch.arange(len(index)), prompt - 1])
            pooled[(site, "mean")].append((x * mask).sum(1) / prompt[:, None])
        for site in token_sites:
            for row, i in enumerate(index):
                tokens[site][i] = captured[site][row, : lengths[row]].clone()
    inverse = torch.from_numpy(np.argsort(order, kind="stable"))
    return Activations(
        {key: torch.cat(parts)[inverse] for key, parts in pooled.items()},
        {site: torch.cat(parts) for site, parts in tokens.items()},
    )


def row_keys(sequences: Sequence[list[int]], prompt_lengths: Sequence[int]) -> list[str]:
    """One key per request: what its activations were computed on (token ids, prompt length)."""
    return [
        hashlib.sha256(json.dumps([int(n), list(map(int, ids))]).encode()).hexdigest()[:32]
        for ids, n in zip(sequences, prompt_lengths, strict=True)
    ]


def _read_cache(cache: Path, sites: Sequence[Site], token_sites: Sequence[Site]):
    """(row keys, sequence lengths, activations) held in ``cache``, or None when it lacks a
    site asked for (or is in an older format)."""
    with safe_open(str(cache), "pt") as f:
        meta = f.metadata() or {}
        held = set(meta.get("sites", "").split()), set(meta.get("token_sites", "").split())
        if (
            "rows" not in meta
            or not {s.name for s in sites} <= held[0]
            or not {s.name for s in token_sites} <= held[1]
        ):
            return None
        found = Activations(
            {(s, p): f.get_tensor(f"{s.name}|{p}") for s in sites for p in POSITIONS},
            {s: f.get_tensor(f"{s.name}|tokens") for s in token_sites},
        )
    return meta["rows"].split(), [int(n) for n in meta["lengths"].split()], found


def _select(parts: Sequence[tuple[Activations, list[int], int]], token_sites) -> Activations:
    """Rows gathered from several ``Activations``: ``(activations, sequence lengths, row)``
    per output row, in output order."""
    first = parts[0][0]
    pooled = {key: torch.stack([a.pooled[key][row] for a, _, row in parts]) for key in first.pooled}
    sources = {id(a): n for a, n, _ in parts}  # two at most: the cache's and the new rows
    starts = {key: np.concatenate([[0], np.cumsum(n)]) for key, n in sources.items()}
    tokens = {
        site: torch.cat(
            [a.tokens[site][starts[id(a)][row] : starts[id(a)][row + 1]] for a, _, row in parts]
        )
        for site in token_sites
    }
    return Activations(pooled, tokens)


def cached_activations(
    cache: Path | None,
    model,
    tokenizer,
    sequences: Sequence[list[int]],
    prompt_lengths: Sequence[int],
    sites: Sequence[Site],
    token_sites: Sequence[Site] = (),
) -> Activations:
    """``activations``, kept per request in ``cache`` (safetensors; each row keyed by
    ``row_keys``), so that a re-run with other roles, L2, aggregations, choice, a subset of
    the sites, or more data runs forward passes only for requests it has not seen. The cache
    keeps every request it ever held, at the sites of the latest run."""
    if cache is None:
        return activations(model, tokenizer, sequences, prompt_lengths, sites, token_sites)
    keys = row_keys(sequences, prompt_lengths)
    held_keys, held_lengths, held = (
        _read_cache(cache, sites, token_sites) if cache.is_file() else None
    ) or ([], [], None)
    index = {k: i for i, k in enumerate(held_keys)}
    where: dict[str, int] = {}  # each uncached request's first row
    for row, k in enumerate(keys):
        if k not in index:
            where.setdefault(k, row)
    missing = list(where)
    located = {k: (held, held_lengths, i) for k, i in index.items()}
    if missing:
        cached = sum(k in index for k in keys)
        print(f"activations: {cached} of {len(keys)} requests cached, {len(missing)} to run")
        new = activations(
            model,
            tokenizer,
            [sequences[where[k]] for k in missing],
            [prompt_lengths[where[k]] for k in missing],
            sites,
            token_sites,
        )
        new_lengths = [len(sequences[where[k]]) for k in missing]
        located |= {k: (new, new_lengths, i) for i, k in enumerate(missing)}
        everything = [*held_keys, *missing]
        merged = _select([located[k] for k in everything], token_sites)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{s.name}|{p}": x.contiguous() for (s, p), x in merged.pooled.items()}
        tensors |= {f"{s.name}|tokens": x.contiguous() for s, x in merged.tokens.items()}
        meta = {
            "sites": " ".join(s.name for s in sites),
            "token_sites": " ".join(s.name for s in token_sites),
            "rows": " ".join(everything),
            "lengths": " ".join(str(n) for n in [*held_lengths, *new_lengths]),
        }
        save_file(tensors, str(cache), metadata=meta)
    return _select([located[k] for k in keys], token_sites)


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
    """A pooled probe: fit on the training role, measured on the others."""
    train = torch.from_numpy(roles == "train")
    weight, bias = fit_logistic(x[train], labels[train], l2)
    logits = x.double() @ weight.double() + bias
    return Probe(measure(site, position, logits, labels, roles, sources, fpr), weight, bias)


def train_probes(
    model,
    tokenizer,
    examples: Sequence[Example],
    sites: Sequence[Site],
    roles: Roles | None = None,
    fpr: float = 0.01,
    l2: float = L2,
    cache: Path | None = None,
    token_sites: Sequence[Site] = (),
    aggregations: Sequence[Aggregation] = (),
    decontaminate: float = 0.0,
) -> tuple[list[Probe], dict]:
    """Every pooled (site, position) probe, every per-token probe at ``token_sites`` under
    each of ``aggregations``, and the length-only baseline and split sizes. ``decontaminate``
    > 0: training and validation requests whose content words overlap a held-out request of
    their class by that Jaccard share or more are left out (role ``excluded``)."""
    roles = roles or Roles()
    prompt_ids = [e.token_ids(tokenizer) for e in examples]
    sequences = [p + e.generated_ids(tokenizer) for p, e in zip(prompt_ids, examples, strict=True)]
    labels = torch.tensor([e.label == 1 for e in examples])
    role_of = np.array([roles.role(e) for e in examples])
    sources = np.array([e.source for e in examples])
    if decontaminate:  # training requests that reword a held-out one of their class
        for label in (True, False):
            fitting = np.isin(role_of, ("train", "validation")) & (labels == label).numpy()
            held = [e.content for e, r, y in zip(examples, role_of, labels, strict=True)
                    if r == "heldout" and bool(y) == label]  # fmt: skip
            texts = [examples[i].content for i in np.flatnonzero(fitting)]
            near = near_duplicates(texts, held, decontaminate)
            role_of[np.flatnonzero(fitting)[near]] = "excluded"
    for needed in ("train", "validation", "calibration", "heldout"):
        if not (role_of == needed).any():
            raise ValueError(f"no examples in the {needed} role: check the source names")
    lengths = [len(ids) for ids in prompt_ids]
    found = cached_activations(cache, model, tokenizer, sequences, lengths, sites, token_sites)
    probes = [
        evaluate_probe(site, pos, found.pooled[(site, pos)], labels, role_of, sources, fpr, l2)
        for site, pos in tqdm(found.pooled, desc="probes", unit="probe")
    ]
    if token_sites:
        table = token_table(examples, tokenizer)
        for site in tqdm(token_sites, desc="per-token probes", unit="site"):
            x = found.tokens[site]
            probes += token_probes(site, x, table, labels, role_of, sources, aggregations, fpr, l2)
    prompt_lengths = torch.tensor(lengths, dtype=torch.float64)
    summary = {
        "length_auroc": {
            role: auroc(prompt_lengths[mask], labels[mask])
            for role in ("train", "heldout")
            for mask in [torch.from_numpy(role_of == role)]
        },
        "length_auroc_heldout_by_source": dict(
            auroc_by_benign_source(
                prompt_lengths, labels, sources, torch.from_numpy(role_of == "heldout")
            )
        ),
        "counts": {
            f"{role}/{source}": int(((role_of == role) & (sources == source)).sum())
            for role, source in sorted(set(zip(role_of, sources, strict=True)))
        },
    }
    return probes, summary


def aggregation_of(position: str) -> Aggregation:
    """The spec aggregation that computes a row's per-request score live."""
    if position.startswith(TOKENS):
        return parse_aggregation(position.removeprefix(TOKENS))
    return Aggregation(POSITIONS[position])


def choose(probes: Sequence[Probe], named: str | None) -> Probe:
    """``SITE:POSITION`` if named, else the lowest (recalibrated) validation log-loss."""
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
        description=f"logit of a harmful request: logistic probe at {row.site}, {_read(row)}",
        aggregation=aggregation_of(row.position),
    )
    header = (
        f"Written by `circuitwatch probe-train` ({row.site}, position {row.position});\n"
        "verdict thresholds come from `circuitwatch calibrate`. Re-run them rather than editing."
    )
    return write_spec(folder, model_name, model_hash(model_dir), [component], [circuit], header)


def _read(row: ProbeRow) -> str:
    if row.position.startswith(TOKENS):
        return f"per token, {row.position.removeprefix(TOKENS)} over the prompt"
    return "the final prompt token" if row.position == "last" else "the mean prompt token"


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
        figure, axis = plt.subplots(figsize=(9, 4))
        for kind in kinds:
            for position in dict.fromkeys(r.position for r in rows):
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
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
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
        "--per-token",
        nargs="+",
        metavar="AGGREGATION",
        default=[],
        help="also train per-token probes (token labels) at --token-sites, each judged per "
        "request by these aggregations of its prompt tokens' scores: mean, max, last, "
        "max_rolling_mean:WINDOW, ema_max:ALPHA, softmax_max:TEMPERATURE",
    )
    parser.add_argument(
        "--token-sites",
        nargs="+",
        help="sites of the per-token probes (default: --sites; every token of every request "
        "is kept in memory per site, so name a few)",
    )
    parser.add_argument(
        "--positions",
        nargs="+",
        help="positions the chosen probe may use (default: all; the report lists every one): "
        "last, mean, tokens/AGGREGATION; 'last' alone is immune to vLLM prefix caching, "
        "which skips cached prompt tokens",
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
    parser.add_argument("--cache", help="safetensors file caching the activations")
    parser.add_argument(
        "--benign-only",
        action="store_true",
        help="only write the benign calibration and held-out files (no forward passes, no "
        "probe): to recalibrate a trained probe on the current data",
    )
    parser.add_argument(
        "--decontaminate",
        type=float,
        default=DECONTAMINATE,
        help="leave out training requests whose content words overlap a held-out request of "
        "their class by this Jaccard share or more (0: keep all; default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidecar.models.registry import SOURCES, resolve_model

    started = time.monotonic()
    examples = standard_dataset() if args.data == "bundled" else read_jsonl(args.data)
    roles = Roles(tuple(args.heldout), tuple(args.calibration), tuple(args.report_only))
    if args.benign_only:
        for path in write_benign_files(examples, roles, Path(args.report or args.out)):
            print(f"wrote {path}")
        return 0
    model_dir = resolve_model(args.model)
    model_name = args.model if args.model in SOURCES else model_dir.name
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_layers = model.config.num_hidden_layers
    if args.sites:
        sites = [Site.parse(name) for name in args.sites]
    else:
        sites = [Site(layer, SiteKind.RESID_POST) for layer in range(n_layers)]
    cache = Path(args.cache) if args.cache else None
    aggregations = [parse_aggregation(a) for a in args.per_token]
    token_sites = [Site.parse(n) for n in args.token_sites] if args.token_sites else sites
    probes, summary = train_probes(
        model,
        tokenizer,
        examples,
        sites,
        roles,
        args.fpr,
        args.l2,
        cache,
        token_sites if aggregations else (),
        aggregations,
        args.decontaminate,
    )
    positions = args.positions or sorted({p.row.position for p in probes})
    eligible = [p for p in probes if p.row.position in positions]
    if not eligible:
        raise ValueError(f"--positions {positions}: no probe has one of them")
    chosen = choose(eligible, args.choose)
    out = Path(args.out)
    spec_path = write_probe_spec(out, model_name, model_dir, chosen)
    report_dir = Path(args.report or out)
    report_dir.mkdir(parents=True, exist_ok=True)
    write_benign_files(examples, roles, report_dir)
    rows = [p.row for p in probes]
    report = {
        "model": model_name,
        "model_hash": model_hash(model_dir),
        "data": args.data,
        "provenance": [asdict(p) for p in PROVENANCE],
        "roles": asdict(roles),
        "target_fpr": args.fpr,
        "l2": args.l2,
        "decontaminate": args.decontaminate,
        **summary,
        "chosen": asdict(chosen.row),
        "chosen_by": "--choose" if args.choose else "lowest recalibrated validation log-loss",
        "chosen_positions": list(positions),
        "probes": [asdict(r) for r in rows],
        "seconds": round(time.monotonic() - started, 1),
    }
    (report_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(rows, args.fpr, report_dir)
    _print_table(rows, chosen.row, summary, args.fpr)
    print(f"wrote {spec_path} and {report_dir / 'report.json'} ({report['seconds']} s)")
    return 0


def write_benign_files(examples: Sequence[Example], roles: Roles, folder: Path) -> list[Path]:
    """The benign requests of the calibration and held-out roles, for ``circuitwatch
    calibrate --benign`` and ``--heldout``: ``benign_calibration.jsonl`` and
    ``benign_heldout.jsonl``."""
    folder.mkdir(parents=True, exist_ok=True)
    return [
        write_jsonl(
            folder / f"{name}.jsonl",
            [e for e in examples if e.label == 0 and roles.role(e) == role],
        )
        for name, role in (("benign_calibration", "calibration"), ("benign_heldout", "heldout"))
    ]


def _print_table(rows: Sequence[ProbeRow], chosen: ProbeRow, summary: dict, fpr: float) -> None:
    length = summary["length_auroc"]
    print(f"length-only AUROC: train {length['train']:.3f}, held-out {length['heldout']:.3f}")
    for source, value in summary["length_auroc_heldout_by_source"].items():
        print(f"  held-out harmful vs {source}: {value:.3f}")
    print(f"{'site':28} {'position':12} {'val loss':>8} {'AUROC':>6} {f'TPR@{fpr:.0%}':>8} "
          f"{'FPR':>6}  flagged (report-only)")  # fmt: skip
    for r in rows:
        flagged = ", ".join(f"{s} {v:.2f}" for s, v in r.flagged)
        mark = " *" if r == chosen else ""
        print(f"{r.site:28} {r.position:12} {r.validation_loss:8.4f} {r.heldout_auroc:6.3f} "
              f"{r.heldout_tpr:8.3f} {r.heldout_fpr:6.3f}  {flagged}{mark}")  # fmt: skip

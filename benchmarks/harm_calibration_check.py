"""Check of the bundled harm monitor's calibration: where the benign tail lies, the spread of
the in-distribution held-out FPR over seeded splits, and the report sets' rates.

Scores every request once through the offline reference path (``calibrate.phase_aggregates``,
the code path ``circuitwatch calibrate`` uses): the calibration pool (``--benign``), the
cross-template benign file (``--heldout``), HarmBench, the tricky benign set and the report's
64 jailbreaks. The threshold is the one ``circuitwatch calibrate --holdout-fraction
--seed`` sets (same split, same order statistic; printed next to the spec's, which it equals
once the spec was calibrated that way). Then:

- per benign source, how many requests lie above it (calibration part, held-out part, the
  cross-template file);
- the calibration pool re-split with ``calibrate.split_holdout`` for ``--seeds`` seeds,
  unstratified (one group) and stratified by source, counting the held-out requests above
  the threshold each split sets, next to ``split_count_range`` (what random splits of
  exchangeable scores give) and ``binomial_count_range`` (the tolerance the target promises);
- HarmBench TPR, tricky-benign FPR and jailbreaks flagged at the threshold (these sets
  never set anything).

Writes ``calibration_check.json``, ``calibration_spread.png`` (the split spread) and
``score_distributions.png`` (every set's scores by source, the threshold marked) next to the
pool. Run:
``OMP_NUM_THREADS=1 python -m benchmarks.harm_calibration_check`` (about 1.4 s a request on a
loaded 2-core machine). Not to score twice: ``--scores`` takes the aggregates
``circuitwatch calibrate --scores`` wrote (the pool's, and the held-out file's if it had
one), and ``--cache DIR --score-only SET ...`` scores sets into DIR (``SET.npy``) in another
process meanwhile, which a later run with the same ``--cache`` reads.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from sidecar.discover import datasets
from sidecar.discover.calibrate import (
    binomial_count_range,
    phase_aggregates,
    split_count_range,
    split_holdout,
    threshold_at_fpr,
    wilson_interval,
)
from sidecar.discover.scorer import ReferenceScorer
from sidecar.models.registry import resolve_model
from sidecar.spec.load import load_spec

FOLDER = Path("benchmarks/results/harm-probe-smollm2")


def spread(scores: np.ndarray, groups: list[str], fraction: float, fpr: float, seeds: int):
    """Held-out count above the threshold each seeded split sets, per seed."""
    counts = []
    for seed in range(seeds):
        kept, held = split_holdout(groups, fraction, seed)
        counts.append(int((scores[held] > threshold_at_fpr(scores[kept], fpr)).sum()))
    return np.array(counts)


def above_by_source(examples, scores: np.ndarray, threshold: float) -> dict[str, str]:
    sources = Counter(e.source for e in examples)
    flagged = Counter(e.source for e, v in zip(examples, scores, strict=True) if v > threshold)
    return {source: f"{flagged[source]}/{n}" for source, n in sorted(sources.items())}


def _figure(size: tuple[float, float]):
    """A figure and its axis, drawn off screen (Agg: files only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot(counts: np.ndarray, seed_count: int, ranges: dict, requests: int, path: Path) -> None:
    figure, axis = _figure((7, 3.6))
    bins = np.arange(counts.max() + 2) - 0.5
    axis.hist(counts, bins=bins, color="#8899bb", label=f"{counts.size} stratified splits")
    colours = ("#cc6633", "#339966")
    for i, (name, r) in enumerate(ranges.items()):  # one band per range, stacked at the top
        top = 0.95 - 0.1 * i
        axis.axvspan(r.low - 0.5, r.high + 0.5, ymin=top - 0.06, ymax=top, color=colours[i % 2])
        axis.text(r.high + 0.7, axis.get_ylim()[1] * (top - 0.05), f"{name}, 95 %", fontsize=8)
    axis.axvline(seed_count, color="black", linestyle="--", label=f"seed 0: {seed_count}")
    axis.set_xlabel(f"held-out benign requests flagged (of {requests})")
    axis.set_ylabel("splits")
    axis.set_title("Held-out count above the threshold set on the other part", fontsize=10)
    axis.legend(fontsize=8, loc="center right")
    _save(figure, path)


def plot_scores(rows: list[tuple[str, np.ndarray]], threshold: float, path: Path) -> None:
    """Each set's prompt scores (one row per set or source), the threshold marked: where the
    harmful requests lie against each kind of benign one."""
    figure, axis = _figure((8, 0.45 * len(rows) + 1.2))
    rng = np.random.default_rng(0)
    for y, (name, values) in enumerate(rows):
        above = values > threshold
        jitter = y + rng.uniform(-0.25, 0.25, values.size)
        colour = "#cc3333" if name.startswith("HarmBench") else "#336699"
        axis.scatter(values, jitter, s=4, alpha=0.5, color=colour, linewidths=0)
        axis.text(1.01, y, f"{above.sum()}/{values.size}", transform=axis.get_yaxis_transform(),
                  va="center", fontsize=8)  # fmt: skip
    axis.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.5g}")
    axis.set_yticks(range(len(rows)), [name for name, _ in rows], fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel("prompt aggregate (probe logit); right: flagged / requests")
    axis.set_title("Where each set scores against the threshold", fontsize=10)
    axis.legend(fontsize=8, loc="lower left")
    _save(figure, path)


def prompt_scores(spec, scorer, name: str, examples, cache: Path | None) -> np.ndarray:
    """The set's prompt aggregates (first circuit), from ``cache/name.npy`` when there."""
    path = cache / f"{name}.npy" if cache else None
    if path is not None and path.exists():
        values = np.load(path)
        if values.shape != (len(examples),):
            raise ValueError(f"{path}: {values.shape[0]} scores for {len(examples)} requests")
        return values
    values = phase_aggregates(spec, scorer, examples)["prompt"][:, 0]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, values)
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="sidecar/models/smollm2_harm_spec/spec.yaml")
    parser.add_argument("--benign", default=str(FOLDER / "benign_calibration.jsonl"))
    parser.add_argument("--heldout", default=str(FOLDER / "benign_heldout.jsonl"))
    parser.add_argument("--fpr", type=float, default=0.01)
    parser.add_argument("--holdout-fraction", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=2000)
    parser.add_argument("--jailbreaks", type=int, default=64, help="report's jailbreaks to score")
    parser.add_argument("--scores", help="npz of `circuitwatch calibrate --scores`")
    parser.add_argument("--cache", type=Path, help="folder of scored sets (SET.npy)")
    parser.add_argument("--score-only", nargs="+", default=[], help="score these sets and stop")
    args = parser.parse_args()
    spec = load_spec(args.spec)
    scorer = ReferenceScorer(spec, resolve_model(spec.model.name))
    benign, other = datasets.read_jsonl(args.benign), datasets.read_jsonl(args.heldout)
    short = [e for e in datasets.jailbreaks() if len(e.content) < 2000]
    report_sets = {
        "HarmBench TPR": ("harmbench", datasets.harmbench()),
        "tricky benign FPR": ("tricky", datasets.tricky_benign()),
        "jailbreaks flagged": (
            "jailbreaks",
            random.Random("0/jailbreak").sample(short, args.jailbreaks),
        ),
    }
    sets = {"pool": benign, "heldout": other, **dict(report_sets.values())}
    given = dict(np.load(args.scores)) if args.scores else {}
    known = {"pool": "benign_prompt", "heldout": "heldout_prompt"}
    scores = {name: given[key][:, 0] for name, key in known.items() if key in given}
    if args.score_only:
        for name in args.score_only:
            prompt_scores(spec, scorer, name, sets[name], args.cache)
        return
    for name, examples in sets.items():
        if name not in scores and examples:
            scores[name] = prompt_scores(spec, scorer, name, examples, args.cache)
    pool, other_scores = scores["pool"], scores["heldout"]
    sources = [e.source for e in benign]
    kept, held = split_holdout(sources, args.holdout_fraction, args.seed)
    threshold = threshold_at_fpr(pool[kept], args.fpr)
    allowed = int((pool[kept] > threshold).sum())
    figures: dict = {
        "threshold": threshold,
        "spec_threshold": spec.circuits[0].verdict_threshold("prompt"),
        "calibration_requests": int(kept.size),
        "calibration_above": allowed,
    }
    print(f"threshold {threshold:.5g} ({allowed} of {kept.size} above; the spec's: "
          f"{figures['spec_threshold']})")  # fmt: skip
    for name, examples, values in (
        ("calibration part", [benign[i] for i in kept], pool[kept]),
        ("held-out part", [benign[i] for i in held], pool[held]),
        ("cross-template file", other, other_scores),
    ):
        figures[f"above by source, {name}"] = above_by_source(examples, values, threshold)
        print(f"above the threshold by source, {name}: {figures[f'above by source, {name}']}")
        for e, v in zip(examples, values, strict=True):
            if v > threshold and name != "calibration part":
                print(f"    {v:6.3f}  {e.source:24} {e.content}")
    for name, values in (("in-distribution", pool[held]), ("cross-template", other_scores)):
        rate = wilson_interval(int((values > threshold).sum()), values.size)
        promised = binomial_count_range(values.size, args.fpr)
        figures[f"{name} held-out"] = {**asdict(rate), "tolerance": asdict(promised)}
        inside = promised.low <= rate.flagged <= promised.high
        print(f"{name} held-out FPR {rate.rate:.4f} ({rate.flagged}/{rate.requests}, 95 % "
              f"Wilson {rate.low:.4f}-{rate.high:.4f}); tolerance at FPR {args.fpr}: "
              f"{promised.low}-{promised.high}: {'inside' if inside else 'OUTSIDE'}")  # fmt: skip
    best = split_count_range(kept.size, allowed, held.size)
    promised = binomial_count_range(held.size, args.fpr)
    print(f"random splits of exchangeable scores (split_count_range), 95 %: {best.low}-{best.high}"
          f" of {held.size}; binomial at {args.fpr}: {promised.low}-{promised.high}")  # fmt: skip
    figures["split_count_range"] = asdict(best)
    spreads = {}
    for name, split_groups in (("unstratified", ["all"] * len(benign)), ("stratified", sources)):
        counts = spread(pool, split_groups, args.holdout_fraction, args.fpr, args.seeds)
        low, high = np.percentile(counts, [5, 95])
        low95, high95 = np.percentile(counts, [2.5, 97.5])
        seed_count = int(counts[args.seed])
        figures[f"{name} spread"] = {
            "seeds": args.seeds,
            "mean": float(counts.mean()),
            "5-95": [float(low), float(high)],
            "2.5-97.5": [float(low95), float(high95)],
            "seed": seed_count,
            "p_at_least_seed": float((counts >= seed_count).mean()),
        }
        print(f"{name}: held-out flagged of {held.size} over {args.seeds} seeds: mean "
              f"{counts.mean():.2f}, 5-95 % {low:.0f}-{high:.0f}, 2.5-97.5 % {low95:.0f}-"
              f"{high95:.0f}, seed {args.seed} {seed_count} (P >= it: "
              f"{(counts >= seed_count).mean():.3f})")  # fmt: skip
        spreads[name] = counts
    for name, (key, examples) in report_sets.items():
        if not examples:
            continue
        values = scores[key]
        rate = wilson_interval(int((values > threshold).sum()), values.size)
        figures[name] = asdict(rate)
        print(f"{name} at {threshold:.5g}: {rate.rate:.3f} ({rate.flagged}/{rate.requests}, "
              f"95 % Wilson {rate.low:.3f}-{rate.high:.3f})")  # fmt: skip
    folder = Path(args.benign).parent
    (folder / "calibration_check.json").write_text(json.dumps(figures, indent=2) + "\n")
    ranges = {f"binomial at FPR {args.fpr}": promised, "random split": best}
    counts = spreads["stratified"]
    plot(counts, int(counts[args.seed]), ranges, held.size, folder / "calibration_spread.png")
    by_source = [
        (f"{source} ({part})", values[[e.source == source for e in examples]])
        for part, examples, values in (("pool", benign, pool), ("held out", other, other_scores))
        for source in sorted({e.source for e in examples})
    ]
    named = [(name.split()[0], scores[key]) for name, (key, e) in report_sets.items() if e]
    plot_scores(named[:1] + by_source + named[1:], threshold, folder / "score_distributions.png")
    print(
        f"wrote {folder / 'calibration_check.json'}, {folder / 'calibration_spread.png'} and "
        f"{folder / 'score_distributions.png'}"
    )


if __name__ == "__main__":
    main()

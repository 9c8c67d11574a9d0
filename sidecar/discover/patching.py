"""Activation and attribution patching on a task of clean/corrupted prompt pairs.

Denoising: run the corrupted prompt, patch in one component's activation from the clean run,
and measure how much of the metric comes back, normalised so that 0 is the corrupted run and
1 the clean run, summed over pairs before dividing (``sum(patched - corrupted) /
sum(clean - corrupted)``, as TransformerLens' IOI notebooks normalise the mean):

    resid   blocks.L.hook_resid_pre at one position (counted from the end: -1 is the last
            token, so pairs of different lengths line up on the answer position)
    head    one query head's slice of blocks.L.attn.hook_z (the o_proj input) at all
            positions; under GQA each query head has its own d_head slice
    mlp     the MLP's output at all positions, patched as its down_proj input (hook_post):
            down_proj is linear, so the two are the same patch

Attribution patching (Nanda's gradient approximation) estimates every effect from one
corrupted forward and backward pass: ``(clean - corrupted activation) . d metric / d
activation``, evaluated at the corrupted run, normalised the same way. The report says how
well it ranks components the way exact patching does (Spearman, top-k overlap).

Task format and prompt rendering: see ``sidecar.discover.patch_task``. Every temporary hook
goes through ``sidecar.discover.hooks.hooks``; clean and corrupted activations come from
``sidecar.discover.capture.capture``.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from sidecar.discover.capture import Captures, capture
from sidecar.discover.hooks import Hook, hooks
from sidecar.discover.patch_task import EncodedPair, MetricKind, Task
from sidecar.spec.sites import Site, SiteKind

FAMILIES = ("resid", "head", "mlp")
PASS_TOKENS = 2048  # tokens per stacked forward pass of exact patching
_SITE_OF = {"resid": SiteKind.RESID_PRE, "head": SiteKind.ATTN_Z, "mlp": SiteKind.MLP_POST}


@dataclass(frozen=True, order=True)
class Component:
    """``index``: the head for ``head``, the position from the end for ``resid``, 0 for ``mlp``."""

    family: str
    layer: int
    index: int = 0

    @property
    def name(self) -> str:
        if self.family == "head":
            return f"l{self.layer}h{self.index}"
        if self.family == "resid":
            return f"resid{self.layer}@{self.index}"
        return f"mlp{self.layer}"

    @property
    def site(self) -> Site:
        return Site(self.layer, _SITE_OF[self.family])


@dataclass(frozen=True)
class Baseline:
    """The metric on the unpatched runs, over all pairs."""

    clean_mean: float
    corrupted_mean: float
    clean_accuracy: float | None  # logit_diff: share of clean prompts preferring the answer
    corrupted_accuracy: float | None  # ... and of corrupted prompts preferring wrong_answer


@dataclass(frozen=True)
class Effect:
    component: Component
    exact: float  # recovery by exact activation patching
    attribution: float  # recovery estimated by attribution patching


@dataclass(frozen=True, eq=False)
class _Batch:
    pairs: tuple[EncodedPair, ...]
    clean: torch.Tensor  # [B, T]
    corrupted: torch.Tensor  # [B, T]

    @property
    def length(self) -> int:
        return self.clean.shape[1]


class _Sums:
    """Recovery as a ratio of sums over pairs: numerator and the clean-corrupted gap."""

    def __init__(self) -> None:
        self.num: dict[Component, float] = defaultdict(float)
        self.gap: dict[Component, float] = defaultdict(float)

    def add(self, component: Component, num: float, gap: float) -> None:
        self.num[component] += num
        self.gap[component] += gap

    def recovery(self, component: Component) -> float:
        return self.num[component] / self.gap[component]


def components_of(model: nn.Module, families: Iterable[str], length: int) -> list[Component]:
    """Every component of ``families`` for prompts of ``length`` tokens."""
    config = model.config
    found = []
    for family in families:
        for layer in range(config.num_hidden_layers):
            if family == "resid":
                found += [Component("resid", layer, p) for p in range(-length, 0)]
            elif family == "head":
                found += [Component("head", layer, h) for h in range(config.num_attention_heads)]
            else:
                found.append(Component("mlp", layer))
    return found


def metric_values(logits: torch.Tensor, batch: _Batch, metric: MetricKind) -> torch.Tensor:
    """[B] metric per pair from the logits of a run (only the last position for logit_diff)."""
    if metric is MetricKind.LOGIT_DIFF:
        last = logits[:, -1].float()
        answer = torch.tensor([p.answer_id for p in batch.pairs])
        wrong = torch.tensor([p.wrong_id for p in batch.pairs])
        rows = torch.arange(len(batch.pairs))
        return last[rows, answer] - last[rows, wrong]
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch.corrupted[:, 1:]  # the continuation is the same in both prompts
    token_lp = log_probs.gather(-1, targets[..., None])[..., 0]
    # position t predicts token t + 1; the continuation starts at prompt_len
    starts = torch.tensor([p.prompt_len - 1 for p in batch.pairs])[:, None]
    mask = (torch.arange(targets.shape[1])[None] >= starts).float()
    return -(token_lp * mask).sum(1) / mask.sum(1)


def patch_hooks(
    model: nn.Module, components: Iterable[Component], clean: Captures, rows: slice = slice(None)
) -> list[Hook]:
    """Hooks that put the clean run's activation of each component into the running pass
    (into its ``rows`` of the batch: several patches can share one forward pass)."""
    layers = model.model.layers
    d_head = _d_head(model)
    installed: list[Hook] = []
    for c in components:
        value = clean[c.site]
        if c.family == "resid":
            module = model.model.embed_tokens if c.layer == 0 else layers[c.layer - 1]
            installed.append((module, "post", _replace_output(value, c.index, rows)))
        elif c.family == "head":
            columns = slice(c.index * d_head, (c.index + 1) * d_head)
            installed.append(
                (layers[c.layer].self_attn.o_proj, "pre", _replace_input(value, columns, rows))
            )
        else:
            installed.append(
                (layers[c.layer].mlp.down_proj, "pre", _replace_input(value, ..., rows))
            )
    return installed


def _d_head(model: nn.Module) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _replace_output(value: torch.Tensor, position: int, rows: slice):
    def hook(_module, _args, output):
        hidden = (output[0] if isinstance(output, tuple) else output).clone()
        hidden[rows, position] = value[:, position].to(hidden.dtype)
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return hook


def _replace_input(value: torch.Tensor, columns, rows: slice):
    def hook(_module, args):
        patched = args[0].clone()
        patched[rows, :, columns] = value[..., columns].to(patched.dtype)
        return (patched, *args[1:])

    return hook


def _forward(model, ids, batch, metric, installed: list[Hook]) -> torch.Tensor:
    keep = 1 if metric is MetricKind.LOGIT_DIFF else 0  # 0: logits at every position
    with hooks(installed), torch.no_grad():
        logits = model(ids, use_cache=False, logits_to_keep=keep).logits
    return metric_values(logits, batch, metric)


def _batches(task: Task, batch_size: int) -> list[_Batch]:
    """Pairs grouped by token length (no padding), in file order within a group."""
    by_length: dict[int, list[EncodedPair]] = defaultdict(list)
    for pair in task.pairs:
        by_length[pair.length].append(pair)
    batches = []
    for length in sorted(by_length):
        group = by_length[length]
        for start in range(0, len(group), batch_size):
            pairs = tuple(group[start : start + batch_size])
            batches.append(
                _Batch(
                    pairs=pairs,
                    clean=torch.tensor([p.clean_ids for p in pairs]),
                    corrupted=torch.tensor([p.corrupted_ids for p in pairs]),
                )
            )
    return batches


def _all_sites(model: nn.Module) -> tuple[Site, ...]:
    return tuple(
        Site(layer, kind)
        for layer in range(model.config.num_hidden_layers)
        for kind in _SITE_OF.values()
    )


@dataclass(frozen=True)
class PatchingResult:
    baseline: Baseline
    effects: tuple[Effect, ...]
    exact_s: float
    attribution_s: float


def run_patching(
    model: nn.Module,
    task: Task,
    families: Sequence[str] = FAMILIES,
    batch_size: int = 32,
    progress: bool = True,
) -> PatchingResult:
    """Exact and attribution patching of every component of ``families`` over ``task``."""
    batches = _batches(task, batch_size)
    sites = _all_sites(model)
    exact, attribution = _Sums(), _Sums()
    clean_values, corrupted_values = [], []
    total = sum(len(components_of(model, families, b.length)) for b in batches)
    exact_s = attribution_s = 0.0
    with tqdm(total=total, desc="exact patching", unit="patch", disable=not progress) as bar:
        for batch in batches:
            clean = capture(model, batch.clean, sites)
            corrupted = capture(model, batch.corrupted, sites)
            clean_metric = metric_values(clean.logits, batch, task.metric)
            corrupted_metric = metric_values(corrupted.logits, batch, task.metric)
            clean_values.append(clean_metric)
            corrupted_values.append(corrupted_metric)
            gap = float((clean_metric - corrupted_metric).sum())
            components = components_of(model, families, batch.length)
            started = time.monotonic()
            to_run = []
            for c in components:
                if _same(c, clean, corrupted):  # e.g. resid before the first differing token
                    exact.add(c, 0.0, gap)
                    bar.update()
                else:
                    to_run.append(c)
            # Short prompts leave a forward pass mostly overhead: stack several patched copies
            # of the batch (each patched in its own rows) into one pass.
            per_pass = max(1, PASS_TOKENS // batch.clean.numel())
            for start in range(0, len(to_run), per_pass):
                group = to_run[start : start + per_pass]
                for c, patched in zip(
                    group, _patched_many(model, batch, task.metric, group, clean), strict=True
                ):
                    exact.add(c, float((patched - corrupted_metric).sum()), gap)
                bar.update(len(group))
            exact_s += time.monotonic() - started
            started = time.monotonic()
            for c, value in _attribution(model, batch, task.metric, clean, components).items():
                attribution.add(c, value, gap)
            attribution_s += time.monotonic() - started
    clean_all, corrupted_all = torch.cat(clean_values), torch.cat(corrupted_values)
    accuracy = task.metric is MetricKind.LOGIT_DIFF
    baseline = Baseline(
        clean_mean=float(clean_all.mean()),
        corrupted_mean=float(corrupted_all.mean()),
        clean_accuracy=float((clean_all > 0).float().mean()) if accuracy else None,
        corrupted_accuracy=float((corrupted_all < 0).float().mean()) if accuracy else None,
    )
    effects = tuple(
        Effect(c, exact.recovery(c), attribution.recovery(c)) for c in sorted(exact.num)
    )
    return PatchingResult(baseline, effects, exact_s, attribution_s)


def _patched_many(model, batch: _Batch, metric: MetricKind, group, clean: Captures) -> list:
    """The metric [B] with each component of ``group`` patched alone, in one forward pass."""
    size = len(batch.pairs)
    installed = []
    for v, c in enumerate(group):
        installed += patch_hooks(model, [c], clean, slice(v * size, (v + 1) * size))
    stacked = _Batch(
        batch.pairs * len(group),
        batch.clean.repeat(len(group), 1),
        batch.corrupted.repeat(len(group), 1),
    )
    values = _forward(model, stacked.corrupted, stacked, metric, installed)
    return list(values.split(size))


def _same(c: Component, clean: Captures, corrupted: Captures) -> bool:
    """Whether patching ``c`` changes nothing: its clean and corrupted values are equal."""
    if c.family == "resid":
        return torch.equal(clean[c.site][:, c.index], corrupted[c.site][:, c.index])
    return False


def _attribution(
    model: nn.Module, batch: _Batch, metric: MetricKind, clean: Captures, components
) -> dict[Component, float]:
    """Sum over the batch's pairs of (clean - corrupted) . gradient, for each component."""
    sites = sorted({c.site for c in components}, key=lambda s: (s.layer, s.kind.value))
    kept: dict[Site, torch.Tensor] = {}
    layers = model.model.layers

    def keep_output(site: Site, leaf: bool):
        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if leaf:  # the graph starts at the embedding, whether or not weights need grad
                hidden = hidden.detach().requires_grad_(True)
            kept[site] = hidden
            if not leaf:
                return None
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook

    def keep_input(site: Site):
        def hook(_module, args):
            kept[site] = args[0]

        return hook

    installed: list[Hook] = [
        (model.model.embed_tokens, "post", keep_output(Site(0, _SITE_OF["resid"]), True))
    ]
    for site in sites:
        if site.kind is SiteKind.RESID_PRE and site.layer > 0:
            installed.append((layers[site.layer - 1], "post", keep_output(site, False)))
        elif site.kind is SiteKind.ATTN_Z:
            installed.append((layers[site.layer].self_attn.o_proj, "pre", keep_input(site)))
        elif site.kind is SiteKind.MLP_POST:
            installed.append((layers[site.layer].mlp.down_proj, "pre", keep_input(site)))
    keep = 1 if metric is MetricKind.LOGIT_DIFF else 0
    with hooks(installed), torch.enable_grad():
        logits = model(batch.corrupted, use_cache=False, logits_to_keep=keep).logits
        total = metric_values(logits, batch, metric).sum()
        grads = dict(zip(sites, torch.autograd.grad(total, [kept[s] for s in sites]), strict=True))
    d_head = _d_head(model)
    estimates = {}
    for c in components:
        delta = clean[c.site] - kept[c.site].detach().float()
        product = delta * grads[c.site].float()
        if c.family == "resid":
            estimates[c] = float(product[:, c.index].sum())
        elif c.family == "head":
            estimates[c] = float(product[..., c.index * d_head : (c.index + 1) * d_head].sum())
        else:
            estimates[c] = float(product.sum())
    return estimates


def recovery_of_set(
    model: nn.Module, task: Task, components: Sequence[Component], batch_size: int = 32
) -> float:
    """Share of the clean-corrupted gap recovered by patching ``components`` all together."""
    num = gap = 0.0
    sites = tuple({c.site for c in components})
    for batch in _batches(task, batch_size):
        clean = capture(model, batch.clean, sites)
        clean_metric = metric_values(clean.logits, batch, task.metric)
        corrupted_metric = _forward(model, batch.corrupted, batch, task.metric, [])
        usable = [c for c in components if c.family != "resid" or -c.index <= batch.length]
        patched = _forward(
            model, batch.corrupted, batch, task.metric, patch_hooks(model, usable, clean)
        )
        num += float((patched - corrupted_metric).sum())
        gap += float((clean_metric - corrupted_metric).sum())
    return num / gap


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties broken by order: effects are continuous)."""
    ranks_a = np.argsort(np.argsort(np.asarray(a)))
    ranks_b = np.argsort(np.argsort(np.asarray(b)))
    return float(np.corrcoef(ranks_a, ranks_b)[0, 1])


def top_k_overlap(a: Sequence[float], b: Sequence[float], k: int) -> float:
    """Share of the k largest |a| that are also among the k largest |b|."""
    k = min(k, len(a))
    top_a = set(np.argsort(-np.abs(np.asarray(a)))[:k])
    top_b = set(np.argsort(-np.abs(np.asarray(b)))[:k])
    return len(top_a & top_b) / k


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True, help="a model directory, smollm2 or reference")
    parser.add_argument("--task", required=True, help="task file (JSON Lines of prompt pairs)")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument(
        "--chat", action="store_true", help="render prompts through the chat template"
    )
    parser.add_argument("--families", default=",".join(FAMILIES), help="of resid,head,mlp")
    parser.add_argument("--pairs", type=int, default=0, help="use only the first N pairs")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top-k", type=int, default=10, help="heads selected; agreement's k")


def run(args) -> int:
    # torch and transformers load only when the command runs (see sidecar/cli.py)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sidecar.discover import patch_report as pr
    from sidecar.discover.patch_task import TaskError, load_task
    from sidecar.models.registry import ModelNotInstalled, resolve_model
    from sidecar.spec.identity import model_hash

    started = time.monotonic()
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown or not families:
        print(f"circuitwatch discover patch: --families takes {','.join(FAMILIES)}, "
              f"got {args.families!r}", file=sys.stderr)  # fmt: skip
        return 2
    try:
        model_dir = resolve_model(args.model)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        task = load_task(args.task, tokenizer, chat=args.chat, limit=args.pairs)
    except (ModelNotInstalled, TaskError) as e:
        print(f"circuitwatch discover patch: {e}", file=sys.stderr)
        return 1
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.monotonic() - started
    result = run_patching(model, task, families, args.batch_size)
    heads = sorted(
        (e for e in result.effects if e.component.family == "head"), key=lambda e: -e.exact
    )
    selected = [e.component for e in heads[: args.top_k]]
    faithfulness_started = time.monotonic()
    recovery = recovery_of_set(model, task, selected, args.batch_size) if selected else 0.0
    faithfulness_s = time.monotonic() - faithfulness_started
    out = Path(args.out)
    digest = model_hash(model_dir)
    report = pr.PatchReport(
        settings=pr.Settings(
            model=str(args.model),
            model_dir=str(model_dir),
            model_hash=digest,
            task=str(args.task),
            pairs=len(task.pairs),
            metric=task.metric.value,
            chat=task.chat,
            families=families,
            batch_size=args.batch_size,
            top_k=args.top_k,
            selection="top-k heads by exact recovery (largest first)",
        ),
        baseline=result.baseline,
        effects=pr.ranked(result.effects),
        agreement=agreement(result.effects, families, args.top_k),
        faithfulness=pr.Faithfulness(tuple(c.name for c in selected), recovery),
        timings=pr.Timings(
            load_s=load_s,
            exact_s=result.exact_s,
            attribution_s=result.attribution_s,
            faithfulness_s=faithfulness_s,
            total_s=time.monotonic() - started,
        ),
    )
    pr.write_report(report, out)
    shape = (model.config.num_hidden_layers, model.config.num_attention_heads)
    labels = [tokenizer.decode([i]) for i in task.pairs[0].clean_ids]
    pr.write_figures(result.effects, shape, out, labels)
    if selected:
        pr.write_draft_spec(out / "spec", model_dir.name, digest, selected, args.task)
    _summary(report)
    return 0


def agreement(effects: Sequence[Effect], families: Sequence[str], k: int) -> tuple:
    """Per family: Spearman of attribution against exact, and the top-k overlap."""
    from sidecar.discover.patch_report import Agreement

    rows = []
    for family in families:
        members = [e for e in effects if e.component.family == family]
        exact = [e.exact for e in members]
        estimate = [e.attribution for e in members]
        rows.append(
            Agreement(
                family=family,
                components=len(members),
                spearman=spearman(exact, estimate),
                top_k=min(k, len(members)),
                top_k_overlap=top_k_overlap(exact, estimate, k),
            )
        )
    return tuple(rows)


def _summary(report) -> None:
    b = report.baseline
    print(f"metric {report.settings.metric}: clean {b.clean_mean:.3f}, "
          f"corrupted {b.corrupted_mean:.3f}", end="")  # fmt: skip
    if b.clean_accuracy is not None:
        print(f"; clean accuracy {b.clean_accuracy:.2f}", end="")
    print()
    for row in report.effects[:10]:
        print(f"  {row.name:<14} exact {row.exact:+.3f}  attribution {row.attribution:+.3f}")
    for a in report.agreement:
        print(f"  {a.family:<6} spearman {a.spearman:+.2f}  top-{a.top_k} overlap "
              f"{a.top_k_overlap:.2f}")  # fmt: skip
    f = report.faithfulness
    print(f"top heads {', '.join(f.components)} together recover {f.recovery:.2f} of the gap")

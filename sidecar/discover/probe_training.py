"""Train the repeat probe: a linear read-out that fires inside the second copy of a repeated span.

The probe reads ``blocks.{last}.hook_resid_post`` (the last decoder layer's output, before the
final norm), where the induction heads have written what they copied. It is a logistic
regression, fitted full-batch with L-BFGS on standardised features from synthetic windows of
*held-out* natural text with repeated random spans inserted (``data.WindowSampler``), then
folded back to raw activations so that ``x . weight + bias`` is the logit the engine computes.
Training and test windows come from different halves of the held-out text, with different
seeds. Deterministic, a few seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from sidecar.discover.capture import capture
from sidecar.models import data
from sidecar.models.tokenizer import special_ids
from sidecar.spec.sites import Site, SiteKind

PROBE_WINDOWS = 64  # windows per split, about 16k tokens of which ~4% are second copies
L2 = 1e-3  # on standardised features: keeps the fit well-posed, hardly limits it


@dataclass(frozen=True, eq=False)
class ProbeResult:
    site: Site
    weight: torch.Tensor  # float32 [width], applies to raw activations
    bias: float
    test_balanced_accuracy: float  # mean of the per-class accuracies at logit 0
    test_auroc: float
    test_tokens: int
    test_positives: int


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties 1/2."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    ranks = _average_ranks(scores)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs both positive and negative examples")
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """1-based ranks, tied values sharing their mean rank."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=values.dtype)
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    ends = torch.cumsum(counts, 0).to(values.dtype)
    mean_rank = ends - (counts.to(values.dtype) - 1) / 2
    ranks[order] = mean_rank[inverse]
    return ranks


def probe_windows(
    tokenizer: PreTrainedTokenizerFast, corpus: np.ndarray, seed: int, windows: int = PROBE_WINDOWS
) -> data.Batch:
    """Windows of ``corpus`` (held-out text), half of them with a repeated random span."""
    sampler = data.WindowSampler(
        corpus, len(tokenizer), special_ids(tokenizer), tokenizer.bos_token_id, seed
    )
    return sampler.batch(windows, data.SpanConfig(repeat_fraction=0.5))


def features(
    model: PreTrainedModel, batch: data.Batch, site: Site
) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, width] activations, [N] labels) over every position but BOS."""
    activations = capture(model, batch.input_ids, (site,))[site][:, 1:]
    return activations.flatten(0, 1), batch.second_copy[:, 1:].flatten()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float = L2) -> tuple[torch.Tensor, float]:
    """Class-balanced logistic regression on standardised ``x``; returns (raw weight, raw bias)."""
    x = x.double()
    mean, std = x.mean(dim=0), x.std(dim=0).clamp_min(1e-6)
    z = (x - mean) / std
    target = y.double()
    positives = target.mean().clamp(1e-6, 1 - 1e-6)
    sample_weight = torch.where(y, 0.5 / positives, 0.5 / (1 - positives))
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [w, b], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ w + b
        loss = (
            F.binary_cross_entropy_with_logits(logits, target, reduction="none") * sample_weight
        ).mean()
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    raw_weight = (w.detach() / std).float()
    raw_bias = float(b.detach() - (w.detach() * mean / std).sum())
    return raw_weight, raw_bias


def train_repeat_probe(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    held_out: np.ndarray,
    site: Site | None = None,
) -> ProbeResult:
    """Fit on the first half of ``held_out``, test on the second half."""
    site = site or Site(model.config.num_hidden_layers - 1, SiteKind.RESID_POST)
    half = len(held_out) // 2
    x_train, y_train = features(model, probe_windows(tokenizer, held_out[:half], seed=11), site)
    x_test, y_test = features(model, probe_windows(tokenizer, held_out[half:], seed=12), site)
    weight, bias = fit_logistic(x_train, y_train)
    logits = x_test @ weight + bias
    balanced_accuracy = 0.5 * (
        (logits[y_test] > 0).float().mean() + (logits[~y_test] <= 0).float().mean()
    )
    return ProbeResult(
        site=site,
        weight=weight,
        bias=bias,
        test_balanced_accuracy=float(balanced_accuracy),
        test_auroc=auroc(logits, y_test),
        test_tokens=len(y_test),
        test_positives=int(y_test.sum()),
    )


def save_probe(probe: ProbeResult, path: Path) -> None:
    """``weight`` [width] and ``bias`` [1] as float32 safetensors (what a spec direction reads)."""
    save_file(
        {
            "weight": probe.weight.contiguous(),
            "bias": torch.tensor([probe.bias], dtype=torch.float32),
        },
        str(path),
    )

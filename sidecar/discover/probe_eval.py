"""How a behaviour probe is judged: roles by source, then per-request scores -> the figures.

Examples play a role by their source, never at random across one (``Roles``): training and
validation (a fifth of the training sources, by a hash of the text), calibration (benign
requests that set the threshold at the target FPR), held-out (reported: AUROC, TPR and FPR
at that threshold) and report-only (how often flagged). ``measure`` turns one score per
request (a pooled probe's logit, or a per-token probe's aggregate) into a ``ProbeRow``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from sidecar.discover.calibrate import flagged_rate, threshold_at_fpr
from sidecar.discover.datasets import Example
from sidecar.discover.probe_training import auroc, fit_logistic
from sidecar.spec.sites import Site

VALIDATION_SHARE = 5  # one in five training examples (by text hash) validates the choice


@dataclass(frozen=True)
class Roles:
    """Which sources play which part; a source matches its name or any ``name/...`` below it."""

    heldout: tuple[str, ...] = ("harmbench", "benign/test", "twin/test", "safe_topic/test")
    calibration: tuple[str, ...] = (
        "benign/calibration",
        "twin/calibration",
        "safe_topic/calibration",
    )
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
    # how a request becomes one number: "last" / "mean" (pooled activations), or
    # "tokens/<aggregation>" (a per-token probe's scores, aggregated over the prompt)
    position: str
    validation_loss: float  # recalibrated_loss on the validation requests; chooses the probe
    validation_auroc: float
    heldout_auroc: float
    threshold: float  # score at the target FPR on the calibration benign requests
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


def recalibrated_loss(scores: torch.Tensor, labels: torch.Tensor, sources: np.ndarray) -> float:
    """``balanced_log_loss`` after mapping the scores to logits with a 1-D logistic fit on the
    same requests (two parameters): scores on any scale compare (a pooled probe's logit, a
    max or a mean of per-token logits), and what is left is how well they separate."""
    column = scores.double()[:, None]
    slope, intercept = fit_logistic(column, labels)
    return balanced_log_loss(column @ slope.double() + intercept, labels, sources)


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


def measure(
    site: Site,
    position: str,
    scores: torch.Tensor,
    labels: torch.Tensor,
    roles: np.ndarray,
    sources: np.ndarray,
    fpr: float,
) -> ProbeRow:
    """One score per request -> the figures: validation loss and AUROC, the threshold at
    ``fpr`` on the calibration benign requests, held-out AUROC / TPR / FPR at it, and how
    often each report-only source is flagged."""
    logits = scores.float()

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
    return ProbeRow(
        site=site.name,
        layer=site.layer,
        position=position,
        validation_loss=recalibrated_loss(logits[val], labels[val], sources[val.numpy()]),
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

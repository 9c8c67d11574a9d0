"""Figures for ``circuitwatch discover heads``: per-head score heatmaps and ablation effects.

Matplotlib with the Agg backend (files only, no display), one PNG per figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from sidecar.discover.ablation import AblationResult  # noqa: E402
from sidecar.discover.induction import HeadRef  # noqa: E402


def heatmap(
    scores: np.ndarray, title: str, named: Sequence[HeadRef], threshold: float, path: Path
) -> Path:
    """Layer x head scores in [0, 1]; named heads are boxed."""
    n_layers, n_heads = scores.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * n_heads, 1.2 + 0.22 * n_layers + 0.6))
    image = ax.imshow(scores, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for h in named:
        ax.add_patch(
            plt.Rectangle((h.head - 0.5, h.layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5)
        )
    ax.set_xlabel("head (query)")
    ax.set_ylabel("layer")
    ax.set_xticks(range(n_heads))
    ax.set_yticks(range(0, n_layers, max(1, n_layers // 15)))
    ax.set_title(f"{title}\n(boxed: named, score > {threshold} or top-k)", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.05)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_bars(results: Sequence[tuple[str, AblationResult]], path: Path) -> Path:
    """Loss factor (after / before) on repeats and on natural text, per head group and kind."""
    labels = [f"{group}\n{r.kind.value}" for group, r in results]
    x = np.arange(len(results))
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(results), 3.8))
    ax.bar(x - 0.2, [r.repeated_factor for _, r in results], 0.4, label="2nd-copy loss, repeats")
    ax.bar(x + 0.2, [r.natural_factor for _, r in results], 0.4, label="natural-text loss")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("loss after / before ablation")
    ax.set_title("Ablating the named heads", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

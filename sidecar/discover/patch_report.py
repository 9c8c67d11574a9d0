"""What ``circuitwatch discover patch`` writes: report.json, heatmaps and a draft spec.

``report.json`` is ``asdict(PatchReport)``; the PNGs show exact patching next to attribution
patching for each component family; ``spec/spec.yaml`` names the selected heads as head
components (read by norm) and one circuit over them with uniform weights (1/k each: the
patching effect says which heads matter, not how a live norm should be weighted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from sidecar.discover.patching import Baseline, Component, Effect  # noqa: E402
from sidecar.spec.writer import CircuitEntry, ComponentEntry, write_spec  # noqa: E402


@dataclass(frozen=True)
class Settings:
    model: str
    model_dir: str
    model_hash: str
    task: str
    pairs: int
    metric: str
    chat: bool
    families: tuple[str, ...]
    batch_size: int
    top_k: int
    selection: str  # how the faithfulness set and the spec's heads were chosen


@dataclass(frozen=True)
class EffectRow:
    name: str
    family: str
    layer: int
    index: int  # head, or position from the end (resid), or 0 (mlp)
    exact: float
    attribution: float


@dataclass(frozen=True)
class Agreement:
    """How attribution patching ranks one family's components against exact patching."""

    family: str
    components: int
    spearman: float
    top_k: int
    top_k_overlap: float  # share of the top-k by |exact| also in the top-k by |attribution|


@dataclass(frozen=True)
class Faithfulness:
    components: tuple[str, ...]
    recovery: float  # share of the clean-corrupted gap they recover when patched together


@dataclass(frozen=True)
class Timings:
    load_s: float
    exact_s: float
    attribution_s: float
    faithfulness_s: float
    total_s: float


@dataclass(frozen=True)
class PatchReport:
    settings: Settings
    baseline: Baseline
    effects: tuple[EffectRow, ...]  # ranked by |exact|, largest first
    agreement: tuple[Agreement, ...]
    faithfulness: Faithfulness
    timings: Timings


def ranked(effects: Sequence[Effect]) -> tuple[EffectRow, ...]:
    rows = [
        EffectRow(e.component.name, *_fields(e.component), e.exact, e.attribution) for e in effects
    ]
    return tuple(sorted(rows, key=lambda r: -abs(r.exact)))


def _fields(c: Component) -> tuple[str, int, int]:
    return c.family, c.layer, c.index


def write_report(report: PatchReport, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.json"
    path.write_text(json.dumps(asdict(report), indent=1) + "\n")
    return path


def write_figures(
    effects: Sequence[Effect], shape: tuple[int, int], folder: Path, labels: Sequence[str] = ()
) -> list[Path]:
    """Heatmaps, exact beside attribution: resid layer x position, heads layer x head, MLP
    by layer. ``shape`` is (layers, heads); ``labels`` name the resid positions (optional)."""
    layers, heads = shape
    written = []
    by_family = {
        f: [e for e in effects if e.component.family == f] for f in ("resid", "head", "mlp")
    }
    if by_family["resid"]:
        positions = sorted({e.component.index for e in by_family["resid"]})
        grids = _grids(
            by_family["resid"], layers, len(positions), lambda c: positions.index(c.index)
        )
        names = list(labels)[-len(positions) :] if len(labels) >= len(positions) else positions
        written.append(_heatmaps(grids, folder / "resid.png", "position", names, "resid_pre"))
    if by_family["head"]:
        grids = _grids(by_family["head"], layers, heads, lambda c: c.index)
        written.append(_heatmaps(grids, folder / "heads.png", "head", list(range(heads)), "head"))
    if by_family["mlp"]:
        written.append(_mlp_bars(by_family["mlp"], layers, folder / "mlp.png"))
    return written


def _grids(effects, rows: int, columns: int, column_of) -> dict[str, np.ndarray]:
    grids = {kind: np.full((rows, columns), np.nan) for kind in ("exact", "attribution")}
    for e in effects:
        grids["exact"][e.component.layer, column_of(e.component)] = e.exact
        grids["attribution"][e.component.layer, column_of(e.component)] = e.attribution
    return grids


def _heatmaps(grids, path: Path, xlabel: str, xticks, what: str) -> Path:
    limit = float(np.nanmax(np.abs(grids["exact"]))) or 1.0
    rows, columns = grids["exact"].shape
    fig, axes = plt.subplots(1, 2, figsize=(4 + 0.5 * columns, 1.5 + 0.22 * rows), squeeze=False)
    for axis, (kind, grid) in zip(axes[0], grids.items(), strict=True):
        image = axis.imshow(grid, cmap="RdBu", vmin=-limit, vmax=limit, aspect="auto")
        axis.set_title(f"{what}: {kind} patching")
        axis.set_xlabel(xlabel)
        axis.set_ylabel("layer")
        axis.set_xticks(range(columns), [str(x) for x in xticks], rotation=90, fontsize=7)
        fig.colorbar(image, ax=axis, label="recovery (0 corrupted, 1 clean)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _mlp_bars(effects, layers: int, path: Path) -> Path:
    exact, attribution = np.zeros(layers), np.zeros(layers)
    for e in effects:
        exact[e.component.layer], attribution[e.component.layer] = e.exact, e.attribution
    fig, axis = plt.subplots(figsize=(max(5, 0.3 * layers), 3))
    x = np.arange(layers)
    axis.bar(x - 0.2, exact, 0.4, label="exact")
    axis.bar(x + 0.2, attribution, 0.4, label="attribution")
    axis.set_xlabel("layer")
    axis.set_ylabel("recovery")
    axis.set_title("MLP output patching")
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_draft_spec(
    folder: Path, model_name: str, model_hash: str, heads: Sequence[Component], task: str
) -> Path:
    """The selected heads as head components and one circuit over them, weights 1/k."""
    components = [ComponentEntry(name=c.name, site=c.site.name, head=c.index) for c in heads]
    circuit = CircuitEntry(
        name=f"patch_{Path(task).stem}",
        weights={c.name: 1.0 / len(heads) for c in heads},
        description=f"heads with the largest activation-patching recovery on {Path(task).name}",
    )
    header = (
        f"Draft written by `circuitwatch discover patch` from {Path(task).name}.\n"
        "Heads: the top-k by exact patching recovery; circuit weights uniform (1/k).\n"
        "Uncalibrated: no threshold or verdict thresholds yet."
    )
    return write_spec(folder, model_name, model_hash, components, [circuit], header=header)

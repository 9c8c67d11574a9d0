"""The one writer of circuit spec files: what discovery, probe training and calibration produce.

Callers describe components and circuits with the small dataclasses below; ``write_spec``
puts every direction into one safetensors file next to ``spec.yaml``, writes the YAML in the
order FORMAT.md documents, and loads the result back with ``load_spec`` so that a spec this
project writes is always one it accepts. Refused before anything is written: a circuit with
no members, a weight, bias or threshold that is not finite, a direction that is not a finite
1-D vector, two entries with the same name.

Directions are anything ``numpy.asarray`` turns into a float vector (tensors, arrays, lists).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import save_file

from sidecar.spec.load import load_spec
from sidecar.spec.schema import Aggregation, AggregationKind, Calibration

DIRECTIONS_FILE = "directions.safetensors"


@dataclass(frozen=True, eq=False)
class ComponentEntry:
    """One component as written: a head (by norm, or along ``direction``) or a direction."""

    name: str
    site: str  # TransformerLens name, e.g. blocks.3.attn.hook_z
    head: int | None = None  # set: kind head; None: kind direction
    direction: object | None = None  # 1-D float vector; required for kind direction
    bias: float = 0.0


@dataclass(frozen=True)
class CircuitEntry:
    name: str
    weights: Mapping[str, float]  # component name -> weight
    description: str = ""
    bias: float = 0.0
    threshold: float | None = None  # per token: counts as firing
    aggregation: Aggregation = Aggregation()
    verdict_thresholds: Mapping[str, float] = field(default_factory=dict)  # phase -> threshold
    calibration: Calibration | None = None


def write_spec(
    folder: str | Path,
    model_name: str,
    model_hash: str,
    components: Sequence[ComponentEntry],
    circuits: Sequence[CircuitEntry],
    header: str = "",
) -> Path:
    """Write ``folder/spec.yaml`` (and its directions) and return its path, validated."""
    _check(components, circuits)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        c.name: np.ascontiguousarray(np.asarray(c.direction, dtype=np.float32))
        for c in components
        if c.direction is not None
    }
    if tensors:
        save_file(tensors, str(folder / DIRECTIONS_FILE))
    doc = {
        "version": 1,
        "model": {"name": model_name, "hash": model_hash},
        "components": [_component(c) for c in components],
        "circuits": [_circuit(c) for c in circuits],
    }
    comment = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    path = folder / "spec.yaml"
    path.write_text(comment + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True))
    load_spec(path)
    return path


def _check(components: Sequence[ComponentEntry], circuits: Sequence[CircuitEntry]) -> None:
    if not components or not circuits:
        raise ValueError("a spec needs at least one component and one circuit")
    names = [c.name for c in components]
    for kind, listed in (("component", names), ("circuit", [c.name for c in circuits])):
        repeated = sorted({n for n in listed if listed.count(n) > 1})
        if repeated:
            raise ValueError(f"duplicate {kind} names: {', '.join(repeated)}")
    for c in components:
        _finite(f"component {c.name}: bias", c.bias)
        if c.head is None and c.direction is None:
            raise ValueError(f"component {c.name}: a direction component needs a direction")
        if c.direction is not None:
            vector = np.asarray(c.direction, dtype=np.float64)
            if vector.ndim != 1 or vector.size == 0 or not np.isfinite(vector).all():
                raise ValueError(
                    f"component {c.name}: direction must be a finite, non-empty 1-D vector, "
                    f"got shape {list(vector.shape)}"
                )
    for circuit in circuits:
        if not circuit.weights:
            raise ValueError(f"circuit {circuit.name}: no member components")
        for member, weight in circuit.weights.items():
            if member not in names:
                raise ValueError(f"circuit {circuit.name}: unknown component {member!r}")
            _finite(f"circuit {circuit.name}: weight of {member}", weight)
        _finite(f"circuit {circuit.name}: bias", circuit.bias)
        if circuit.threshold is not None:
            _finite(f"circuit {circuit.name}: threshold", circuit.threshold)
        for phase, threshold in circuit.verdict_thresholds.items():
            _finite(f"circuit {circuit.name}: verdict threshold ({phase})", threshold)


def _finite(what: str, value: float) -> None:
    if not math.isfinite(float(value)):
        raise ValueError(f"{what} is {value}, not a finite number (a component with zero spread?)")


def _round(value: float) -> float:
    """Six significant digits: exact enough for scores, readable in a diff."""
    return float(f"{float(value):.6g}")


def _component(c: ComponentEntry) -> dict:
    entry: dict = {"name": c.name, "kind": "head" if c.head is not None else "direction"}
    entry["site"] = c.site
    if c.head is not None:
        entry["head"] = int(c.head)
    if c.direction is not None:
        entry["direction"] = {"file": DIRECTIONS_FILE, "tensor": c.name}
        entry["bias"] = _round(c.bias)
    return entry


def _circuit(c: CircuitEntry) -> dict:
    entry: dict = {"name": c.name}
    if c.description:
        entry["description"] = c.description
    entry["components"] = {name: _round(w) for name, w in c.weights.items()}
    entry["bias"] = _round(c.bias)
    if c.threshold is not None:
        entry["threshold"] = _round(c.threshold)
    if c.aggregation != Aggregation():
        entry["aggregation"] = _aggregation(c.aggregation)
    if c.verdict_thresholds:
        entry["verdict_thresholds"] = {p: _round(t) for p, t in c.verdict_thresholds.items()}
    if c.calibration is not None:
        entry["calibration"] = _calibration(c.calibration)
    return entry


def _aggregation(a: Aggregation) -> dict:
    entry: dict = {"kind": a.kind.value}
    if a.kind is AggregationKind.MAX_ROLLING_MEAN:
        entry["window"] = a.window
    elif a.kind is AggregationKind.EMA_MAX:
        entry["alpha"] = _round(a.alpha)
    elif a.kind is AggregationKind.SOFTMAX_MAX:
        entry["temperature"] = _round(a.temperature)
    return entry


def _calibration(c: Calibration) -> dict:
    return {
        "target_fpr": c.target_fpr,
        "achieved_fpr": {phase: _round(rate) for phase, rate in c.achieved_fpr},
        "requests": c.requests,
        "data": c.data,
        "data_hash": c.data_hash,
        "model_hash": c.model_hash,
        "date": c.date,
        "tool_version": c.tool_version,
    }

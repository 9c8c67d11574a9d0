"""Component values -> circuit scores: one matrix product per batch.

``scores [n, c] = values[:, cols] @ W[:, ids].T + b``: a batch's columns are the spec
components named by its ``component_ids`` (any order, possibly a subset), so the weight
columns are gathered to match instead of reordering the values. The gathered matrix is
cached per distinct ``component_ids``, which in practice never change within a stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sidecar.spec.schema import Circuit, CircuitSpec

_MAX_CACHED_LAYOUTS = 16


class ComponentLayoutError(ValueError):
    """A batch's columns cannot be scored: duplicated or missing weighted components."""


@dataclass
class Scorer:
    circuits: tuple[Circuit, ...]  # what is scored, in spec order
    weights: np.ndarray  # float32 [c, k]: circuit x spec component
    bias: np.ndarray  # float32 [c]
    thresholds: np.ndarray  # float32 [c]; NaN where the circuit has no threshold
    _layouts: dict[bytes, np.ndarray] = field(default_factory=dict, repr=False)

    @classmethod
    def from_spec(cls, spec: CircuitSpec) -> Scorer:
        weights, bias = spec.weight_matrix()
        thresholds = [np.nan if c.threshold is None else c.threshold for c in spec.circuits]
        return cls(
            circuits=spec.circuits,
            weights=np.ascontiguousarray(weights, dtype=np.float32),
            bias=np.ascontiguousarray(bias, dtype=np.float32),
            thresholds=np.asarray(thresholds, dtype=np.float32),
        )

    @property
    def num_components(self) -> int:
        return int(self.weights.shape[1])

    @property
    def has_thresholds(self) -> bool:
        return bool(np.isfinite(self.thresholds).any())

    def score(self, values: np.ndarray, component_ids: np.ndarray) -> np.ndarray:
        """Scores float32 [n, c] from values float32 [n, k] whose columns are ``component_ids``."""
        return values @ self._gathered(component_ids) + self.bias

    def firing(self, scores: np.ndarray) -> np.ndarray:
        """Tokens per circuit whose score is above the circuit's threshold (0 without one)."""
        return (scores > self.thresholds).sum(axis=0)

    def _gathered(self, component_ids: np.ndarray) -> np.ndarray:
        key = component_ids.tobytes()
        gathered = self._layouts.get(key)
        if gathered is None:
            gathered = self._check_layout(component_ids)
            if len(self._layouts) >= _MAX_CACHED_LAYOUTS:
                self._layouts.clear()
            self._layouts[key] = gathered
        return gathered

    def _check_layout(self, component_ids: np.ndarray) -> np.ndarray:
        ids = component_ids.astype(np.int64)
        if np.unique(ids).size != ids.size:
            raise ComponentLayoutError(f"component_ids {ids.tolist()} name a component twice")
        present = np.zeros(self.num_components, dtype=bool)
        present[ids] = True
        missing = np.flatnonzero(~present & (self.weights != 0).any(axis=0))
        if missing.size:
            raise ComponentLayoutError(f"component_ids lack weighted components {missing.tolist()}")
        return np.ascontiguousarray(self.weights[:, ids].T)

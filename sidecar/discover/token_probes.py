"""Per-token behaviour probes: trained on token labels, judged per request by an aggregation.

A pooled probe (``probe_train``) sees one vector per request; a per-token probe sees every
token with its own label (``Example.token_labels``: by default a harmful request's tokens
from its user message on, or the spans the data marks) and scores every token, as the
engine does. A request's score is then the circuit's aggregation of its prompt tokens'
scores (``sidecar.spec.aggregation.aggregate``, the sidecar's own definition), so the
figures (``probe_eval.measure``) are those of the monitor as served. Aggregations are named
``kind`` or ``kind:parameter``: ``mean``, ``max``, ``last``, ``max_rolling_mean:8``
(window), ``ema_max:0.2`` (alpha), ``softmax_max:0.5`` (temperature).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sidecar.discover.datasets import Example
from sidecar.discover.probe_eval import Probe, measure
from sidecar.discover.probe_training import L2, fit_logistic
from sidecar.spec.aggregation import aggregate
from sidecar.spec.schema import Aggregation, AggregationKind
from sidecar.spec.sites import Site

TOKENS = "tokens/"  # ProbeRow.position of a per-token probe: "tokens/<aggregation>"
_PARAMETER = {
    AggregationKind.MAX_ROLLING_MEAN: "window",
    AggregationKind.EMA_MAX: "alpha",
    AggregationKind.SOFTMAX_MAX: "temperature",
}


def parse_aggregation(text: str) -> Aggregation:
    """``kind`` or ``kind:parameter`` (see the module docstring) -> an Aggregation."""
    name, _, value = text.partition(":")
    try:
        kind = AggregationKind(name)
    except ValueError:
        kinds = ", ".join(k.value for k in AggregationKind)
        raise ValueError(f"aggregation {text!r}: the kind must be one of {kinds}") from None
    field = _PARAMETER.get(kind)
    if field is None:
        if value:
            raise ValueError(f"aggregation {text!r}: {name} takes no parameter")
        return Aggregation(kind)
    if not value:
        raise ValueError(f"aggregation {text!r}: give its {field}, e.g. {name}:8")
    parsed = int(value) if field == "window" else float(value)
    return Aggregation(kind, **{field: parsed})


def aggregation_name(aggregation: Aggregation) -> str:
    """The inverse of ``parse_aggregation``."""
    field = _PARAMETER.get(aggregation.kind)
    kind = aggregation.kind.value
    return kind if field is None else f"{kind}:{getattr(aggregation, field):g}"


@dataclass(frozen=True, eq=False)
class TokenTable:
    """Every token of every request, concatenated in request order (prompt, then generated)."""

    labels: torch.Tensor  # bool [tokens]
    starts: np.ndarray  # int [requests]: where each request's tokens begin
    prompt_lengths: np.ndarray  # int [requests]
    shared_prefix: int  # leading tokens every request has (a chat template's system prompt)

    def request_of(self, total: int) -> np.ndarray:
        """int [tokens]: the request each token belongs to."""
        return np.searchsorted(self.starts, np.arange(total), side="right") - 1


def token_table(examples: Sequence[Example], tokenizer) -> TokenTable:
    labels = [e.token_labels(tokenizer) for e in examples]
    lengths = np.array([len(t) for t in labels])
    prompts = [e.token_ids(tokenizer) for e in examples]
    shared = 0
    while all(len(p) > shared + 1 and p[shared] == prompts[0][shared] for p in prompts):
        shared += 1
    return TokenTable(
        labels=torch.from_numpy(np.concatenate(labels).astype(bool)),
        starts=np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64),
        prompt_lengths=np.array([len(p) for p in prompts]),
        shared_prefix=shared,
    )


def token_probes(
    site: Site,
    x: torch.Tensor,
    table: TokenTable,
    labels: torch.Tensor,
    roles: np.ndarray,
    sources: np.ndarray,
    aggregations: Sequence[Aggregation],
    fpr: float,
    l2: float = L2,
) -> list[Probe]:
    """Fit one probe on the training requests' tokens; one row per aggregation of its scores
    over each request's prompt."""
    request = table.request_of(len(x))
    train = roles[request] == "train"
    # The shared prefix's activations are the same in every request (causal attention): one
    # copy trains, instead of one per request.
    prefix = np.arange(len(x)) - table.starts[request] < table.shared_prefix
    train &= ~prefix | (request == np.flatnonzero(roles == "train")[0])
    train = torch.from_numpy(train)
    weight, bias = fit_logistic(x[train], table.labels[train], l2)
    scores = (x @ weight).double().numpy() + bias
    prompts = [
        scores[start : start + length]
        for start, length in zip(table.starts, table.prompt_lengths, strict=True)
    ]
    probes = []
    for aggregation in aggregations:
        per_request = torch.tensor([aggregate(p, aggregation) for p in prompts])
        position = TOKENS + aggregation_name(aggregation)
        row = measure(site, position, per_request, labels, roles, sources, fpr)
        probes.append(Probe(row, weight, bias))
    return probes

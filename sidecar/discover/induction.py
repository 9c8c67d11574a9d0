"""Find induction and previous-token heads from their attention patterns.

An induction head, reading the second copy of a repeated sequence, attends to the token
right *after* the current token's earlier occurrence (and so can copy it forward). It is
measured on ``BOS + x + x`` with ``x`` uniform random tokens, where nothing but the repeat
can explain such attention. A previous-token head attends to the position right before the
query; it is measured on natural text. Both scores are mean attention weights, in [0, 1].

Thresholds: a head is named when its score exceeds 0.4. Attention spread evenly over a
100-120 token context gives each position under 0.02, so 0.4 means the head puts a large,
specific share of its attention on the one position its role predicts, while a head that
only partly does it (a BOS sink with a side job) stays out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from sidecar.models.data import natural_windows, repeated_random_tokens
from sidecar.models.tokenizer import special_ids

INDUCTION_THRESHOLD = 0.4
PREVIOUS_TOKEN_THRESHOLD = 0.4
# Repeat lengths for evaluation: longer than every span the training inserted (4-40), and
# short enough that BOS + two copies fit the 128-token windows the model was trained on.
EVAL_LENGTHS = (50, 60)
EVAL_SEEDS = (1001, 1002)


@dataclass(frozen=True)
class HeadRef:
    layer: int
    head: int

    @property
    def name(self) -> str:
        return f"l{self.layer}h{self.head}"


@dataclass(frozen=True, eq=False)
class RepeatedTokens:
    """``BOS + x + x``: ids [B, 1 + 2 * length]."""

    ids: torch.Tensor
    length: int


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Sequences the analysis runs on; nothing in them was trained on."""

    repeated: tuple[RepeatedTokens, ...]
    natural: torch.Tensor  # [B, T] held-out natural text, BOS first


@dataclass(frozen=True, eq=False)
class HeadScores:
    induction: torch.Tensor  # [n_layers, n_heads]
    previous_token: torch.Tensor  # [n_layers, n_heads]

    def induction_heads(self, threshold: float = INDUCTION_THRESHOLD) -> list[HeadRef]:
        return _above(self.induction, threshold)

    def previous_token_heads(self, threshold: float = PREVIOUS_TOKEN_THRESHOLD) -> list[HeadRef]:
        return _above(self.previous_token, threshold)


def _above(scores: torch.Tensor, threshold: float) -> list[HeadRef]:
    return [HeadRef(int(layer), int(head)) for layer, head in (scores > threshold).nonzero()]


def induction_score(pattern: torch.Tensor, length: int) -> torch.Tensor:
    """Mean attention from each second-copy token to the token after its first occurrence.

    ``pattern`` [B, H, T, T] (query, key) for ``BOS + x + x`` with ``len(x) == length``;
    query ``q`` in the second copy (``length + 1 <= q <= 2 * length``) should look at
    ``q - length + 1``. Returns [H].
    """
    if pattern.shape[-1] != 1 + 2 * length:
        raise ValueError(f"pattern has {pattern.shape[-1]} positions, expected 1 + 2 * {length}")
    queries = torch.arange(length + 1, 2 * length + 1)
    return pattern[:, :, queries, queries - length + 1].mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position but the first to the one before it; [B, H, T, T] -> [H]."""
    queries = torch.arange(1, pattern.shape[-1])
    return pattern[:, :, queries, queries - 1].mean(dim=(0, 2))


def attention_patterns(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per layer, the attention weights [B, H, T, T], computed with eager attention."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return tuple(a.float() for a in out.attentions)


def make_eval_set(
    tokenizer: PreTrainedTokenizerFast,
    natural_corpus: np.ndarray,
    lengths: Sequence[int] = EVAL_LENGTHS,
    seeds: Sequence[int] = EVAL_SEEDS,
    batch: int = 8,
    natural_len: int = 128,
) -> EvalSet:
    """Fresh random repeats (one batch per length and seed) and held-out natural windows."""
    specials = special_ids(tokenizer)
    repeated = tuple(
        RepeatedTokens(
            repeated_random_tokens(len(tokenizer), specials, tokenizer.bos_token_id, n, batch, s),
            n,
        )
        for n in lengths
        for s in seeds
    )
    natural = natural_windows(
        natural_corpus, tokenizer.bos_token_id, natural_len, batch * len(seeds), seeds[0]
    )
    return EvalSet(repeated=repeated, natural=natural)


def head_scores(model: PreTrainedModel, eval_set: EvalSet) -> HeadScores:
    """Induction scores on the repeats (mean over lengths/seeds), previous-token on natural text."""
    per_set = [
        torch.stack([induction_score(p, r.length) for p in attention_patterns(model, r.ids)])
        for r in eval_set.repeated
    ]
    previous = torch.stack(
        [previous_token_score(p) for p in attention_patterns(model, eval_set.natural)]
    )
    return HeadScores(induction=torch.stack(per_set).mean(dim=0), previous_token=previous)

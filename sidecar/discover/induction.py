"""Find induction and previous-token heads from their attention patterns, on any Llama model.

An induction head, reading the second copy of a repeated sequence, attends to the token
right *after* the current token's earlier occurrence (and so can copy it forward). It is
measured on ``[BOS] + x + x`` with ``x`` uniform random non-special tokens, where nothing but
the repeat can explain such attention. A previous-token head attends to the position right
before the query; it is measured on natural text. Both scores are mean attention weights, in
[0, 1]. BOS is the tokenizer's own BOS when it has one (SmolLM2: ``<|im_start|>``, id 1);
without one the sequences start with the first random token.

Thresholds: a head is named when its score exceeds 0.4. Attention spread evenly over a
60-120 token context gives each position under 0.02, so 0.4 means the head puts a large,
specific share of its attention on the one position its role predicts, while a head that
only partly does it (a BOS sink with a side job) stays out.

Attention comes from Hugging Face's eager attention with ``output_attentions``: one weight
matrix per *query* head, also under grouped-query attention (the key/value heads are shared).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sidecar.models import data

INDUCTION_THRESHOLD = 0.4
PREVIOUS_TOKEN_THRESHOLD = 0.4
# The reference model's evaluation lengths: longer than every span its training inserted
# (4-40), and short enough that BOS + two copies fit the 128-token windows it was trained on.
EVAL_LENGTHS = (50, 60)
EVAL_SEEDS = (1001, 1002)


@dataclass(frozen=True)
class HeadRef:
    layer: int
    head: int  # query head

    @property
    def name(self) -> str:
        return f"l{self.layer}h{self.head}"


@dataclass(frozen=True, eq=False)
class RepeatedTokens:
    """``[BOS] + x + x``: ids [B, prefix + 2 * length]; ``prefix`` is 1 with a BOS, else 0."""

    ids: torch.Tensor
    length: int
    prefix: int = 1


@dataclass(frozen=True, eq=False)
class EvalSet:
    """Sequences the analysis runs on; nothing in them was trained on."""

    repeated: tuple[RepeatedTokens, ...]
    natural: torch.Tensor  # [B, T] held-out natural text, BOS first when there is one


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


def top_heads(scores: torch.Tensor, threshold: float, k: int) -> list[HeadRef]:
    """Heads above ``threshold`` (by score, best first); if none pass, the ``k`` best."""
    order = scores.flatten().argsort(descending=True)
    n_heads = scores.shape[1]
    ranked = [HeadRef(int(i) // n_heads, int(i) % n_heads) for i in order]
    above = [h for h in ranked if scores[h.layer, h.head] > threshold]
    return above or ranked[:k]


def load_model(model_dir: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def held_out_corpus(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The held-out standard-library files (never trained on by the reference model), as one
    token stream in ``tokenizer``'s ids: the natural text of every model's analysis."""
    _, held_out = data.split_files(data.stdlib_files())
    return data.encode_corpus(tokenizer, data.read_texts(held_out))


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Every special id (BOS/EOS/PAD and the added control tokens such as chat markers)."""
    added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return tuple(sorted({*tokenizer.all_special_ids, *added}))


def induction_score(pattern: torch.Tensor, length: int, prefix: int = 1) -> torch.Tensor:
    """Mean attention from each second-copy token to the token after its first occurrence.

    ``pattern`` [B, H, T, T] (query, key) for ``[BOS] + x + x`` with ``len(x) == length`` and
    ``prefix`` leading BOS tokens; query ``q`` in the second copy
    (``prefix + length <= q < prefix + 2 * length``) should look at ``q - length + 1``.
    Returns [H].
    """
    if pattern.shape[-1] != prefix + 2 * length:
        raise ValueError(
            f"pattern has {pattern.shape[-1]} positions, expected {prefix} + 2 * {length}"
        )
    queries = torch.arange(prefix + length, prefix + 2 * length)
    return pattern[:, :, queries, queries - length + 1].mean(dim=(0, 2))


def previous_token_score(pattern: torch.Tensor) -> torch.Tensor:
    """Mean attention from each position but the first to the one before it; [B, H, T, T] -> [H]."""
    queries = torch.arange(1, pattern.shape[-1])
    return pattern[:, :, queries, queries - 1].mean(dim=(0, 2))


def attention_patterns(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per layer, the attention weights [B, n_query_heads, T, T], computed with eager attention."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    return tuple(a.float() for a in out.attentions)


def make_eval_set(
    tokenizer: PreTrainedTokenizerBase,
    natural_corpus: np.ndarray,
    lengths: Sequence[int] = EVAL_LENGTHS,
    seeds: Sequence[int] = EVAL_SEEDS,
    batch: int = 8,
    natural_len: int = 128,
) -> EvalSet:
    """Fresh random repeats (one batch per length and seed) and held-out natural windows."""
    specials = special_token_ids(tokenizer)
    bos = tokenizer.bos_token_id
    # The data helpers always put a first token; without a BOS it is drawn and dropped.
    start, prefix = (bos, 1) if bos is not None else (specials[0], 0)
    repeated = tuple(
        RepeatedTokens(
            data.repeated_random_tokens(len(tokenizer), specials, start, n, batch, s)[
                :, 1 - prefix :
            ],
            n,
            prefix,
        )
        for n in lengths
        for s in seeds
    )
    natural = data.natural_windows(
        natural_corpus, start, natural_len + 1 - prefix, batch * len(seeds), seeds[0]
    )[:, 1 - prefix :]
    return EvalSet(repeated=repeated, natural=natural)


def head_scores(model: PreTrainedModel, eval_set: EvalSet, progress: bool = False) -> HeadScores:
    """Induction scores on the repeats (mean over lengths/seeds), previous-token on natural text."""
    per_set = [
        torch.stack(
            [induction_score(p, r.length, r.prefix) for p in attention_patterns(model, r.ids)]
        )
        for r in tqdm(eval_set.repeated, desc="induction scores", disable=not progress)
    ]
    previous = torch.stack(
        [previous_token_score(p) for p in attention_patterns(model, eval_set.natural)]
    )
    return HeadScores(induction=torch.stack(per_set).mean(dim=0), previous_token=previous)

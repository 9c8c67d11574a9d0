"""Training and evaluation text for the reference model, all of it offline and deterministic.

Natural text is the running interpreter's standard library (``*.py``, sorted by path; tests,
site-packages and the codec tables in ``encodings`` left out, the latter because their
periodic rows teach copying at fixed offsets); every 20th file is held out for evaluation.

Three kinds of training window, one per stage of the curriculum (see ``train.py``):

- skip-bigram windows of random tokens where each token repeats the one two places back half
  of the time: predicting it rewards exactly a previous-token head (``skip_bigram_windows``);
- random filler with one random span followed at once by its copy, at a random offset and of
  random length, so the copy's distance varies freely (``two_copy_windows``): a random span
  can only be predicted by copying from its first occurrence, which is what an induction head
  does;
- natural text with spans of random tokens inserted twice at random places
  (``WindowSampler``).

Nothing repeats on a fixed schedule, so fixed positional offsets do not solve any of them.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

HELD_OUT_EVERY = 20  # every 20th stdlib file is evaluation text, never trained on
_SKIPPED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "encodings"})


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The standard library's ``*.py`` files under ``root`` (default: this interpreter's)."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    files = (f for f in root.rglob("*.py") if not _SKIPPED_DIRS & set(f.relative_to(root).parts))
    return sorted(files, key=lambda f: f.relative_to(root).as_posix())


def split_files(files: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files)."""
    held_out = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY == HELD_OUT_EVERY - 1]
    train = [f for i, f in enumerate(files) if i % HELD_OUT_EVERY != HELD_OUT_EVERY - 1]
    return train, held_out


def read_texts(files: Sequence[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def encode_corpus(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> np.ndarray:
    """All ``texts`` as one int32 token stream, each followed by EOS (no BOS: windows add it)."""
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts), add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return np.concatenate([np.array([*e.ids, eos], dtype=np.int32) for e in encodings])


@dataclass(frozen=True)
class SpanConfig:
    """How natural-text training windows are drawn."""

    seq_len: int = 128  # tokens per window, BOS included
    repeat_fraction: float = 0.5  # share of windows that carry repeated random spans
    max_spans: int = 2  # distinct spans per such window, each appearing twice
    min_span: int = 4
    max_span: int = 40  # evaluation uses longer spans (50, 60), never seen in training
    natural: bool = True  # False: random filler tokens instead of natural text around the spans


@dataclass(frozen=True, eq=False)
class Batch:
    input_ids: torch.Tensor  # int64 [B, T], BOS first
    second_copy: torch.Tensor  # bool [B, T], True inside the second copy of a repeated span


class WindowSampler:
    """Draws training/evaluation windows from a token stream with its own seeded generator."""

    def __init__(
        self,
        corpus: np.ndarray,
        vocab_size: int,
        special_ids: Sequence[int],
        bos_id: int,
        seed: int,
    ) -> None:
        self.corpus = corpus
        self.bos_id = bos_id
        self.random_ids = random_token_pool(vocab_size, special_ids)
        self.rng = np.random.default_rng(seed)

    def batch(self, size: int, config: SpanConfig) -> Batch:
        """``size`` windows drawn as ``config`` says."""
        if config.natural and len(self.corpus) < config.seq_len:
            raise ValueError(f"corpus has {len(self.corpus)} tokens, fewer than one window")
        rows, masks = [], []
        for _ in range(size):
            row, mask = self._window(
                config, repeated=bool(self.rng.random() < config.repeat_fraction)
            )
            rows.append(row)
            masks.append(mask)
        return Batch(
            input_ids=torch.from_numpy(np.stack(rows)).long(),
            second_copy=torch.from_numpy(np.stack(masks)),
        )

    def _window(self, config: SpanConfig, repeated: bool) -> tuple[np.ndarray, np.ndarray]:
        mask = np.zeros(config.seq_len, dtype=bool)
        n_spans = int(self.rng.integers(1, config.max_spans + 1)) if repeated else 0
        # Many spans share the window: each gets at most its share, so all copies fit.
        longest = min(config.max_span, (config.seq_len - 1) // (2 * max(n_spans, 1)))
        lengths = self.rng.integers(config.min_span, longest + 1, size=n_spans)
        natural = config.seq_len - 1 - 2 * int(lengths.sum())
        if config.natural:
            start = int(self.rng.integers(0, len(self.corpus) - natural + 1))
            text = self.corpus[start : start + natural]
        else:
            text = self.rng.choice(self.random_ids, size=natural)
        if not repeated:
            return np.concatenate([[self.bos_id], text]).astype(np.int64), mask
        spans = [self.rng.choice(self.random_ids, size=int(n)) for n in lengths]
        # Both copies of every span, in random order: a span's first occurrence is its first
        # copy. Natural text fills the gaps, cut at random points, so distances vary freely.
        order = self.rng.permutation(np.repeat(np.arange(n_spans), 2))
        cuts = np.sort(self.rng.integers(0, natural + 1, size=len(order)))
        pieces, seen, position, previous_cut = [[self.bos_id]], set(), 1, 0
        for span_index, cut in zip(order, cuts, strict=True):
            span = spans[span_index]
            pieces += [text[previous_cut:cut], span]
            position += cut - previous_cut
            if span_index in seen:
                mask[position : position + len(span)] = True
            seen.add(span_index)
            position += len(span)
            previous_cut = cut
        pieces.append(text[previous_cut:])
        return np.concatenate(pieces).astype(np.int64), mask


def skip_bigram_windows(
    rng: np.random.Generator, pool: np.ndarray, bos_id: int, batch: int, seq_len: int
) -> torch.Tensor:
    """[batch, seq_len]: BOS + random tokens, each repeating the token two back with p=0.5."""
    ids = _random_rows(rng, pool, bos_id, batch, seq_len)
    repeat = rng.random((batch, seq_len)) < 0.5
    for t in range(3, seq_len):
        ids[:, t] = np.where(repeat[:, t], ids[:, t - 2], ids[:, t])
    return torch.from_numpy(ids).long()


def two_copy_windows(
    rng: np.random.Generator,
    pool: np.ndarray,
    bos_id: int,
    batch: int,
    seq_len: int,
    min_span: int,
    max_span: int,
) -> Batch:
    """Random filler with a random span followed at once by its copy, at a random offset.

    ``second_copy`` marks the copy's tokens after its first, the ones its first occurrence
    predicts.
    """
    ids = _random_rows(rng, pool, bos_id, batch, seq_len)
    mask = np.zeros((batch, seq_len), dtype=bool)
    for row in range(batch):
        length = int(rng.integers(min_span, max_span + 1))
        start = int(rng.integers(1, seq_len - 2 * length + 1))
        copy = start + length
        ids[row, copy : copy + length] = ids[row, start:copy]
        mask[row, copy + 1 : copy + length] = True
    return Batch(input_ids=torch.from_numpy(ids).long(), second_copy=torch.from_numpy(mask))


def _random_rows(
    rng: np.random.Generator, pool: np.ndarray, bos_id: int, batch: int, seq_len: int
) -> np.ndarray:
    ids = rng.choice(pool, size=(batch, seq_len))
    ids[:, 0] = bos_id
    return ids


def random_token_pool(vocab_size: int, special_ids: Sequence[int]) -> np.ndarray:
    """Every token id except the special ones: what random spans are drawn from."""
    return np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids)).astype(np.int64)


def repeated_random_tokens(
    vocab_size: int, special_ids: Sequence[int], bos_id: int, length: int, batch: int, seed: int
) -> torch.Tensor:
    """[batch, 1 + 2 * length]: BOS, then ``length`` uniform random tokens, then the same again."""
    rng = np.random.default_rng(seed)
    tokens = rng.choice(random_token_pool(vocab_size, special_ids), size=(batch, length))
    bos = np.full((batch, 1), bos_id, dtype=np.int64)
    return torch.from_numpy(np.concatenate([bos, tokens, tokens], axis=1))


def natural_windows(
    corpus: np.ndarray, bos_id: int, seq_len: int, batch: int, seed: int
) -> torch.Tensor:
    """[batch, seq_len]: BOS + consecutive natural text from random places in ``corpus``."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(corpus) - seq_len + 2, size=batch)
    rows = [np.concatenate([[bos_id], corpus[s : s + seq_len - 1]]) for s in starts]
    return torch.from_numpy(np.stack(rows).astype(np.int64))

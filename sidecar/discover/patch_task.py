"""Patching tasks: clean/corrupted prompt pairs and the metric that compares them.

A task file is JSON Lines, one pair per line (blank lines are skipped)::

    {"clean": "The capital of France is", "corrupted": "The capital of Italy is",
     "answer": " Paris", "wrong_answer": " Rome"}
    {"clean": "...", "corrupted": "...", "continuation": " and so on."}

- ``clean`` / ``corrupted``: the two prompts, as text. After tokenization they must have the
  same number of tokens (positions are patched one for one); a pair that differs is refused
  with its line number.
- The metric, the same kind on every line:
  ``answer`` + ``wrong_answer``: logit difference ``logit(answer) - logit(wrong_answer)`` at
  the final prompt position. Each must be exactly one token (mind the leading space).
  ``continuation``: the loss (mean negative log-probability) of the continuation's tokens
  appended to either prompt; it is tokenized on its own, without special tokens.
- ``meta``: optional, anything; carried along, never read.

Rendering: by default a prompt is raw text tokenized with the tokenizer's special tokens, as
vLLM's completion API adds them (``tokenizer(text)``; SmolLM2 adds none, Llama adds BOS).
With ``chat=True`` the prompt becomes one user message rendered through the model's chat
template with the generation prompt, as the chat API does; the answer then follows the
assistant header.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from transformers import PreTrainedTokenizerBase

_METRIC_KEYS = {"answer", "wrong_answer", "continuation"}
_KEYS = {"clean", "corrupted", "meta"} | _METRIC_KEYS


class TaskError(ValueError):
    """A task file that cannot be used; the message names the file and line."""


class MetricKind(str, Enum):
    LOGIT_DIFF = "logit_diff"  # answer vs wrong_answer at the final position; higher = clean
    LOSS = "continuation_loss"  # of the continuation tokens; lower = clean


@dataclass(frozen=True)
class EncodedPair:
    """One pair as token ids. For LOSS both id tuples end with the continuation."""

    line: int
    clean_ids: tuple[int, ...]
    corrupted_ids: tuple[int, ...]
    answer_id: int = -1  # LOGIT_DIFF only
    wrong_id: int = -1  # LOGIT_DIFF only
    prompt_len: int = 0  # LOSS only: tokens before the continuation

    @property
    def length(self) -> int:
        return len(self.clean_ids)


@dataclass(frozen=True)
class Task:
    path: str
    metric: MetricKind
    chat: bool
    pairs: tuple[EncodedPair, ...]


def load_task(
    path: str | Path, tokenizer: PreTrainedTokenizerBase, chat: bool = False, limit: int = 0
) -> Task:
    """Read, validate and tokenize a task file; ``limit`` > 0 keeps only its first pairs."""
    rows = _read_rows(Path(path))
    if limit > 0:
        rows = rows[:limit]
    metric = _metric_kind(path, rows)
    pairs = tuple(_encode(path, line, row, metric, tokenizer, chat) for line, row in rows)
    return Task(path=str(path), metric=metric, chat=chat, pairs=pairs)


def render(prompt: str, tokenizer: PreTrainedTokenizerBase, chat: bool) -> list[int]:
    """Token ids of a prompt, as the completion API (raw) or the chat API (chat) feeds it."""
    if chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    return list(tokenizer(prompt).input_ids)


def _read_rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise TaskError(f"{path}: no such task file")
    rows = []
    for number, text in enumerate(path.read_text().splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{number}: not JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{number}: expected a JSON object")
        unknown = sorted(set(row) - _KEYS)
        if unknown:
            raise TaskError(f"{path}:{number}: unknown keys {unknown} (allowed: {sorted(_KEYS)})")
        for key in ("clean", "corrupted"):
            if not isinstance(row.get(key), str) or not row[key]:
                raise TaskError(f"{path}:{number}: {key!r} must be a non-empty string")
        rows.append((number, row))
    if not rows:
        raise TaskError(f"{path}: no pairs")
    return rows


def _metric_kind(path, rows: list[tuple[int, dict]]) -> MetricKind:
    kinds = set()
    for number, row in rows:
        keys = set(row) & _METRIC_KEYS
        if keys == {"answer", "wrong_answer"}:
            kinds.add(MetricKind.LOGIT_DIFF)
        elif keys == {"continuation"}:
            kinds.add(MetricKind.LOSS)
        else:
            raise TaskError(
                f"{path}:{number}: give either 'answer' and 'wrong_answer', or 'continuation' "
                f"(got {sorted(keys) or 'neither'})"
            )
    if len(kinds) > 1:
        raise TaskError(f"{path}: every line must use the same metric (found both kinds)")
    return kinds.pop()


def _encode(path, line, row, metric, tokenizer, chat) -> EncodedPair:
    clean = render(row["clean"], tokenizer, chat)
    corrupted = render(row["corrupted"], tokenizer, chat)
    if len(clean) != len(corrupted):
        raise TaskError(
            f"{path}:{line}: clean and corrupted prompts tokenize to {len(clean)} and "
            f"{len(corrupted)} tokens; patching needs the same length"
        )
    if metric is MetricKind.LOGIT_DIFF:
        answer, wrong = (_one_token(path, line, row[k], k, tokenizer) for k in _ANSWER_KEYS)
        if answer == wrong:
            raise TaskError(f"{path}:{line}: answer and wrong_answer are the same token")
        return EncodedPair(line, tuple(clean), tuple(corrupted), answer_id=answer, wrong_id=wrong)
    continuation = list(tokenizer(row["continuation"], add_special_tokens=False).input_ids)
    if not continuation:
        raise TaskError(f"{path}:{line}: the continuation has no tokens")
    return EncodedPair(
        line,
        tuple(clean + continuation),
        tuple(corrupted + continuation),
        prompt_len=len(clean),
    )


_ANSWER_KEYS = ("answer", "wrong_answer")


def _one_token(path, line, text, key, tokenizer) -> int:
    if not isinstance(text, str) or not text:
        raise TaskError(f"{path}:{line}: {key!r} must be a non-empty string")
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise TaskError(
            f"{path}:{line}: {key} {text!r} is {len(ids)} tokens for this tokenizer; "
            "it must be exactly one"
        )
    return ids[0]

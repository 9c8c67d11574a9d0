"""Train the bundled reference model: a 2-layer Llama with an induction circuit.

``python -m sidecar.models.train --out DIR`` (or ``circuitwatch train-reference``) trains the
tokenizer and the model from the interpreter's standard library plus repeated random spans
(see ``data.py``) and saves both in ``DIR`` in Hugging Face format, ready for vLLM. Training
runs a fixed number of steps from a fixed seed on 2 threads, so a re-run reproduces the
bundled weights up to float noise (same interpreter, same torch); ``--minutes`` is only a
safety cap, and a run it cuts short is reported as such.

Every ``eval_every`` steps it logs the training loss, the loss on held-out natural text, and
the best induction score (layer 1) and previous-token score (layer 0) on fresh repeats.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from sidecar.discover.induction import head_scores, make_eval_set
from sidecar.models import data
from sidecar.models.tokenizer import VOCAB_SIZE, special_ids, train_tokenizer

DEFAULT_THREADS = 2
REFERENCE_DIR = Path(__file__).with_name("reference")  # the bundled model this script made


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    head_dim: int = 64  # vLLM's CPU attention kernel rejects smaller heads
    intermediate: int = 768
    max_positions: int = 512


@dataclass(frozen=True)
class Stage:
    """A stretch of training drawing its windows one way."""

    steps: int
    batch_size: int
    spans: data.SpanConfig


def default_stages() -> tuple[Stage, ...]:
    return (
        # Short windows of random tokens, one span repeated at a random distance: copying is
        # the only thing to learn, and in 24 positions the layer-1 head finds the earlier copy
        # fast (a long context dilutes that signal and stretches the plateau).
        Stage(
            1000,
            64,
            data.SpanConfig(
                seq_len=24, repeat_fraction=1.0, max_spans=1, min_span=3, max_span=8, natural=False
            ),
        ),
        # Natural text with repeated random spans at any distance: sharpens the previous-token
        # head (code's bigram statistics reward it) and stretches copying to long distances.
        Stage(
            1500,
            16,
            data.SpanConfig(
                seq_len=256, repeat_fraction=0.75, max_spans=2, min_span=5, max_span=60
            ),
        ),
    )


@dataclass(frozen=True)
class TrainConfig:
    stages: tuple[Stage, ...] = field(default_factory=default_stages)
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1  # cosine over all stages decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    eval_every: int = 100
    seed: int = 0

    @property
    def steps(self) -> int:
        return sum(stage.steps for stage in self.stages)

    def stage_at(self, step: int) -> Stage:
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        return self.stages[-1]


@dataclass(frozen=True)
class Reading:
    """What the monitor measures on held-out data."""

    natural_loss: float = math.nan
    induction_short: float = math.nan  # best layer-1 induction score, repeats of 8 tokens
    induction: float = math.nan  # the same on the evaluation lengths (70, 120)
    previous_token: float = math.nan  # best layer-0 previous-token score on natural text


@dataclass(frozen=True)
class LogEntry:
    step: int
    seconds: float
    lr: float
    train_loss: float  # mean over the steps since the previous entry
    copy_loss: float  # the same, on second copies of repeated spans only
    reading: Reading

    def line(self) -> str:
        r = self.reading
        return (
            f"step {self.step:5d} {self.seconds:7.1f}s lr {self.lr:.2e}  "
            f"train {self.train_loss:.3f}  "
            f"copy {self.copy_loss:.3f}  natural {r.natural_loss:.3f}  induction "
            f"{r.induction_short:.2f}/{r.induction:.2f}  prev-token {r.previous_token:.2f}"
        )


def build_model(
    vocab_size: int, bos_id: int, eos_id: int, shape: ModelShape, seed: int
) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warmup, then cosine down to ``lr * min_lr_ratio`` at the last step."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def token_losses(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] next-token losses: position t predicts token t + 1."""
    logits = model(input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")


def train_model(
    model: PreTrainedModel,
    sampler: data.WindowSampler,
    config: TrainConfig,
    monitor: Callable[[PreTrainedModel], Reading] = lambda _: Reading(),
    log: Callable[[LogEntry], None] = lambda _: None,
    stop_after: int | None = None,
    deadline: float | None = None,
) -> list[LogEntry]:
    """Run ``config.steps`` AdamW steps (fewer with ``stop_after`` or past ``deadline``)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.lr,
    )
    entries: list[LogEntry] = []
    losses: list[float] = []
    copy_losses: list[float] = []
    start = time.monotonic()
    model.train()
    for step in range(config.steps):
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stage = config.stage_at(step)
        batch = sampler.batch(stage.batch_size, stage.spans)
        per_token = token_losses(model, batch.input_ids)
        loss = per_token.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        copies = batch.second_copy[:, 1:]
        if copies.any():
            copy_losses.append(per_token.detach()[copies].mean().item())
        last = step + 1 == config.steps
        cut = step + 1 == stop_after or (deadline is not None and time.monotonic() > deadline)
        if (step + 1) % config.eval_every == 0 or last or cut:
            model.eval()
            reading = monitor(model)
            model.train()
            entry = LogEntry(
                step=step + 1,
                seconds=time.monotonic() - start,
                lr=lr,
                train_loss=sum(losses) / len(losses),
                copy_loss=sum(copy_losses) / len(copy_losses) if copy_losses else math.nan,
                reading=reading,
            )
            losses.clear()
            copy_losses.clear()
            entries.append(entry)
            log(entry)
        if cut:
            break
    model.eval()
    return entries


def make_monitor(
    tokenizer: PreTrainedTokenizerFast, held_out: np.ndarray
) -> Callable[[PreTrainedModel], Reading]:
    long = make_eval_set(tokenizer, held_out, batch=4, seeds=(7,))
    short = make_eval_set(tokenizer, held_out, lengths=(8,), batch=16, seeds=(7,))

    def monitor(model: PreTrainedModel) -> Reading:
        with torch.no_grad():
            natural = token_losses(model, long.natural).mean().item()
        scores = head_scores(model, long)
        return Reading(
            natural_loss=natural,
            induction_short=head_scores(model, short).induction[1:].max().item(),
            induction=scores.induction[1:].max().item(),
            previous_token=scores.previous_token[0].max().item(),
        )

    return monitor


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainConfig()
    parser.add_argument("--out", type=Path, required=True, help="directory to save the model in")
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="random seed (default %(default)s)"
    )
    parser.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="safety cap on wall time; a run it cuts short is not the reproducible reference",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many steps (smoke tests); such a run is not the reference either",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=DEFAULT_THREADS,
        help="torch CPU threads (default %(default)s; the bundled weights used 2)",
    )


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    config = TrainConfig(seed=args.seed)
    shape = ModelShape()
    started = time.monotonic()
    train_files, held_out_files = data.split_files(data.stdlib_files())
    train_texts = data.read_texts(train_files)
    tokenizer = train_tokenizer(train_texts, VOCAB_SIZE)
    train_corpus = data.encode_corpus(tokenizer, train_texts)
    held_out = data.encode_corpus(tokenizer, data.read_texts(held_out_files))
    print(
        f"data: {len(train_files)} training files ({len(train_corpus):,} tokens), "
        f"{len(held_out_files)} held out ({len(held_out):,} tokens); "
        f"tokenizer {len(tokenizer)} entries; {time.monotonic() - started:.1f}s",
        flush=True,
    )
    sampler = data.WindowSampler(
        train_corpus, len(tokenizer), special_ids(tokenizer), tokenizer.bos_token_id, config.seed
    )
    model = build_model(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, shape, config.seed
    )
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    deadline = started + 60 * args.minutes if args.minutes else None
    entries = train_model(
        model,
        sampler,
        config,
        make_monitor(tokenizer, held_out),
        log=lambda e: print(e.line(), flush=True),
        stop_after=args.max_steps,
        deadline=deadline,
    )
    complete = entries[-1].step == config.steps
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)
    record = {
        "complete": complete,
        "wall_seconds": round(time.monotonic() - started, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "config": asdict(config),
        "shape": asdict(shape),
        "log": [asdict(e) for e in entries],
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    status = "done" if complete else f"STOPPED EARLY at step {entries[-1].step} of {config.steps}"
    print(f"{status}: saved to {args.out} after {record['wall_seconds']}s", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        prog="python -m sidecar.models.train", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    raise SystemExit(run(parser.parse_args()))

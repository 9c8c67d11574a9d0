"""Train the bundled reference model: a 2-layer Llama with an induction circuit.

``python -m sidecar.models.train --out DIR`` (or ``circuitwatch train-reference``) trains the
tokenizer and the model from the interpreter's standard library plus synthetic windows (see
``data.py``) and saves both in ``DIR`` in Hugging Face format, ready for vLLM. Training runs a
fixed number of steps from a fixed seed on 2 threads, so a re-run reproduces the bundled
weights up to float noise (same interpreter, same torch); ``--minutes`` is only a safety cap,
and a run it cuts short is reported as such.

A curriculum of three stages with a switch after the first, because plain language-model
training does not grow an induction head within this budget:

1. ``previous_token``: skip-bigram windows with layer 1's attention and every MLP silenced and
   only head 0 of layer 0 writing: that head becomes a previous-token head.
2. At the switch, layer 0's output is scaled down to the embeddings' size. Stage 1 leaves it
   ~10x larger than the token embedding (predicting the previous token has to outvote the
   current one), and then layer 1 cannot read the current token for its query or the attended
   token for its copy, and no induction head forms. The unembedding is re-initialised (stage 1
   taught it to name the previous token), and layer 0 and the embeddings are frozen so that
   the previous-token head stays as it is.
3. ``copy``: random spans followed by their copy at random offsets; layer 1 becomes induction
   heads within a few hundred steps.
4. ``natural``: natural text with repeated random spans, so the model also predicts code and
   ordinary text has a loss to compare ablations against.

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

from sidecar.discover.hooks import hooks
from sidecar.discover.induction import head_scores, make_eval_set
from sidecar.models import data
from sidecar.models.tokenizer import VOCAB_SIZE, special_ids, train_tokenizer

DEFAULT_THREADS = 2

PREVIOUS_TOKEN_HEAD = 0  # the one layer-0 head stage 1 trains


@dataclass(frozen=True)
class ModelShape:
    hidden: int = 256
    layers: int = 2
    heads: int = 4
    head_dim: int = 64  # vLLM's CPU attention kernel rejects smaller heads
    intermediate: int = 512
    max_positions: int = 512


@dataclass(frozen=True)
class TrainConfig:
    previous_token_steps: int = 300
    previous_token_lr: float = 3e-3
    previous_token_batch: tuple[int, int] = (32, 48)  # windows, tokens per window
    copy_steps: int = 600
    copy_batch: tuple[int, int] = (16, 128)
    copy_spans: tuple[int, int] = (4, 40)  # evaluation repeats 50 and 60 tokens
    natural_steps: int = 600
    natural: data.SpanConfig = field(default_factory=data.SpanConfig)
    natural_batch: int = 16
    lr: float = 1e-3  # stages 2-3; the last stage decays it to lr * min_lr_ratio
    min_lr_ratio: float = 0.1
    warmup: int = 50
    init_std: float = 0.02
    eval_every: int = 100
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.previous_token_steps + self.copy_steps + self.natural_steps

    def stage_at(self, step: int) -> str:
        """ "previous_token", "copy" or "natural"."""
        if step < self.previous_token_steps:
            return "previous_token"
        if step < self.previous_token_steps + self.copy_steps:
            return "copy"
        return "natural"


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
    vocab_size: int, bos_id: int, eos_id: int, shape: ModelShape, config: TrainConfig
) -> LlamaForCausalLM:
    llama = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        head_dim=shape.head_dim,
        max_position_embeddings=shape.max_positions,
        rope_theta=10000.0,
        # Untied: stage 2 re-initialises the unembedding but keeps the embeddings.
        tie_word_embeddings=False,
        initializer_range=config.init_std,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
        dtype="float32",
    )
    torch.manual_seed(config.seed)
    return LlamaForCausalLM(llama)


def _previous_token_columns(model: LlamaForCausalLM) -> slice:
    """The columns of layer 0's ``o_proj`` input that belong to the previous-token head."""
    width = model.config.head_dim
    return slice(PREVIOUS_TOKEN_HEAD * width, (PREVIOUS_TOKEN_HEAD + 1) * width)


class _Silence:
    """Stage 1's hooks: layer 1's attention, every MLP and all but one layer-0 head write 0."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        layers = model.model.layers
        head = _previous_token_columns(model)

        def only_head_zero(_module, args):
            z = torch.zeros_like(args[0])
            z[..., head] = args[0][..., head]
            return (z,)

        self.handles = [
            layers[0].self_attn.o_proj.register_forward_pre_hook(only_head_zero),
            layers[1].self_attn.register_forward_hook(
                lambda _m, _a, out: (torch.zeros_like(out[0]), *out[1:])
            ),
            *(
                layer.mlp.register_forward_hook(lambda _m, _a, out: torch.zeros_like(out))
                for layer in layers
            ),
        ]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def switch_to_copying(model: LlamaForCausalLM, ids: torch.Tensor, init_std: float) -> None:
    """Stage 1 -> 2 (see the module docstring), measuring layer 0's output on ``ids``."""
    attn0 = model.model.layers[0].self_attn
    captured: list[torch.Tensor] = []
    keep = (attn0, "post", lambda _m, _a, out: captured.append(out[0]))
    with torch.no_grad():
        columns = torch.ones(attn0.o_proj.weight.shape[1], dtype=torch.bool)
        columns[_previous_token_columns(model)] = False
        attn0.o_proj.weight[:, columns] = 0.0  # the heads stage 1 silenced stay silent
        with hooks([keep]):
            model(ids)
        ratio = (
            captured[0][:, 1:].norm(dim=-1).mean()
            / model.model.embed_tokens(ids)[:, 1:].norm(dim=-1).mean()
        ).item()
        attn0.o_proj.weight.div_(ratio)
        model.lm_head.weight.normal_(0.0, init_std)
        model.model.norm.weight.fill_(1.0)
    for parameter in [*model.model.layers[0].parameters(), model.model.embed_tokens.weight]:
        parameter.requires_grad_(False)


def lr_at(step: int, config: TrainConfig) -> float:
    """Stage 1: warmup then constant; stage 2: constant; stage 3: cosine to the floor."""
    stage = config.stage_at(step)
    if stage == "previous_token":
        return config.previous_token_lr * min(1.0, (step + 1) / config.warmup)
    if stage == "copy":
        return config.lr
    step -= config.previous_token_steps + config.copy_steps
    progress = step / max(1, config.natural_steps - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine)


def token_losses(model: PreTrainedModel, input_ids: torch.Tensor) -> torch.Tensor:
    """[B, T-1] next-token losses: position t predicts token t + 1."""
    logits = model(input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), input_ids[:, 1:], reduction="none")


def _optimizer(model: PreTrainedModel, lr: float) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=lr, betas=(0.9, 0.98), weight_decay=0.0)


def train_model(
    model: LlamaForCausalLM,
    sampler: data.WindowSampler,
    config: TrainConfig,
    monitor: Callable[[PreTrainedModel], Reading] = lambda _: Reading(),
    log: Callable[[LogEntry], None] = lambda _: None,
    stop_after: int | None = None,
    deadline: float | None = None,
) -> list[LogEntry]:
    """Run the curriculum's ``config.steps`` steps (fewer with ``stop_after`` or ``deadline``)."""
    rng, pool, bos = sampler.rng, sampler.random_ids, sampler.bos_id
    silence: _Silence | None = _Silence(model)
    optimizer = _optimizer(model, config.previous_token_lr)
    entries: list[LogEntry] = []
    losses: list[float] = []
    copy_losses: list[float] = []
    start = time.monotonic()
    model.train()
    for step in range(config.steps):
        if step == config.previous_token_steps:
            silence.remove()
            silence = None
            ids = data.skip_bigram_windows(rng, pool, bos, *config.previous_token_batch)
            switch_to_copying(model, ids, config.init_std)
            optimizer = _optimizer(model, config.lr)
        lr = lr_at(step, config)
        for group in optimizer.param_groups:
            group["lr"] = lr
        stage = config.stage_at(step)
        if stage == "previous_token":
            ids = data.skip_bigram_windows(rng, pool, bos, *config.previous_token_batch)
            copies = None
        elif stage == "copy":
            batch = data.two_copy_windows(rng, pool, bos, *config.copy_batch, *config.copy_spans)
            ids, copies = batch.input_ids, batch.second_copy[:, 1:]
        else:
            batch = sampler.batch(config.natural_batch, config.natural)
            ids, copies = batch.input_ids, batch.second_copy[:, 1:]
        per_token = token_losses(model, ids)
        loss = per_token[copies].mean() if stage == "copy" else per_token.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if copies is not None and copies.any():
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
    if silence is not None:  # stopped during stage 1
        silence.remove()
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
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, shape, config
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

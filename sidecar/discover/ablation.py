"""Causal check: ablate attention heads three ways and measure what the model loses.

A head is ablated by overwriting its slice of the ``o_proj`` input (its ``hook_z``, one
``d_head`` slice per *query* head, also under grouped-query attention) with

- ``mean``: the slice's mean over held-out natural text, so the head still adds its average
  contribution but no longer depends on the input;
- ``zero``: zeros, as if the head were removed (its average contribution goes too, so this
  also hurts text the head does nothing special on);
- ``resample``: the slice's clean value on a *different* sequence of the same batch (the batch
  rotated by one), so the head's output is typical for the position but about other tokens.

If the named induction heads really do the copying, the loss on the second copy of a repeated
random sequence rises by a large factor, while the loss on ordinary text moves much less.
Ablating the previous-token heads should hurt the repeats too: the induction heads find their
target through the previous-token head's output (K-composition).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from sidecar.discover.hooks import hooks
from sidecar.discover.induction import EvalSet, HeadRef, RepeatedTokens


class AblationKind(str, Enum):
    MEAN = "mean"
    ZERO = "zero"
    RESAMPLE = "resample"


@dataclass(frozen=True)
class AblationResult:
    heads: tuple[HeadRef, ...]
    kind: AblationKind
    repeated_before: float  # loss on the second copy of random repeats, nats/token
    repeated_after: float
    natural_before: float  # loss on held-out natural text
    natural_after: float

    @property
    def repeated_factor(self) -> float:
        return self.repeated_after / self.repeated_before

    @property
    def natural_factor(self) -> float:
        return self.natural_after / self.natural_before


# layer -> the full-width replacement for that layer's hook_z [..., n_heads * d_head], given z
Replacement = Callable[[int, torch.Tensor], torch.Tensor]


def d_head(model: PreTrainedModel) -> int:
    config = model.config
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True, eq=False)
class CleanRun:
    """One unablated pass over an eval set: the losses and every layer's ``hook_z``."""

    repeated_loss: float  # second-copy loss, mean over the repeat batches
    natural_loss: float
    # per batch (the repeat batches in order, then the natural text), per layer [B, T, width]
    z: tuple[tuple[torch.Tensor, ...], ...]

    @property
    def means(self) -> tuple[torch.Tensor, ...]:
        """Per layer, the mean ``hook_z`` [n_heads * d_head] over every natural-text position."""
        return tuple(z.flatten(0, -2).mean(dim=0) for z in self.z[-1])


def o_proj_inputs(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per layer, the clean ``o_proj`` input (hook_z) [B, T, n_heads * d_head]."""
    return _forward(model, input_ids)[1]


def clean_run(model: PreTrainedModel, eval_set: EvalSet) -> CleanRun:
    repeated, zs = [], []
    for r in eval_set.repeated:
        logits, z = _forward(model, r.ids)
        repeated.append(second_copy_loss(logits, r))
        zs.append(z)
    logits, z = _forward(model, eval_set.natural)
    return CleanRun(sum(repeated) / len(repeated), natural_loss(logits, eval_set.natural), (*zs, z))


def _forward(
    model: PreTrainedModel, input_ids: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    seen: list[torch.Tensor] = []
    keep = [
        (layer.self_attn.o_proj, "pre", lambda _m, args: seen.append(args[0].detach()))
        for layer in model.model.layers
    ]
    with hooks(keep), torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    return logits, tuple(seen)


@contextmanager
def replaced(
    model: PreTrainedModel, heads: Sequence[HeadRef], replacement: Replacement
) -> Iterator[None]:
    """While inside, each head in ``heads`` outputs its columns of ``replacement(layer, z)``."""
    width = d_head(model)
    installed = []
    for layer_index in sorted({h.layer for h in heads}):
        columns = torch.cat(
            [
                torch.arange(h.head * width, (h.head + 1) * width)
                for h in heads
                if h.layer == layer_index
            ]
        )

        def replace(_module, args, columns=columns, layer_index=layer_index):
            z = args[0].clone()
            z[..., columns] = replacement(layer_index, z)[..., columns].to(z.dtype)
            return (z, *args[1:])

        installed.append((model.model.layers[layer_index].self_attn.o_proj, "pre", replace))
    with hooks(installed):
        yield


def second_copy_loss(logits: torch.Tensor, repeated: RepeatedTokens) -> float:
    """Mean loss predicting the second copy's tokens 2..n (the first one is not predictable)."""
    n, p = repeated.length, repeated.prefix
    # Position q predicts token q + 1; the second copy's tokens 2..n sit at p+n+1 .. p+2n-1.
    predicting = logits[:, p + n : p + 2 * n - 1]
    targets = repeated.ids[:, p + n + 1 : p + 2 * n]
    return F.cross_entropy(predicting.flatten(0, 1), targets.flatten()).item()


def natural_loss(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).item()


def replacement_for(
    kind: AblationKind, clean_z: Sequence[torch.Tensor], means: Sequence[torch.Tensor]
) -> Replacement:
    """What ``kind`` writes into the ablated heads on a batch whose clean hook_z is ``clean_z``."""
    kind = AblationKind(kind)
    if kind is AblationKind.MEAN:
        return lambda layer, z: means[layer].expand_as(z)
    if kind is AblationKind.ZERO:
        return lambda layer, z: torch.zeros_like(z)
    if clean_z[0].shape[0] < 2:
        raise ValueError("resample-ablation needs at least two sequences per batch")
    # Every sequence gets the clean hook_z of its neighbour in the batch.
    return lambda layer, z: clean_z[layer].roll(1, dims=0)


def ablate_heads(
    model: PreTrainedModel,
    eval_set: EvalSet,
    heads: Sequence[HeadRef],
    kind: AblationKind = AblationKind.MEAN,
    clean: CleanRun | None = None,
) -> AblationResult:
    """Losses before (``clean``, run here unless given) and after ablating ``heads``.

    Mean-ablation uses the means over the eval set's natural text; resample-ablation each
    batch's clean hook_z, rotated by one sequence.
    """
    kind = AblationKind(kind)
    clean = clean if clean is not None else clean_run(model, eval_set)
    means = clean.means

    def logits(ids: torch.Tensor, clean_z: Sequence[torch.Tensor]) -> torch.Tensor:
        with replaced(model, heads, replacement_for(kind, clean_z, means)), torch.no_grad():
            return model(ids, use_cache=False).logits

    repeated = [
        second_copy_loss(logits(r.ids, z), r)
        for r, z in zip(eval_set.repeated, clean.z[:-1], strict=True)
    ]
    natural = natural_loss(logits(eval_set.natural, clean.z[-1]), eval_set.natural)
    return AblationResult(
        heads=tuple(heads),
        kind=kind,
        repeated_before=clean.repeated_loss,
        repeated_after=sum(repeated) / len(repeated),
        natural_before=clean.natural_loss,
        natural_after=natural,
    )

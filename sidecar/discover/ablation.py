"""Causal check: mean-ablate attention heads and measure what the model loses.

A head is ablated by replacing its slice of the ``o_proj`` input (its ``hook_z``) with that
slice's mean over reference text, so the head still adds its average contribution but no
longer depends on the input. If the named induction heads really do the copying, the loss
on the second copy of a repeated random sequence rises by a large factor, while the loss on
ordinary text barely moves. Ablating the previous-token heads should hurt the repeats too:
the induction heads find their target through the previous-token head's output (K-composition).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from sidecar.discover.hooks import hooks
from sidecar.discover.induction import EvalSet, HeadRef, RepeatedTokens


@dataclass(frozen=True)
class AblationResult:
    heads: tuple[HeadRef, ...]
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


def head_means(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per layer, the mean ``o_proj`` input [n_heads * d_head] over all positions given."""
    means: list[torch.Tensor] = []
    keep = [
        (
            layer.self_attn.o_proj,
            "pre",
            lambda _m, args: means.append(args[0].detach().flatten(0, -2).mean(dim=0)),
        )
        for layer in model.model.layers
    ]
    with hooks(keep), torch.no_grad():
        model(input_ids, use_cache=False)
    return tuple(means)


@contextmanager
def ablated(
    model: PreTrainedModel, heads: Sequence[HeadRef], means: Sequence[torch.Tensor]
) -> Iterator[None]:
    """While inside, each head in ``heads`` outputs its mean ``hook_z`` (from ``head_means``)."""
    d_head = model.config.head_dim
    replacements = []
    for layer_index in sorted({h.layer for h in heads}):
        columns = torch.cat(
            [
                torch.arange(h.head * d_head, (h.head + 1) * d_head)
                for h in heads
                if h.layer == layer_index
            ]
        )
        mean = means[layer_index][columns]

        def replace(_module, args, columns=columns, mean=mean):
            z = args[0].clone()
            z[..., columns] = mean.to(z.dtype)
            return (z, *args[1:])

        replacements.append((model.model.layers[layer_index].self_attn.o_proj, "pre", replace))
    with hooks(replacements):
        yield


def second_copy_loss(model: PreTrainedModel, repeated: RepeatedTokens) -> float:
    """Mean loss predicting the second copy's tokens 2..n (the first one is not predictable)."""
    n = repeated.length
    with torch.no_grad():
        logits = model(repeated.ids, use_cache=False).logits
    # Position q predicts token q + 1; the second copy's tokens 2..n sit at n + 2 .. 2n.
    predicting = logits[:, n + 1 : 2 * n]
    targets = repeated.ids[:, n + 2 : 2 * n + 1]
    return F.cross_entropy(predicting.flatten(0, 1), targets.flatten()).item()


def natural_loss(model: PreTrainedModel, input_ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(input_ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).item()


def _losses(model: PreTrainedModel, eval_set: EvalSet) -> tuple[float, float]:
    repeated = sum(second_copy_loss(model, r) for r in eval_set.repeated) / len(eval_set.repeated)
    return repeated, natural_loss(model, eval_set.natural)


def ablate_heads(
    model: PreTrainedModel, eval_set: EvalSet, heads: Sequence[HeadRef]
) -> AblationResult:
    """Losses before and after mean-ablating ``heads`` (means over the natural text)."""
    means = head_means(model, eval_set.natural)
    repeated_before, natural_before = _losses(model, eval_set)
    with ablated(model, heads, means):
        repeated_after, natural_after = _losses(model, eval_set)
    return AblationResult(
        heads=tuple(heads),
        repeated_before=repeated_before,
        repeated_after=repeated_after,
        natural_before=natural_before,
        natural_after=natural_after,
    )

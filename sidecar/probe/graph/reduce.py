"""The fused per-site reducer: one site's activation in, its component values out.

Every component is linear in the site's activation except a head's norm, so one site costs
one matmul plus, when heads are read by norm, one batched einsum over those heads:

    direction  x . w + b                       -> a row of ``weight``
    head + u   c_h . u + b = z_h . (W_O_h^T u) + b   (c_h = z_h W_O_h^T) -> a row of ``weight``
    head       ||c_h|| = sqrt(z_h G_h z_h^T)   (G_h = W_O_h^T W_O_h)  -> one slice of ``head_gram``

The norm goes through the [d_head, d_head] Gram matrix rather than c_h itself: 2 * d_head
instead of 2 * d_model multiply-adds per head dimension (16x fewer at d_model 1024), and no
[T, heads, d_model] intermediate.

Shapes: x [T, width] where width is what this rank holds of the site (hook_z is sharded by
heads and mlp.hook_post by neurons under tensor parallelism). Columns whose read-out spans
other ranks' shards ("partial" columns, a direction over a sharded site) are summed across
ranks by ``all_reduce`` before their bias is added. Everything is pure tensor ops in
float32, safe to trace into a compiled graph or capture in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sidecar.spec.schema import Component, ComponentKind


@dataclass(frozen=True)
class SiteShard:
    """What this rank holds of a site: ``columns`` of the full width, and for hook_z the heads.

    ``o_proj_weight`` is this rank's slice of W_O, [d_model, len(heads) * d_head], needed only
    for head components. ``replicated`` sites (the residual stream) are identical on every
    rank; sharded sites hold a contiguous slice of the features.
    """

    width: int
    columns: slice
    replicated: bool
    heads: range = range(0)
    d_head: int = 0
    o_proj_weight: torch.Tensor | None = None


@dataclass(frozen=True)
class ReducerLayout:
    """Which spec components a reducer's output columns hold, and which of them this rank ships."""

    component_ids: tuple[int, ...]  # spec index of each output column
    shipped: tuple[int, ...]  # output columns this rank ships (owned by it)


class SiteReducer(nn.Module):
    """Component values for one site on one rank: ``forward(x [T, width]) -> [T, k]`` float32.

    Output columns, in order: linear columns this rank owns, head norms this rank owns,
    partial columns (summed over ranks, shipped by rank 0 only).
    """

    def __init__(
        self,
        components: list[tuple[int, Component]],
        shard: SiteShard,
        rank: int = 0,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        linear: list[tuple[int, torch.Tensor, float]] = []
        partial: list[tuple[int, torch.Tensor, float]] = []
        norms: list[tuple[int, int]] = []  # (spec index, local head)
        for index, component in components:
            if component.kind is ComponentKind.HEAD:
                if component.head not in shard.heads:
                    continue  # another rank holds this head
                local = component.head - shard.heads.start
                if component.direction is None:
                    norms.append((index, local))
                else:
                    linear.append((index, _head_row(component, local, shard), component.bias))
            elif shard.replicated:
                if rank == 0:
                    linear.append((index, _direction(component), component.bias))
            else:
                row = _direction(component)[shard.columns]
                (partial if all_reduce is not None else linear).append((index, row, component.bias))
        self.all_reduce = all_reduce
        self.register_buffer("weight", _rows([r for _, r, _ in linear], shard.width), False)
        self.register_buffer("bias", _biases([b for _, _, b in linear]), False)
        self.register_buffer(
            "head_index", torch.tensor([h for _, h in norms], dtype=torch.long), False
        )
        self.register_buffer("head_gram", _head_grams([h for _, h in norms], shard), False)
        self.register_buffer(
            "partial_weight", _rows([r for _, r, _ in partial], shard.width), False
        )
        self.register_buffer("partial_bias", _biases([b for _, _, b in partial]), False)
        self.d_head = shard.d_head
        ids = [i for i, _, _ in linear] + [i for i, _ in norms] + [i for i, _, _ in partial]
        owned = len(linear) + len(norms)
        shipped = list(range(owned)) + (list(range(owned, len(ids))) if rank == 0 else [])
        self.layout = ReducerLayout(component_ids=tuple(ids), shipped=tuple(shipped))

    @property
    def num_columns(self) -> int:
        return len(self.layout.component_ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float32)
        parts = []
        if self.weight.shape[0]:
            parts.append(torch.addmm(self.bias, x, self.weight.t()))
        if self.head_index.shape[0]:
            z = x.view(x.shape[0], -1, self.d_head).index_select(1, self.head_index)
            squared = (torch.einsum("thd,hde->the", z, self.head_gram) * z).sum(dim=-1)
            # G_h is positive semi-definite; rounding can still leave a tiny negative.
            parts.append(torch.sqrt(torch.clamp(squared, min=0.0)))
        if self.partial_weight.shape[0]:
            partial = self.all_reduce(x @ self.partial_weight.t())
            parts.append(partial + self.partial_bias)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _head_row(component: Component, local: int, shard: SiteShard) -> torch.Tensor:
    """W_O_h^T u placed at head ``local``'s columns: z . row = (z_h W_O_h^T) . u."""
    assert shard.o_proj_weight is not None and component.direction is not None
    cols = slice(local * shard.d_head, (local + 1) * shard.d_head)
    row = torch.zeros(shard.width, dtype=torch.float32)
    row[cols] = shard.o_proj_weight[:, cols].to(torch.float32).t() @ _direction(component)
    return row


def _direction(component: Component) -> torch.Tensor:
    """The spec's direction (float32 numpy, so the torch-free sidecar can load specs) as a
    tensor, sharing its memory: built into the reducer's buffers once, never per token."""
    assert component.direction is not None
    return torch.from_numpy(component.direction)


def _head_grams(heads: list[int], shard: SiteShard) -> torch.Tensor:
    """[n, d_head, d_head]: W_O_h^T W_O_h for each head read by norm (float64 products)."""
    d_head = max(shard.d_head, 1)
    if not heads:
        return torch.zeros(0, d_head, d_head)
    assert shard.o_proj_weight is not None
    w = shard.o_proj_weight.to(torch.float64)
    blocks = [w[:, h * shard.d_head : (h + 1) * shard.d_head] for h in heads]
    return torch.stack([b.t() @ b for b in blocks]).to(torch.float32)


def _rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, width)
    return torch.stack([r.to(torch.float32) for r in rows]).contiguous()


def _biases(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)

"""The fused per-site reducer: one site's activation in, its component values out.

Every component of a site is read out of one matrix product, ``y = x[:, lo:hi] @ weight``:

    direction  x . w + b                       -> a column of ``weight``, + b
    head + u   c_h . u + b = z_h . (W_O_h^T u) + b   (c_h = z_h W_O_h^T) -> a column, + b
    head       ||c_h|| = ||z_h R_h^T||         (W_O_h = Q_h R_h, Q_h orthonormal columns)
                                               -> d_head columns (R_h^T), then the root of
                                                  their sum of squares

The norm goes through the [d_head, d_head] triangular factor R_h of W_O_h rather than c_h
itself: 2 * d_head instead of 2 * d_model multiply-adds per head dimension and no
[T, heads, d_model] intermediate. A weight column is zero outside its component's support
(a head's columns), and the product runs over the span ``lo:hi`` of the columns any of them
reads, a view of ``x``: a site read by heads only never touches the rest of the site.

A head's d_head norm columns are zero outside its own d_head features, so in one product
with other columns they cost span / d_head times their own multiply-adds. They join the
product while that is at most ``NORM_WASTE`` times (``sidecar.spec.cost``, which plans
each site's products for the reducer and the cost estimate alike; at 1: a single head read
by norm, alone or with directions through the same head); otherwise (several heads, or a
direction over the whole site) they get a second, batched product over the heads alone,
``z_h @ R_h^T`` for each, as cheap as the arithmetic allows. ``product_flops`` counts what
a reducer runs.

Precision: the product runs in the activation's dtype (the model's) with ``weight`` stored
in it, accumulating in float32 (``torch.mm(..., out_dtype=float32)`` where the backend has
it, else the backend's own float32 accumulation and a bfloat16 result); bias, squares and
roots are float32. In float32 models this is the float32 arithmetic of before. In bfloat16
models no float32 copy of the site is made; the weights are rounded to bfloat16 (unit
roundoff 2^-8), which moves a direction's value by at most 2^-8 sum_i |x_i w_i| and a head's
norm by at most 2^-8 ||z_h|| ||W_O_h||_F (random signs make it about sqrt(width) times
smaller), plus 2^-8 of the value itself where the product returns bfloat16 (on CPU). On
SmolLM2 (``python -m benchmarks.reduce_precision``) that is, per token, at most 5e-2 of a
residual direction's spread over tokens (median component 1e-2; the stream's few huge
features dominate) and 1.3e-2 of a head norm's, against 1e-5 with float32 products; the
bfloat16 activations themselves move values by up to 0.18 of the spread against the float32
reference (tests/smollm2_server/test_live_smollm2.py). Splitting each weight into two
bfloat16 parts (two columns of the same product, summed in float32) would take the first error
to ~2^-16 at twice the product's FLOPs.

Shapes: x [T, width] where width is what this rank holds of the site (hook_z is sharded by
heads and mlp.hook_post by neurons under tensor parallelism). Columns whose read-out spans
other ranks' shards ("partial" columns, a direction over a sharded site) are summed across
ranks by ``all_reduce`` before their bias is added. Everything is pure tensor ops, safe to
trace into a compiled graph or capture in a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from sidecar.spec.cost import product_plan
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
    partial columns (summed over ranks, shipped by rank 0 only). ``weight`` [hi - lo, n]
    holds the columns of the one product: linear, norms' factors when they join it, partial;
    ``factors`` [heads, d_head, r] the norms' factors when they get their own. ``dtype`` is
    the dtype of the activations it will see (the model's); ``float32_out`` whether products
    can return float32 from them (``float32_products``).
    """

    def __init__(
        self,
        components: list[tuple[int, Component]],
        shard: SiteShard,
        rank: int = 0,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        dtype: torch.dtype = torch.float32,
        float32_out: bool = False,
    ):
        super().__init__()
        everywhere = (0, shard.width)
        linear: list[tuple[int, torch.Tensor, float, tuple[int, int]]] = []
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
                    row = _head_row(component, local, shard)
                    linear.append((index, row, component.bias, _head_span(local, shard)))
            elif shard.replicated:
                if rank == 0:
                    linear.append((index, _direction(component), component.bias, everywhere))
            else:
                row = _direction(component)[shard.columns]
                if all_reduce is not None:
                    partial.append((index, row, component.bias))
                else:
                    linear.append((index, row, component.bias, everywhere))
        factors = [_norm_factor(h, shard) for _, h in norms]
        others = [s for _, _, _, s in linear] + [everywhere] * len(partial)
        heads = [_head_span(h, shard) for _, h in norms]
        d_model = shard.o_proj_weight.shape[0] if shard.o_proj_weight is not None else 0
        plan = product_plan(others, heads, shard.d_head, d_model)
        self.norms_joined = plan.norms_joined
        rows = [r for _, r, _, _ in linear]
        if self.norms_joined:
            for (_, h), factor in zip(norms, factors, strict=True):
                rows += list(_placed(factor, h, shard))
        rows += [r for _, r, _ in partial]
        self.lo, self.hi = plan.lo, plan.hi
        self.narrow = (self.lo, self.hi) != everywhere
        self.all_reduce = all_reduce
        self.float32_out = float32_out and dtype != torch.float32
        weight = torch.zeros(0, 0)
        if rows:
            weight = torch.stack([r.to(torch.float64) for r in rows])[:, self.lo : self.hi]
        # [hi - lo, columns]: x[:, lo:hi] @ weight, in the activations' dtype.
        self.register_buffer("weight", weight.t().to(dtype).contiguous(), False)
        own = torch.zeros(0)
        if factors and not self.norms_joined:
            own = torch.stack(factors).transpose(1, 2).to(dtype)
        # [heads, d_head, r]: z_h @ factors[h], batched over the heads.
        self.register_buffer("factors", own, False)
        self.register_buffer(
            "head_index", torch.tensor([h for _, h in norms], dtype=torch.long), False
        )
        self.register_buffer("bias", _biases([b for _, _, b, _ in linear]), False)
        self.register_buffer("partial_bias", _biases([b for _, _, b in partial]), False)
        self.n_linear = len(linear)
        self.n_norms = len(norms)
        self.norm_width = factors[0].shape[0] if factors else 0  # columns per head norm
        self.d_head = shard.d_head
        ids = [i for i, _, _, _ in linear] + [i for i, _ in norms] + [i for i, _, _ in partial]
        owned = len(linear) + len(norms)
        shipped = list(range(owned)) + (list(range(owned, len(ids))) if rank == 0 else [])
        self.layout = ReducerLayout(component_ids=tuple(ids), shipped=tuple(shipped))

    @property
    def num_columns(self) -> int:
        return len(self.layout.component_ids)

    @property
    def product_flops(self) -> int:
        """Multiply-adds x 2 of the products, per token, counted from the weights they run
        (``sidecar.spec.cost`` predicts it from the plan, without torch)."""
        return 2 * (self.weight.numel() + self.factors.numel())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A no-op when x already has the model's dtype, the case the taps see.
        x = x.to(self.weight.dtype)
        if self.weight.shape[1]:
            # A view: the columns no component reads stay unread.
            y = self._product(x[:, self.lo : self.hi] if self.narrow else x, self.weight)
        parts = []
        if self.n_linear:
            parts.append(y[:, : self.n_linear] + self.bias)
        if self.norms_joined:
            end = self.n_linear + self.n_norms * self.norm_width
            factored = y[:, self.n_linear : end].unflatten(1, (self.n_norms, self.norm_width))
            parts.append(factored.square().sum(dim=-1).sqrt())
        elif self.n_norms:
            z = x.view(x.shape[0], -1, self.d_head).index_select(1, self.head_index)
            factored = self._product(z.transpose(0, 1), self.factors)  # [heads, T, r]
            parts.append(factored.square().sum(dim=-1).sqrt().t())
        if self.partial_bias.shape[0]:
            partial = self.all_reduce(y[:, -self.partial_bias.shape[0] :].contiguous())
            parts.append(partial + self.partial_bias)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _product(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x @ weight in float32 (``bmm`` for a batch of heads), accumulated in float32."""
        product = torch.mm if x.dim() == 2 else torch.bmm
        if self.float32_out:
            return product(x, weight, out_dtype=torch.float32)
        return product(x, weight).to(torch.float32)


def float32_products(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch.mm`` and ``torch.bmm`` with ``out_dtype=float32`` run for ``dtype``
    inputs on ``device``.

    Checked once at build time, outside any traced code.
    """
    if dtype == torch.float32:
        return False
    try:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        single = torch.mm(a, a, out_dtype=torch.float32)
        batched = torch.bmm(a[None], a[None], out_dtype=torch.float32)
        return single.dtype == batched.dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _head_span(local: int, shard: SiteShard) -> tuple[int, int]:
    return local * shard.d_head, (local + 1) * shard.d_head


def _head_row(component: Component, local: int, shard: SiteShard) -> torch.Tensor:
    """W_O_h^T u placed at head ``local``'s columns: z . row = (z_h W_O_h^T) . u."""
    assert shard.o_proj_weight is not None and component.direction is not None
    lo, hi = _head_span(local, shard)
    row = torch.zeros(shard.width, dtype=torch.float64)
    u = _direction(component).to(torch.float64)
    row[lo:hi] = shard.o_proj_weight[:, lo:hi].to(torch.float64).t() @ u
    return row


def _norm_factor(local: int, shard: SiteShard) -> torch.Tensor:
    """[r, d_head] float64: R_h of W_O_h = Q_h R_h, so that ||z_h W_O_h^T|| = ||z_h R_h^T||.
    r = d_head (d_model when that is smaller)."""
    assert shard.o_proj_weight is not None
    lo, hi = _head_span(local, shard)
    return torch.linalg.qr(shard.o_proj_weight[:, lo:hi].to(torch.float64), mode="r").R


def _placed(factor: torch.Tensor, local: int, shard: SiteShard) -> torch.Tensor:
    """[r, width]: ``factor`` at head ``local``'s columns, zero elsewhere."""
    lo, hi = _head_span(local, shard)
    rows = torch.zeros(factor.shape[0], shard.width, dtype=torch.float64)
    rows[:, lo:hi] = factor
    return rows


def _direction(component: Component) -> torch.Tensor:
    """The spec's direction (float32 numpy, so the torch-free sidecar can load specs) as a
    tensor, sharing its memory: built into the reducer's buffers once, never per token."""
    assert component.direction is not None
    return torch.from_numpy(component.direction)


def _biases(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)

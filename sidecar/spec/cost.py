"""What a spec's taps cost inside the model's forward, estimated from the spec and the model.

The probe's in-graph work cannot be timed per step without a device sync, so it is
estimated once, at start, against the model it rides on:

FLOPs per token (the physical limit of a probe): exactly what ``sidecar.probe.graph.reduce``
runs, because both take the shape of each site's products from ``product_plan`` here: one
product over the span of columns the site's components read, plus a batched product for
heads read by norm when they are too far apart to join it (``NORM_WASTE``). A direction over
a site of width w costs 2·w; a head with a direction 2·d_head (folded into one column at
load time) when alone, more when the product spans other heads; a head read by norm
2·d_head·r (its triangular factor, r = d_head). A residual-stream site adds d_model for the
sum of vLLM's hidden and residual tensors. The model costs about 2·N, N its parameters
without the input embedding table (a lookup, not a product; with tied embeddings the same
table is also the output projection, which is a product); attention over the context is
left out.

Kernels per forward (what costs time on small batches, where launches rather than FLOPs
dominate): ``KERNELS_PER_SITE`` for each tapped site (its product, the bias and the store
into the shared buffer), ``KERNELS_PER_NORM_SITE`` more where heads read by norm get their
own product, one per residual-stream site for the sum, and one for the position tap. An
estimate from the structure of the reducer; the compiler may fuse some of them
(``python -m benchmarks.tap_kernels`` counts what it launches).

Plain arithmetic on the spec and the model's config (no torch): the sidecar, the probe and
the benchmarks share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.spec.identity import ModelShape, shape_from_config
from sidecar.spec.schema import CircuitSpec, ComponentKind
from sidecar.spec.sites import Site, SiteKind

KERNELS_PER_SITE = 3
KERNELS_PER_NORM_SITE = 3  # select the heads, their batched product, the root of the squares
_RESID_SUMMED = (SiteKind.RESID_POST, SiteKind.RESID_PRE)

# How many times their own multiply-adds head norms may cost inside a site's one product
# before they get a batched product of their own (one kernel more, see the module docstring).
# 1: no wasted arithmetic, which is what counts on a CPU; where kernel launches cost more
# than arithmetic (a GPU at small batches) 2 or more would trade FLOPs for a launch.
NORM_WASTE = 1

Span = tuple[int, int]


@dataclass(frozen=True)
class ProductPlan:
    """The products that read one site's components out (on one rank): the columns
    ``lo:hi`` of the site times ``columns`` weight columns, and, unless the norms joined
    that product, a batched product per head read by norm, [d_head] x [d_head, norm_width]."""

    lo: int
    hi: int
    columns: int
    norms_joined: bool
    batched_norms: int
    d_head: int
    norm_width: int

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of the products, per token."""
        own = self.batched_norms * self.d_head * self.norm_width
        return 2 * ((self.hi - self.lo) * self.columns + own)


def product_plan(
    others: list[Span], norm_heads: list[Span], d_head: int, d_model: int
) -> ProductPlan:
    """How to read a site out: ``others`` the column spans of its one-column components
    (directions, heads with a direction), ``norm_heads`` the spans of its heads read by norm.

    The norms join the one product when its span costs them at most ``NORM_WASTE`` times
    their own multiply-adds; each then adds ``norm_width`` columns (its factor's rows).
    """
    norm_width = min(d_head, d_model)
    joined = _span(others + norm_heads)
    norms_joined = bool(norm_heads) and joined[1] - joined[0] <= NORM_WASTE * d_head
    lo, hi = joined if norms_joined else _span(others)
    columns = len(others) + (len(norm_heads) * norm_width if norms_joined else 0)
    batched = 0 if norms_joined else len(norm_heads)
    return ProductPlan(lo, hi, columns, norms_joined, batched, d_head, norm_width)


@dataclass(frozen=True)
class GraphCost:
    """A spec's in-graph cost on one model: FLOPs per token of both, and kernels added."""

    probe_flops_per_token: float
    model_flops_per_token: float
    kernels: int  # launched per forward, all sites together (an estimate, see the docstring)

    @property
    def share(self) -> float:
        """The probe's FLOPs as a share of the model's: the floor of what it costs in time."""
        return self.probe_flops_per_token / self.model_flops_per_token


def graph_cost(spec: CircuitSpec, config: dict) -> GraphCost:
    """The cost of ``spec``'s taps on the model of ``config`` (a config.json dictionary)."""
    shape = shape_from_config(config)
    kernels = 1  # the position tap
    for site in spec.sites:
        kernels += KERNELS_PER_SITE + (site.kind in _RESID_SUMMED)
        if _site_plan(spec, site, shape).batched_norms:
            kernels += KERNELS_PER_NORM_SITE
    return GraphCost(probe_flops_per_token(spec, shape), model_flops_per_token(config), kernels)


def probe_flops_per_token(spec: CircuitSpec, shape: ModelShape) -> float:
    """FLOPs per token of the spec's products on one rank holding the whole model, and of
    the residual-stream sums (see the module docstring)."""
    flops = sum(_site_plan(spec, site, shape).flops for site in spec.sites)
    return float(flops + sum(shape.d_model for s in spec.sites if s.kind in _RESID_SUMMED))


def _site_plan(spec: CircuitSpec, site: Site, shape: ModelShape) -> ProductPlan:
    others: list[Span] = []
    norm_heads: list[Span] = []
    for component in spec.components:
        if component.site != site:
            continue
        if component.kind is ComponentKind.HEAD:
            span = (component.head * shape.d_head, (component.head + 1) * shape.d_head)
            (norm_heads if component.direction is None else others).append(span)
        else:
            others.append((0, shape.width(site)))
    return product_plan(others, norm_heads, shape.d_head, shape.d_model)


def model_flops_per_token(config: dict) -> float:
    """About 2·N: N the Llama's parameters, less the input embedding table unless tied."""
    parameters = sum(math.prod(s) for s in llama_weight_shapes(config).values())
    tied = bool(config.get("tie_word_embeddings", False))
    lookup = 0 if tied else config["vocab_size"] * config["hidden_size"]
    return 2.0 * (parameters - lookup)


def llama_weight_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face Llama tensor names and shapes for ``config``."""
    d, v = config["hidden_size"], config["vocab_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    dh = config.get("head_dim") or d // heads
    mlp = config["intermediate_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (heads * dh, d),
            p + "self_attn.k_proj.weight": (kv * dh, d),
            p + "self_attn.v_proj.weight": (kv * dh, d),
            p + "self_attn.o_proj.weight": (d, heads * dh),
            p + "mlp.gate_proj.weight": (mlp, d),
            p + "mlp.up_proj.weight": (mlp, d),
            p + "mlp.down_proj.weight": (d, mlp),
            p + "input_layernorm.weight": (d,),
            p + "post_attention_layernorm.weight": (d,),
        }
    shapes["model.norm.weight"] = (d,)
    if not config.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _span(spans: list[Span]) -> Span:
    """The columns from the first to the last of ``spans``; (0, 0) when there are none."""
    return min((lo for lo, _ in spans), default=0), max((hi for _, hi in spans), default=0)

"""What a spec's taps cost inside the model's forward, estimated from the spec and the model.

The probe's in-graph work cannot be timed per step without a device sync, so it is
estimated once, at start, against the model it rides on:

FLOPs per token (the physical limit of a probe): a direction over a site of width w costs
2·w; a head read by norm 2·d_head² + 2·d_head (z_h·G_h with its Gram matrix
G_h = W_O_hᵀW_O_h, then the dot product with z_h: the squared norm of its contribution); a
head with a direction 2·d_head (folded into one row at load time); a residual-stream site
adds d_model for the sum of vLLM's hidden and residual tensors. The model costs about 2·N,
N its parameters without the input embedding table (a lookup, not a product; with tied
embeddings the same table is also the output projection, which is a product); attention
over the context is left out.

Kernels per forward (what costs time on small batches, where launches rather than FLOPs
dominate): ``KERNELS_PER_SITE`` for each tapped site (its product, the cast to float32
and the store into its buffer), ``KERNELS_PER_NORM_SITE`` more where heads are read by
norm, one per residual-stream site for the sum, and one for the position tap. An estimate
from the structure of ``sidecar.probe.graph.reduce``; the compiler may fuse some of them.

Plain arithmetic on the spec and the model's config (no torch): the sidecar, the probe and
the benchmarks share it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sidecar.spec.identity import ModelShape, shape_from_config
from sidecar.spec.schema import CircuitSpec, ComponentKind
from sidecar.spec.sites import SiteKind

KERNELS_PER_SITE = 3
KERNELS_PER_NORM_SITE = 5  # select the heads, the Gram product, multiply, sum, square root
_RESID_SUMMED = (SiteKind.RESID_POST, SiteKind.RESID_PRE)


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
        if any(_by_norm(c) for c in spec.components if c.site == site):
            kernels += KERNELS_PER_NORM_SITE
    return GraphCost(probe_flops_per_token(spec, shape), model_flops_per_token(config), kernels)


def probe_flops_per_token(spec: CircuitSpec, shape: ModelShape) -> float:
    """FLOPs per token the spec's components need (the formulas in the module docstring)."""
    flops = 0.0
    for component in spec.components:
        if _by_norm(component):
            flops += 2 * shape.d_head * shape.d_head + 2 * shape.d_head
        elif component.kind is ComponentKind.HEAD:
            flops += 2 * shape.d_head
        else:
            flops += 2 * shape.width(component.site)
    flops += sum(shape.d_model for s in spec.sites if s.kind in _RESID_SUMMED)
    return flops


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


def _by_norm(component) -> bool:
    return component.kind is ComponentKind.HEAD and component.direction is None

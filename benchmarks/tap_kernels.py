"""Kernels and FLOPs the taps add per forward, counted in the code Inductor generates for them.

    python -m benchmarks.tap_kernels                       # SmolLM2, bfloat16 and float32
    python -m benchmarks.tap_kernels --model reference --dtype float32
    PYTHONPATH=OTHER_CHECKOUT python benchmarks/tap_kernels.py   # another checkout's taps

For each site of the overhead benchmark's every-layer spec on one layer (every layer is
alike: heads by norm on attn.hook_z, directions on hook_resid_post and mlp.hook_post), one
tap's work is compiled with Inductor as vLLM compiles the model (token count dynamic): the
extractor's sum for residual sites, the site's ``SiteReducer`` and the write of its values
into the tap's buffer. Counted in the generated code: extern kernels (matrix products, each a
library call) and generated kernels (Inductor's fused loops), per layer and for the whole
model; FLOPs per token are the reducer's own count where it has one (``product_flops``).
Drain copies per step: one per tap plus the positions before the shared buffer, two after.

Only ``SiteReducer``'s arguments common to every version are used (``dtype`` when it has
one), so the same file counts an earlier checkout's taps.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch._inductor.utils import run_and_get_code

from sidecar.models.registry import resolve_model
from sidecar.probe.graph.adapters import CheckpointWeights
from sidecar.probe.graph.reduce import SiteReducer, SiteShard
from sidecar.spec.identity import read_model_shape
from sidecar.spec.schema import Component, ComponentKind
from sidecar.spec.sites import Site, SiteKind

HEADS_PER_LAYER, RESID_DIRECTIONS, MLP_DIRECTIONS = 2, 8, 4  # as benchmarks/_models.py
TOKENS = 16
SITES = ("attn.hook_z", "hook_resid_post", "mlp.hook_post")
# Kernel launches in the ``call`` function of Inductor's CPU output code.
_EXTERN = re.compile(r"^\s+(?:buf\w+ = )?(?:extern_kernels|torch\.ops|aten)\.[\w.]+\(", re.M)
_GENERATED = re.compile(r"^\s+(?:cpp_fused|kernel)\w*\(", re.M)


@dataclass(frozen=True)
class SiteCount:
    site: str
    extern: int
    generated: int
    flops: int | None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tap_kernels")
    parser.add_argument("--model", default="smollm2", help="reference, smollm2 or a directory")
    parser.add_argument("--dtype", choices=("bfloat16", "float32", "both"), default="both")
    parser.add_argument("--layer", type=int, default=1)
    parser.add_argument(
        "--heads", type=int, default=HEADS_PER_LAYER, help="heads read by norm on hook_z"
    )
    args = parser.parse_args(argv)
    model_dir = resolve_model(args.model)
    shape = read_model_shape(model_dir)
    checkpoint = CheckpointWeights(model_dir)
    w_o = checkpoint.get(f"model.layers.{args.layer}.self_attn.o_proj.weight").float()
    dtypes = ("bfloat16", "float32") if args.dtype == "both" else (args.dtype,)
    print(f"{Path(model_dir).name}: {shape.n_layers} layers; reduce.py from {_origin()}")
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        counts = [_count(site, shape, w_o, dtype, args.layer, args.heads) for site in SITES]
        extern = sum(c.extern for c in counts)
        generated = sum(c.generated for c in counts)
        for c in counts:
            flops = "" if c.flops is None else f", {c.flops:,} FLOPs/token"
            print(f"  {dtype_name} {c.site}: {c.extern} extern + {c.generated} generated{flops}")
        print(
            f"  {dtype_name} per layer: {extern} extern + {generated} generated kernels; "
            f"model: {extern * shape.n_layers} + {generated * shape.n_layers}; drain copies per "
            f"step: {len(SITES) * shape.n_layers + 1} before the shared buffer, 2 after"
        )
    return 0


def _count(
    kind: str, shape, w_o: torch.Tensor, dtype: torch.dtype, layer: int, heads: int
) -> SiteCount:
    site = Site.parse(f"blocks.{layer}.{kind}")
    width = shape.width(site)
    generator = torch.Generator().manual_seed(0)
    components = []
    if site.kind is SiteKind.ATTN_Z:
        components = [
            Component(f"h{h}", ComponentKind.HEAD, site, h, None, 0.0) for h in range(heads)
        ]
        shard = SiteShard(width, slice(0, width), False, range(shape.n_heads), shape.d_head, w_o)
    else:
        n = RESID_DIRECTIONS if site.kind is SiteKind.RESID_POST else MLP_DIRECTIONS
        for i in range(n):
            u = torch.randn(width, generator=generator)
            components.append(
                Component(f"d{i}", ComponentKind.DIRECTION, site, None, (u / u.norm()).numpy(), 0.0)
            )
        shard = SiteShard(width, slice(0, width), site.kind is SiteKind.RESID_POST)
    reducer = _reducer(list(enumerate(components)), shard, dtype)
    k = reducer.num_columns
    new_layout = "dtype" in inspect.signature(SiteReducer).parameters
    buffer = torch.zeros(4 * TOKENS, k + (3 if new_layout else 0))
    columns = slice(3, 3 + k) if new_layout else slice(0, k)
    residual = site.kind is SiteKind.RESID_POST

    def tap(x: torch.Tensor, r: torch.Tensor) -> None:
        if residual:
            x = x + r
        buffer[: x.shape[0], columns].copy_(reducer(x))

    compiled = torch.compile(tap, dynamic=True, fullgraph=True)
    x = torch.randn(TOKENS, width, generator=generator).to(dtype)
    _, codes = run_and_get_code(compiled, x, x.clone())
    code = "\n".join(codes)
    body = code[code.index("def call(") :]
    flops = getattr(reducer, "product_flops", None)
    return SiteCount(kind, len(_EXTERN.findall(body)), len(_GENERATED.findall(body)), flops)


def _reducer(components, shard: SiteShard, dtype: torch.dtype) -> SiteReducer:
    parameters = inspect.signature(SiteReducer).parameters
    if "dtype" not in parameters:
        return SiteReducer(components, shard)
    from sidecar.probe.graph.reduce import float32_products

    return SiteReducer(
        components, shard, dtype=dtype, float32_out=float32_products(dtype, torch.device("cpu"))
    )


def _origin() -> str:
    return str(Path(inspect.getfile(SiteReducer)).parents[3])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""What computing the taps' products in bfloat16 costs in precision, against float64.

    python -m benchmarks.reduce_precision            # SmolLM2 (installed), bfloat16

SmolLM2 runs in bfloat16 (transformers) on a few prompts; every site of two specs is
captured (the overhead benchmark's every-layer spec, random directions, 2 heads by norm per
layer; and the discovered spec, sidecar/models/smollm2_spec, heads alone or several to a
layer). Each component's value is then computed from the same bfloat16 activations three
ways: in float64 (the offline scorer's ``component_value``: the truth), by a float32
``SiteReducer`` (float32 products, the arithmetic before bfloat16 products) and by a
bfloat16 one (the model's dtype: what a bfloat16 engine runs now). Reported per component
kind: the error against float64 over each component's scale (the standard deviation of its
true values over the tokens, the live tests' yardstick), median and max over components of
their max over tokens. The bfloat16 activations themselves (vs a float32 model) are not
part of it: that is what the live test's bfloat16 tolerance covers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from benchmarks._models import every_layer_spec, smollm2_model
from sidecar.discover.capture import capture
from sidecar.discover.scorer import component_value
from sidecar.models.registry import SMOLLM2_SPEC
from sidecar.probe.graph.adapters import CheckpointWeights
from sidecar.probe.graph.reduce import SiteReducer, SiteShard, float32_products
from sidecar.spec.load import load_spec
from sidecar.spec.schema import ComponentKind
from sidecar.spec.sites import SiteKind

PROMPTS = (
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Repeat this text exactly: amber basil cedar delta ember amber basil cedar delta ember",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
)


def main(argv: list[str]) -> int:
    model = smollm2_model()
    hf = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.bfloat16).eval()
    tokenizer = AutoTokenizer.from_pretrained(model.path)
    ids = torch.tensor([t for p in PROMPTS for t in tokenizer(p)["input_ids"]])
    checkpoint = CheckpointWeights(model.path)
    float32_out = float32_products(torch.bfloat16, torch.device("cpu"))
    print(f"SmolLM2 in bfloat16, {ids.numel()} tokens; float32 product output: {float32_out}")
    with tempfile.TemporaryDirectory() as tmp:
        specs = {
            "every-layer": load_spec(every_layer_spec(model, Path(tmp))),
            "discovered": load_spec(SMOLLM2_SPEC),
        }
        for name, spec in specs.items():
            with torch.no_grad():
                captures = capture(hf, ids, spec.sites)
            errors: dict[tuple[str, str], list[float]] = {}
            for site in spec.sites:
                x = captures[site]  # bfloat16 values, held in float32
                components = [(i, c) for i, c in enumerate(spec.components) if c.site == site]
                # W_O as the engine reads it: from the float32 checkpoint.
                w_o = checkpoint.get(f"model.layers.{site.layer}.self_attn.o_proj.weight").float()
                shard = _shard(site.kind, x.shape[-1], w_o, model.shape.d_head)
                exact = x.double()
                truths = {
                    i: component_value(c, exact, w_o.double(), model.shape.d_head)
                    for i, c in components
                }
                for label, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
                    reducer = SiteReducer(components, shard, dtype=dtype, float32_out=float32_out)
                    with torch.no_grad():
                        values = reducer(x.to(dtype)).double()
                    for column, i in enumerate(reducer.layout.component_ids):
                        component = spec.components[i]
                        truth = truths[i]
                        scale = max(float(truth.std()), 1e-6)
                        error = float((values[:, column] - truth).abs().max()) / scale
                        errors.setdefault((_kind(component), label), []).append(error)
            print(f"  {name} spec: max |value - float64| / scale, median and max over components")
            for (kind, label), values in sorted(errors.items()):
                print(
                    f"    {kind:<18} {label:<9} median {np.median(values):.2e}  "
                    f"max {np.max(values):.2e}  ({len(values)} components)"
                )
    return 0


def _shard(kind: SiteKind, width: int, w_o: torch.Tensor, d_head: int) -> SiteShard:
    if kind is SiteKind.ATTN_Z:
        return SiteShard(width, slice(0, width), False, range(width // d_head), d_head, w_o)
    return SiteShard(width, slice(0, width), kind is not SiteKind.MLP_POST)


def _kind(component) -> str:
    if component.kind is ComponentKind.HEAD:
        return "head norm" if component.direction is None else "head direction"
    return f"direction {component.site.kind.value}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

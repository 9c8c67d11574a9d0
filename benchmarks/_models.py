"""Models and circuit specs for the overhead benchmark, and what they cost in FLOPs per token.

Models:
    reference   the bundled reference model (sidecar/models/reference), or, until it exists,
                a random stand-in of its shape (2 layers, d_model 256, 4 heads of 64)
    smollm2     the installed real model, SmolLM2-135M-Instruct (``circuitwatch models install
                smollm2``); the engine runs it in its default dtype (bfloat16 on CPU)
    dummy       a random Llama, ``cpu`` size (12 layers, d_model 1024, 16 heads of 64,
                bfloat16) or ``8b`` (Llama-3-8B's shape, for GPUs): config.json only,
                loaded with vLLM's ``load_format="dummy"``, or with random weights on disk
                where the engine needs them (the CPU build, see ``dummy_model``)

Specs, both generated for the model at hand (``model_hash`` of its directory):
    typical     what a deployment watches: 2 heads by norm on a middle layer, 2 directions
                on a later residual stream, 1 MLP-neuron direction; 3 circuits. The
                reference model's own spec is used instead when it ships one. SmolLM2's:
                the induction heads of its discovered spec (sidecar/models/smollm2_spec;
                until it exists, those a prefix-matching scan finds) by norm, plus one
                hook_resid_post direction; 2 circuits.
    every_layer the heavy case: on every layer, ``HEADS_PER_LAYER`` heads by norm,
                ``RESID_DIRECTIONS`` directions on hook_resid_post, ``MLP_DIRECTIONS`` on
                mlp.hook_post; 4 circuits.

FLOPs per token, of the probe and of the model: ``sidecar.spec.cost`` (shared with the probe,
which estimates its in-graph cost at start).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from sidecar.models.registry import REFERENCE_DIR, SMOLLM2_SPEC, model_path
from sidecar.spec.cost import llama_weight_shapes, probe_flops_per_token
from sidecar.spec.identity import ModelShape, model_hash, read_model_shape
from sidecar.spec.load import load_spec
from sidecar.spec.schema import ComponentKind
from sidecar.spec.sites import Site

HEADS_PER_LAYER = 2
RESID_DIRECTIONS = 8
MLP_DIRECTIONS = 4
# SmolLM2's strongest induction heads (layer, head) by prefix-matching score on repeated
# random tokens (0.92, 0.78, 0.77, 0.66): used until its discovered spec exists.
SMOLLM2_HEADS = ((18, 6), (17, 3), (17, 4), (18, 7))

DUMMY_SIZES = {
    "cpu": dict(
        hidden_size=1024,
        num_hidden_layers=12,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=64,
        intermediate_size=2816,
        vocab_size=32000,
    ),
    "8b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=14336,
        vocab_size=128256,
    ),
}
_STAND_IN = dict(
    hidden_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=64,
    intermediate_size=768,
    vocab_size=2048,
)


@dataclass(frozen=True)
class BenchModel:
    name: str  # "reference" | "smollm2" | "dummy-cpu" | "dummy-8b"
    path: Path
    dummy_weights: bool  # load with load_format="dummy"
    description: str
    shape: ModelShape
    vocab_size: int
    parameters: int
    bundled_spec: Path | None = None  # the reference model's own spec, when it ships one
    tied_embeddings: bool = False  # the embedding table is also the output projection

    @property
    def flops_per_token(self) -> float:
        lookup = 0 if self.tied_embeddings else self.vocab_size * self.shape.d_model
        return 2.0 * (self.parameters - lookup)


def reference_model(work: Path) -> BenchModel:
    """The bundled reference model, or a random stand-in of its shape written under ``work``."""
    if (REFERENCE_DIR / "config.json").is_file():
        return _describe("reference", REFERENCE_DIR, False, "bundled reference model")
    path = work / "reference-stand-in"
    _write_model(path, _STAND_IN, "float32", weights=True)
    return _describe("reference", path, False, "random stand-in of the reference model's shape")


def smollm2_model() -> BenchModel:
    """The installed SmolLM2-135M-Instruct checkpoint (ModelNotInstalled says how to get it)."""
    return _describe("smollm2", model_path("smollm2"), False, "SmolLM2-135M-Instruct")


def dummy_model(work: Path, size: str, weights: bool) -> BenchModel:
    """A random Llama of ``DUMMY_SIZES[size]``.

    Without ``weights`` the folder holds config.json only and vLLM fills in random weights
    (``load_format="dummy"``). The CPU build needs them on disk: it drops ``o_proj.weight``
    after packing it for oneDNN, so the probe reads W_O (for heads by norm) from the
    checkpoint.
    """
    path = work / f"dummy-{size}"
    _write_model(path, DUMMY_SIZES[size], "bfloat16", weights=weights)
    how = "random weights on disk" if weights else "config.json only, vLLM dummy weights"
    return _describe(f"dummy-{size}", path, not weights, f"random Llama ({how})")


def _write_model(path: Path, sizes: dict, dtype: str, weights: bool) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = _llama_config(sizes, dtype)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    if not weights:
        return
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, shape in llama_weight_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = 0.05 * torch.randn(shape, generator=generator)
        tensors[name] = tensor.to(getattr(torch, dtype))
    save_file(tensors, str(path / "model.safetensors"))


def _describe(name: str, path: Path, dummy: bool, description: str) -> BenchModel:
    config = json.loads((path / "config.json").read_text())
    bundled = sorted(p for p in path.glob("*.yaml") if _spec_is_for(p, path)) if not dummy else []
    return BenchModel(
        name=name,
        path=path,
        dummy_weights=dummy,
        description=description,
        shape=read_model_shape(path),
        vocab_size=int(config["vocab_size"]),
        parameters=sum(math.prod(s) for s in llama_weight_shapes(config).values()),
        bundled_spec=bundled[0] if bundled else None,
        tied_embeddings=bool(config.get("tie_word_embeddings", False)),
    )


def _spec_is_for(spec_path: Path, model_dir: Path) -> bool:
    try:
        load_spec(spec_path, model_dir=model_dir)
    except (ValueError, OSError):
        return False
    return True


def _llama_config(sizes: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        **sizes,
    }


def typical_spec(model: BenchModel, folder: Path) -> Path:
    """The model's bundled spec, or a small generated one (see the module docstring)."""
    if model.bundled_spec is not None:
        return model.bundled_spec
    if model.name == "smollm2":
        return _smollm2_typical_spec(model, folder)
    n = model.shape.n_layers
    middle, late = n // 2, max(0, (2 * n) // 3)
    heads = [(f"l{middle}h{h}", middle, h) for h in range(min(2, model.shape.n_heads))]
    components = [
        {"name": name, "kind": "head", "site": f"blocks.{layer}.attn.hook_z", "head": head}
        for name, layer, head in heads
    ]
    components += [
        _direction(f"resid{late}_{i}", f"blocks.{late}.hook_resid_post") for i in range(2)
    ]
    components.append(_direction(f"mlp{late}_0", f"blocks.{late}.mlp.hook_post"))
    names = [c["name"] for c in components]
    circuits = [
        {"name": "heads", "components": {n: 1.0 for n in names[:2]}, "threshold": 1.0},
        {"name": "probe", "components": {names[2]: 1.0, names[3]: -0.5}},
        {"name": "mixed", "components": {names[0]: 0.5, names[4]: 0.5}},
    ]
    return _write_spec(model, folder / "typical", components, circuits)


def _smollm2_typical_spec(model: BenchModel, folder: Path) -> Path:
    heads = smollm2_heads()
    components = [
        {"name": f"l{layer}h{head}", "kind": "head", "site": f"blocks.{layer}.attn.hook_z",
         "head": head}
        for layer, head in heads
    ]  # fmt: skip
    late = (2 * model.shape.n_layers) // 3
    components.append(_direction(f"resid{late}_0", f"blocks.{late}.hook_resid_post"))
    names = [c["name"] for c in components]
    circuits = [
        {"name": "induction", "components": {n: 1.0 / len(heads) for n in names[:-1]}},
        {"name": "probe", "components": {names[-1]: 1.0}},
    ]
    return _write_spec(model, folder / "typical", components, circuits)


def smollm2_heads() -> tuple[tuple[int, int], ...]:
    """(layer, head) of the heads read by norm in SmolLM2's discovered spec, else SMOLLM2_HEADS."""
    if not SMOLLM2_SPEC.is_file():
        return SMOLLM2_HEADS
    components = load_spec(SMOLLM2_SPEC).components
    heads = tuple(
        (c.site.layer, c.head)
        for c in components
        if c.kind is ComponentKind.HEAD and c.direction is None
    )
    return heads or SMOLLM2_HEADS


def every_layer_spec(model: BenchModel, folder: Path) -> Path:
    """Heads by norm, residual and MLP directions on every layer (see the module docstring)."""
    components = []
    groups: dict[str, list[str]] = {"heads": [], "resid": [], "mlp": []}
    for layer in range(model.shape.n_layers):
        for head in range(min(HEADS_PER_LAYER, model.shape.n_heads)):
            name = f"l{layer}h{head}"
            components.append(
                {"name": name, "kind": "head", "site": f"blocks.{layer}.attn.hook_z", "head": head}
            )
            groups["heads"].append(name)
        for i in range(RESID_DIRECTIONS):
            site = f"blocks.{layer}.hook_resid_post"
            components.append(_direction(f"resid{layer}_{i}", site))
            groups["resid"].append(components[-1]["name"])
        for i in range(MLP_DIRECTIONS):
            site = f"blocks.{layer}.mlp.hook_post"
            components.append(_direction(f"mlp{layer}_{i}", site))
            groups["mlp"].append(components[-1]["name"])
    circuits = [
        {"name": group, "components": {n: 1.0 / len(names) for n in names}}
        for group, names in groups.items()
    ]
    everything = [n for names in groups.values() for n in names]
    circuits.append({"name": "all", "components": {n: 1.0 for n in everything}, "threshold": 0.0})
    return _write_spec(model, folder / "every_layer", components, circuits)


def _direction(name: str, site: str) -> dict:
    """A direction component; ``_write_spec`` draws its random unit vector."""
    return {"name": name, "kind": "direction", "site": site, "direction": "random", "bias": 0.0}


def _write_spec(model: BenchModel, folder: Path, components: list, circuits: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    tensors = {}
    for component in components:
        if component.get("direction") == "random":
            width = model.shape.width(Site.parse(component["site"]))
            vector = torch.randn(width, generator=generator)
            tensors[component["name"]] = vector / vector.norm()
            component["direction"] = {"file": "directions.safetensors", "tensor": component["name"]}
    if tensors:
        save_file(tensors, str(folder / "directions.safetensors"))
    doc = {
        "version": 1,
        "model": {"name": model.name, "hash": model_hash(model.path)},
        "components": components,
        "circuits": circuits,
    }
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    load_spec(path, model_dir=model.path)  # fail here, not inside the engine
    return path


@dataclass(frozen=True)
class ProbeCost:
    components: int
    sites: int
    flops_per_token: float


def probe_cost(spec_path: Path, shape: ModelShape) -> ProbeCost:
    """FLOPs per token the spec's components need (``sidecar.spec.cost``)."""
    spec = load_spec(spec_path)
    return ProbeCost(len(spec.components), len(spec.sites), probe_flops_per_token(spec, shape))

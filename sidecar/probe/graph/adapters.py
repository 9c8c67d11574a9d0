"""Where each TransformerLens site lives in vLLM's Llama-family modules, per tensor-parallel rank.

vLLM's Llama decoder layer (vllm/model_executor/models/llama.py; Mistral and Qwen2 share the
layout) returns ``(hidden, residual)``: ``hidden`` is the MLP output and ``residual`` the
stream after attention, so the stream leaving the layer is their sum. The next layer's
fused add-RMSNorm overwrites both in place, so a tap computes from them at once and keeps
nothing. Sites, as hooks:

    blocks.L.hook_resid_pre   pre-hook on layers[L]: hidden (+ residual when not None)
    blocks.L.hook_resid_mid   hook on layers[L]: residual (output[1])
    blocks.L.hook_resid_post  hook on layers[L]: hidden + residual
    blocks.L.attn.hook_z      pre-hook on layers[L].self_attn.o_proj: its input
    blocks.L.mlp.hook_post    pre-hook on layers[L].mlp.down_proj: its input, act(gate) * up

Under tensor parallelism o_proj and down_proj are row-parallel: each rank holds a contiguous
slice of their input (its heads, its neurons) and the matching columns of the weight. The
residual stream is replicated on every rank.

Head components need W_O. vLLM may repack or drop a layer's weight after loading (the CPU
build moves it into a oneDNN handle and leaves an empty tensor; quantized models transform
it), so W_O is read from the model's safetensors checkpoint by its Hugging Face name, and
from the live module only when there is no local checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from sidecar.probe.graph.reduce import SiteShard
from sidecar.spec.sites import Site, SiteKind

# Extracts a site's activation from a hook's (args, kwargs, output); output is None for
# pre-hooks. Each is pure tensor ops: it runs inside the compiled graph.
Extractor = Callable[[tuple, dict, Any], torch.Tensor]


class UnsupportedModel(ValueError):
    """The served model's module tree is not one this adapter can map sites onto."""


@dataclass(frozen=True)
class SiteHook:
    """How to read one site: the module to hook, before or after its forward, and the shard."""

    site: Site
    module: nn.Module
    pre: bool
    extract: Extractor
    shard: SiteShard


def _layer_input(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
    residual = args[2] if len(args) > 2 else kwargs.get("residual")
    return hidden if residual is None else hidden + residual


def _layer_residual(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return output[1]


def _layer_output(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return output[0] + output[1]


def _first_input(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def layer_positions(args: tuple, kwargs: dict, output: Any) -> torch.Tensor:
    """A decoder layer's first argument: the token positions of the whole batch."""
    return args[0] if args else kwargs["positions"]


class CheckpointWeights:
    """Reads tensors by Hugging Face name from the ``*.safetensors`` files of a model directory."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index = self.model_dir / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._files = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            self._files = {}
            for file in sorted(self.model_dir.glob("*.safetensors")):
                with safe_open(file, framework="pt") as tensors:
                    self._files.update(dict.fromkeys(tensors.keys(), file))

    def get(self, name: str) -> torch.Tensor | None:
        file = self._files.get(name)
        if file is None:
            return None
        with safe_open(file, framework="pt") as tensors:
            return tensors.get_tensor(name)


class LlamaAdapter:
    """Maps sites onto one rank's vLLM Llama-family model (``LlamaForCausalLM`` and kin)."""

    def __init__(self, model: nn.Module, checkpoint: CheckpointWeights | None = None):
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise UnsupportedModel(
                f"{type(model).__name__}: expected a Llama-family model with .model.layers"
            )
        for i, layer in enumerate(layers):
            for path in ("self_attn.o_proj", "mlp.down_proj"):
                if _get(layer, path) is None:
                    raise UnsupportedModel(
                        f"{type(model).__name__}: layers[{i}] has no {path}; pipeline "
                        "parallelism and non-Llama layouts are not supported"
                    )
        self.layers = layers
        self.checkpoint = checkpoint

    @property
    def first_layer(self) -> nn.Module:
        return self.layers[0]

    def hook(self, site: Site) -> SiteHook:
        """The hook for ``site`` on this rank; UnsupportedModel if the layer does not exist."""
        if site.layer >= len(self.layers):
            raise UnsupportedModel(
                f"site {site.name}: the model has {len(self.layers)} layers "
                f"(0..{len(self.layers) - 1})"
            )
        layer = self.layers[site.layer]
        d_model = layer.self_attn.o_proj.output_size_per_partition
        replicated = SiteShard(width=d_model, columns=slice(0, d_model), replicated=True)
        if site.kind is SiteKind.RESID_PRE:
            return SiteHook(site, layer, True, _layer_input, replicated)
        if site.kind is SiteKind.RESID_MID:
            return SiteHook(site, layer, False, _layer_residual, replicated)
        if site.kind is SiteKind.RESID_POST:
            return SiteHook(site, layer, False, _layer_output, replicated)
        if site.kind is SiteKind.ATTN_Z:
            o_proj = layer.self_attn.o_proj
            d_head = layer.self_attn.head_dim
            width = o_proj.input_size_per_partition
            local_heads = width // d_head
            first = o_proj.tp_rank * local_heads
            shard = SiteShard(
                width=width,
                columns=slice(first * d_head, (first + local_heads) * d_head),
                replicated=False,
                heads=range(first, first + local_heads),
                d_head=d_head,
                o_proj_weight=self._o_proj_weight(
                    site.layer, o_proj, d_model, width, first * d_head
                ),
            )
            return SiteHook(site, o_proj, True, _first_input, shard)
        down_proj = layer.mlp.down_proj
        width = down_proj.input_size_per_partition
        start = down_proj.tp_rank * width
        shard = SiteShard(width=width, columns=slice(start, start + width), replicated=False)
        return SiteHook(site, down_proj, True, _first_input, shard)

    def _o_proj_weight(
        self, layer: int, o_proj: nn.Module, d_model: int, width: int, start: int
    ) -> torch.Tensor:
        """This rank's columns of layer ``layer``'s W_O, [d_model, width]."""
        name = f"model.layers.{layer}.self_attn.o_proj.weight"
        if self.checkpoint is not None:
            full = self.checkpoint.get(name)
            if full is None:
                raise UnsupportedModel(f"{name} not found in {self.checkpoint.model_dir}")
            if not full.is_floating_point() or full.dim() != 2 or full.shape[0] != d_model:
                raise UnsupportedModel(
                    f"{name} in {self.checkpoint.model_dir} has shape {list(full.shape)} and "
                    f"dtype {full.dtype}: expected a float [{d_model}, n_heads * d_head] "
                    "(quantized checkpoints are not supported)"
                )
            return full[:, start : start + width].to(torch.float32)
        live = o_proj.weight
        if live.dim() != 2 or tuple(live.shape) != (d_model, width):
            raise UnsupportedModel(
                f"cannot read W_O of layer {layer}: no local checkpoint, and vLLM's o_proj "
                f"weight has shape {list(live.shape)}"
            )
        return live.detach().to(torch.float32).cpu()


def _get(module: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        module = getattr(module, name, None)
        if module is None:
            return None
    return module

"""Configuration 4 of the overhead benchmark: probes the way eager-only tools install them.

``install_naive_hooks`` runs inside vLLM's worker through ``LLM.apply_model`` once the model
is loaded (so the engine must run with ``enforce_eager=True``: hooks added after loading
never fire in a compiled graph). It hooks the sites of the every-layer spec and, on every
forward, copies each activation to host memory (``.cpu()``: on a GPU a device sync plus a
copy; on a CPU an explicit copy, since ``.cpu()`` there returns the same tensor), computes
the same read-outs there (heads by norm, random directions) and turns them into Python
floats (``.tolist()``) kept in a bounded deque. This is the pattern of nnsight-style
``.save()`` and of vLLM-Hook, not Circuitwatch's.

Importable on purpose: ``apply_model`` pickles the function by reference, which needs
``VLLM_ALLOW_INSECURE_SERIALIZATION=1`` and a module the worker can import.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from benchmarks._models import HEADS_PER_LAYER, MLP_DIRECTIONS, RESID_DIRECTIONS

KEPT_FORWARDS = 1024


def install_naive_hooks(model: nn.Module) -> int:
    """Hook every layer's hook_z, hook_resid_post and mlp.hook_post; returns the hook count."""
    kept: deque[list] = deque(maxlen=KEPT_FORWARDS * 3 * len(model.model.layers))
    generator = torch.Generator().manual_seed(0)
    handles = []
    for layer in model.model.layers:
        o_proj, down_proj = layer.self_attn.o_proj, layer.mlp.down_proj
        d_head = layer.self_attn.head_dim
        d_model, width = o_proj.output_size, o_proj.input_size_per_partition
        # Random maps of W_O's shape: the cost is the point, and vLLM's CPU build drops
        # o_proj.weight after packing it for oneDNN.
        w_o = torch.randn(d_model, width, generator=generator)
        heads = min(HEADS_PER_LAYER, width // d_head)
        head_maps = [w_o[:, h * d_head : (h + 1) * d_head].T.contiguous() for h in range(heads)]
        resid = torch.randn(d_model, RESID_DIRECTIONS, generator=generator)
        mlp = torch.randn(down_proj.input_size_per_partition, MLP_DIRECTIONS, generator=generator)
        handles.append(o_proj.register_forward_pre_hook(_on_z(kept, head_maps, d_head)))
        handles.append(layer.register_forward_hook(_on_resid_post(kept, resid)))
        handles.append(down_proj.register_forward_pre_hook(_on_input(kept, mlp)))
    model.circuitwatch_naive_kept = kept  # one reference keeps the hooks' output alive
    return len(handles)


def _to_host(x: torch.Tensor) -> torch.Tensor:
    return (x.detach().cpu() if x.is_cuda else x.detach().clone()).float()


def _on_z(kept: deque, head_maps: list[torch.Tensor], d_head: int):
    def hook(module: nn.Module, args: tuple) -> None:
        z = _to_host(args[0])
        kept.append(
            [
                (z[:, h * d_head : (h + 1) * d_head] @ w).norm(dim=-1).tolist()
                for h, w in enumerate(head_maps)
            ]
        )

    return hook


def _on_resid_post(kept: deque, directions: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: tuple) -> None:
        hidden, residual = output  # vLLM's Llama layer: the stream is their sum
        kept.append((_to_host(hidden + residual) @ directions).tolist())

    return hook


def _on_input(kept: deque, directions: torch.Tensor):
    def hook(module: nn.Module, args: tuple) -> None:
        kept.append((_to_host(args[0]) @ directions).tolist())

    return hook

"""Capture site activations from a Hugging Face Llama-family model, offline.

Site names map to HF modules the way vLLM's decoder layers compute them (see sites.py):

    blocks.L.attn.hook_z        input of  model.layers[L].self_attn.o_proj  (heads flattened)
    blocks.L.mlp.hook_post      input of  model.layers[L].mlp.down_proj     (act(gate) * up)
    blocks.L.hook_resid_post    output of model.layers[L]
    blocks.L.hook_resid_pre     resid_post of layer L-1; for L = 0 the output of embed_tokens
    blocks.L.hook_resid_mid     resid_pre of layer L + output of its o_proj

Hooks live only for one forward pass and write into a dict local to ``capture``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sidecar.discover.hooks import hooks
from sidecar.spec.sites import Site, SiteKind

# What a hook reads: (module role, layer); the embedding has layer -1.
_Tap = tuple[str, int]


@dataclass(frozen=True, eq=False)
class Captures:
    """Activations of one forward pass: each ``[*input_ids.shape, site width]``, float32."""

    activations: dict[Site, torch.Tensor]
    logits: torch.Tensor  # [*input_ids.shape, vocab]

    def __getitem__(self, site: Site) -> torch.Tensor:
        return self.activations[site]


def capture(model: nn.Module, input_ids: torch.Tensor, sites: tuple[Site, ...]) -> Captures:
    """Run ``model`` (an HF ``LlamaForCausalLM``) once on ``input_ids`` ([T] or [B, T])."""
    layers = model.model.layers
    for site in sites:
        if not 0 <= site.layer < len(layers):
            raise ValueError(f"site {site.name}: the model has {len(layers)} layers")
    taps = {tap for site in sites for tap in _taps_for(site)}
    seen: dict[_Tap, torch.Tensor] = {}

    def keep_input(tap: _Tap):
        def hook(_module, args):
            seen[tap] = args[0].detach().clone()

        return hook

    def keep_output(tap: _Tap):
        def hook(_module, _args, output):
            # Decoder layers return a tensor in recent transformers, a tuple in older ones.
            hidden = output[0] if isinstance(output, tuple) else output
            seen[tap] = hidden.detach().clone()

        return hook

    installed = []
    for role, layer in taps:
        if role == "embed":
            installed.append((model.model.embed_tokens, "post", keep_output((role, -1))))
        elif role == "layer_out":
            installed.append((layers[layer], "post", keep_output((role, layer))))
        elif role == "o_proj_out":
            installed.append((layers[layer].self_attn.o_proj, "post", keep_output((role, layer))))
        elif role == "o_proj_in":
            installed.append((layers[layer].self_attn.o_proj, "pre", keep_input((role, layer))))
        else:  # down_proj_in
            installed.append((layers[layer].mlp.down_proj, "pre", keep_input((role, layer))))
    batched = input_ids.dim() == 2
    with hooks(installed), torch.no_grad():
        logits = model(input_ids if batched else input_ids[None], use_cache=False).logits
    activations = {}
    for site in sites:
        value = _compose(site, seen).float()
        activations[site] = value if batched else value[0]
    return Captures(activations=activations, logits=logits if batched else logits[0])


def _resid_pre_tap(layer: int) -> _Tap:
    return ("embed", -1) if layer == 0 else ("layer_out", layer - 1)


def _taps_for(site: Site) -> tuple[_Tap, ...]:
    layer = site.layer
    if site.kind is SiteKind.ATTN_Z:
        return (("o_proj_in", layer),)
    if site.kind is SiteKind.MLP_POST:
        return (("down_proj_in", layer),)
    if site.kind is SiteKind.RESID_POST:
        return (("layer_out", layer),)
    if site.kind is SiteKind.RESID_PRE:
        return (_resid_pre_tap(layer),)
    return (_resid_pre_tap(layer), ("o_proj_out", layer))


def _compose(site: Site, seen: dict[_Tap, torch.Tensor]) -> torch.Tensor:
    if site.kind is SiteKind.RESID_MID:
        return seen[_resid_pre_tap(site.layer)] + seen[("o_proj_out", site.layer)]
    return seen[_taps_for(site)[0]]

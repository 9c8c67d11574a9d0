"""Taps: forward hooks that write each batch's component values into preallocated buffers.

A ``Tap`` is a small module attached as a child of the module it hooks (named
``circuitwatch_<site kind>``), holding its ``SiteReducer`` and a buffer ``values``
[rows, k]. Its hook writes ``values[:T] = reducer(x)``: pure tensor ops on module state, no
host sync, no Python per token, no data-dependent shape. Installed after the model is
built and before its first forward, the hooks are traced into vLLM's compiled graph (and
captured in CUDA graphs), so they run in the default compiled mode as well as in eager mode.
A ``PositionTap`` on the first layer records the positions the model was given, so the
drain attributes exactly the tokens the values came from, whatever the model runner.

Buffers hold the last forward only; the drain copies them out after each engine step.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sidecar.probe.graph.adapters import Extractor, LlamaAdapter, layer_positions
from sidecar.probe.graph.reduce import SiteReducer
from sidecar.spec.schema import CircuitSpec
from sidecar.spec.sites import Site


class Tap(nn.Module):
    """One site's reducer and the buffer its hook writes: ``values`` [rows, k] float32."""

    def __init__(self, site: Site, extract: Extractor, reducer: SiteReducer, rows: int):
        super().__init__()
        self.site = site
        self.extract = extract
        self.reducer = reducer
        self.register_buffer("values", torch.zeros(rows, reducer.num_columns), persistent=False)

    def record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = self.extract(args, kwargs, None)
        self.values[: x.shape[0]].copy_(self.reducer(x))

    def record_output(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        x = self.extract(args, kwargs, output)
        self.values[: x.shape[0]].copy_(self.reducer(x))


class PositionTap(nn.Module):
    """Records the batch's token positions: ``positions`` [rows] int64."""

    def __init__(self, rows: int):
        super().__init__()
        self.register_buffer("positions", torch.zeros(rows, dtype=torch.long), persistent=False)

    def record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        positions = layer_positions(args, kwargs, None)
        self.positions[: positions.shape[0]].copy_(positions)


@dataclass
class TapSet:
    """The installed taps of one rank and the columns it ships.

    ``component_ids`` [k] are spec component indices, in the order the drain lays the
    shipped columns out: for each tap, its ``shipped`` columns.
    """

    taps: list[Tap]
    positions: PositionTap
    shipped: list[np.ndarray]  # per tap: indices of its columns this rank ships
    component_ids: np.ndarray  # uint32 [k]
    handles: list[torch.utils.hooks.RemovableHandle]

    def remove(self) -> None:
        """Detach every hook (used by tests; a compiled graph keeps what it traced)."""
        for handle in self.handles:
            handle.remove()


def install_taps(
    adapter: LlamaAdapter,
    spec: CircuitSpec,
    rows: int,
    device: torch.device,
    rank: int = 0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> TapSet:
    """Attach one tap per spec site (and the position tap) to the model behind ``adapter``.

    ``rows`` must be at least the most tokens one forward can carry (vLLM's
    max_num_batched_tokens, or its largest CUDA graph size when that is larger).
    Raises UnsupportedModel (from the adapter) before touching the model if a site is unknown.
    """
    hooks = [adapter.hook(site) for site in spec.sites]
    taps, shipped, ids, handles = [], [], [], []
    for hook in hooks:
        components = [(i, c) for i, c in enumerate(spec.components) if c.site == hook.site]
        reducer = SiteReducer(components, hook.shard, rank=rank, all_reduce=all_reduce)
        if reducer.num_columns == 0:
            continue  # every component here belongs to another rank
        tap = Tap(hook.site, hook.extract, reducer, rows).to(device)
        name = "circuitwatch_" + hook.site.kind.value.replace(".", "_")
        hook.module.add_module(name, tap)
        if hook.pre:
            handle = hook.module.register_forward_pre_hook(tap.record_input, with_kwargs=True)
        else:
            handle = hook.module.register_forward_hook(tap.record_output, with_kwargs=True)
        handles.append(handle)
        taps.append(tap)
        columns = np.asarray(reducer.layout.shipped, dtype=np.intp)
        shipped.append(columns)
        ids.extend(reducer.layout.component_ids[c] for c in columns)
    positions = PositionTap(rows).to(device)
    adapter.first_layer.add_module("circuitwatch_positions", positions)
    handles.append(
        adapter.first_layer.register_forward_pre_hook(positions.record_input, with_kwargs=True)
    )
    return TapSet(
        taps=taps,
        positions=positions,
        shipped=shipped,
        component_ids=np.asarray(ids, dtype=np.uint32),
        handles=handles,
    )

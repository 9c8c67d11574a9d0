"""Taps: forward hooks that write each batch's component values into one preallocated buffer.

A ``Tap`` is a small module attached as a child of the module it hooks (named
``circuitwatch_<site kind>``), holding its ``SiteReducer``. Every tap of a rank writes its
own columns of one shared buffer, ``TapSet.values`` [rows, k] float32 (the same tensor,
registered as ``store`` on each tap): ``store[:T, start:stop] = reducer(x)``, pure tensor ops
on module state, no host sync, no Python per token, no data-dependent shape. One buffer means
one copy per step for the drain, whatever the number of sites. Installed after the model is
built and before its first forward, the hooks are traced into vLLM's compiled graph (and
captured in CUDA graphs), so they run in the default compiled mode as well as in eager mode.
A ``PositionTap`` on the first layer records the positions the model was given, so the
drain attributes exactly the tokens the values came from, whatever the model runner.

Buffers hold the last forward only; the drain copies them out after each engine step.

A tap never raises into the forward. Each also writes a one-element ``state``: ``RAN``,
or ``SHAPE`` when the activation it was given is not [T, width] floating point, or
``FAILED`` when extracting or reducing it raised; in both cases it leaves its
columns alone. Under torch.compile the checks and the exception handler run while the hook is
traced (shapes and dtypes are static there), so a failing tap is traced as a tap that
only writes its state, and the engine compiles and serves; at run time a compiled
graph's ops do not raise for these. ``TapSet.check`` reads the states after a forward
(and resets them), so a site whose tap never ran (``NOT_RUN``) is found too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from sidecar.probe.graph.adapters import Extractor, LlamaAdapter, SiteHook, layer_positions
from sidecar.probe.graph.reduce import SiteReducer, float32_products
from sidecar.probe.host.health import (
    INSTALL_POINTS,
    SITE_MISSING,
    SITE_SHAPE,
    TAP_ERROR,
    ProbeFault,
)
from sidecar.spec.schema import CircuitSpec
from sidecar.spec.sites import Site

NOT_RUN, RAN, SHAPE, FAILED = 0, 1, 2, 3  # a tap's ``state`` after a forward


class Tap(nn.Module):
    """One site's reducer, writing columns ``start:stop`` of the shared ``store`` [rows, k],
    and its own ``state`` [1] int32; ``width`` is the site's feature count on this rank."""

    def __init__(
        self,
        site: Site,
        extract: Extractor,
        reducer: SiteReducer,
        store: torch.Tensor,
        start: int,
        width: int,
    ):
        super().__init__()
        self.site = site
        self.extract = extract
        self.reducer = reducer
        self.width = width
        self.raise_in_hook = False  # test hook: CIRCUITWATCH_FAULT=tap_error
        # Every tap registers the same tensor: the compiler sees one buffer, written in slices.
        self.register_buffer("store", store, persistent=False)
        state = torch.zeros(1, dtype=torch.int32, device=store.device)
        self.register_buffer("state", state, persistent=False)
        self.start = start
        self.stop = start + reducer.num_columns

    def record_input(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._record(args, kwargs, None)

    def record_output(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        self._record(args, kwargs, output)

    def _record(self, args: tuple, kwargs: dict, output: object) -> None:
        try:
            x = self.extract(args, kwargs, output)
            if self.raise_in_hook:
                raise RuntimeError("injected fault in a tap (CIRCUITWATCH_FAULT=tap_error)")
            if x.dim() != 2 or x.shape[1] != self.width or not x.is_floating_point():
                self.state.fill_(SHAPE)
                return
            values = self.reducer(x)
        except Exception:
            self.state.fill_(FAILED)
            return
        self.store[: x.shape[0], self.start : self.stop].copy_(values)
        self.state.fill_(RAN)


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

    ``values`` [rows, width] is the buffer every tap writes its columns of; ``shipped`` [k]
    the columns of it this rank ships and ``component_ids`` [k] their spec component indices,
    in the order the drain lays them out.
    """

    taps: list[Tap]
    values: torch.Tensor
    positions: PositionTap
    shipped: np.ndarray  # intp [k]
    component_ids: np.ndarray  # uint32 [k]
    handles: list[torch.utils.hooks.RemovableHandle]

    def remove(self) -> None:
        """Detach every hook (used by tests; a compiled graph keeps what it traced)."""
        for handle in self.handles:
            handle.remove()

    def check(self) -> None:
        """After a forward: raise ``ProbeFault`` if a tap did not run or failed in it, and
        reset the states for the next check. Reads the device (a sync on a GPU)."""
        if not self.taps:
            return
        states = torch.cat([tap.state for tap in self.taps]).tolist()
        for tap in self.taps:
            tap.state.zero_()
        for tap, state in zip(self.taps, states, strict=True):
            if state == NOT_RUN:
                raise ProbeFault(
                    SITE_MISSING, f"the tap at {tap.site.name} did not run in a forward"
                )
            if state == SHAPE:
                shape = f"[tokens, {tap.width}] floating point"
                raise ProbeFault(
                    SITE_SHAPE, f"the tap at {tap.site.name} met no {shape} activation"
                )
            if state == FAILED:
                raise ProbeFault(
                    TAP_ERROR, f"the tap at {tap.site.name} raised while traced or run"
                )

    def inject(self, point: str) -> None:
        """Test hook (``CIRCUITWATCH_FAULT``): make the first tap fail at ``point`` before the
        model's first forward: ``tap_error`` (its hook raises inside), ``site_missing`` (its
        hook is detached), ``site_shape`` (it expects one more feature than the site has)."""
        if not self.taps or point not in INSTALL_POINTS:
            return
        first = self.taps[0]
        if point == "tap_error":
            first.raise_in_hook = True
        elif point == "site_missing":
            self.handles[0].remove()
        else:
            first.width += 1


def install_taps(
    adapter: LlamaAdapter,
    spec: CircuitSpec,
    rows: int,
    device: torch.device,
    rank: int = 0,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    dtype: torch.dtype = torch.float32,
) -> TapSet:
    """Attach one tap per spec site (and the position tap) to the model behind ``adapter``.

    ``rows`` must be at least the most tokens one forward can carry (vLLM's
    max_num_batched_tokens, or its largest CUDA graph size when that is larger); ``dtype``
    is the model's (its activations'). Raises UnsupportedModel (from the adapter) before
    touching the model if a site is unknown.
    """
    hooks = [adapter.hook(site) for site in spec.sites]
    float32_out = float32_products(dtype, device)
    placed: list[tuple[SiteHook, SiteReducer, int]] = []
    shipped, ids, width = [], [], 0
    for hook in hooks:
        components = [(i, c) for i, c in enumerate(spec.components) if c.site == hook.site]
        reducer = SiteReducer(components, hook.shard, rank, all_reduce, dtype, float32_out)
        if reducer.num_columns == 0:
            continue  # every component here belongs to another rank
        placed.append((hook, reducer, width))
        shipped.extend(width + c for c in reducer.layout.shipped)
        ids.extend(reducer.layout.component_ids[c] for c in reducer.layout.shipped)
        width += reducer.num_columns
    store = torch.zeros(rows, width, device=device)
    taps, handles = [], []
    for hook, reducer, start in placed:
        tap = Tap(hook.site, hook.extract, reducer.to(device), store, start, hook.shard.width)
        name = "circuitwatch_" + hook.site.kind.value.replace(".", "_")
        hook.module.add_module(name, tap)
        if hook.pre:
            handle = hook.module.register_forward_pre_hook(tap.record_input, with_kwargs=True)
        else:
            handle = hook.module.register_forward_hook(tap.record_output, with_kwargs=True)
        handles.append(handle)
        taps.append(tap)
    positions = PositionTap(rows).to(device)
    adapter.first_layer.add_module("circuitwatch_positions", positions)
    handles.append(
        adapter.first_layer.register_forward_pre_hook(positions.record_input, with_kwargs=True)
    )
    return TapSet(
        taps=taps,
        values=store,
        positions=positions,
        shipped=np.asarray(shipped, dtype=np.intp),
        component_ids=np.asarray(ids, dtype=np.uint32),
        handles=handles,
    )

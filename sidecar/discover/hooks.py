"""Temporary forward hooks on a PyTorch model: installed on entry, removed on exit, always.

Offline analysis (capture, ablation, patching) hooks a model for one or a few forward
passes. ``hooks`` is the one place that pairs registering with removing, the way
TransformerLens' ``model.hooks(...)`` does, so no caller writes its own try/finally and a
failing forward pass never leaves a hook behind to corrupt the next one.

    with hooks([(o_proj, "pre", replace_head), (layer, "post", keep_output)]):
        model(input_ids)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

from torch import nn

# (module, "pre" for a forward pre-hook or "post" for a forward hook, the hook function)
Hook = tuple[nn.Module, Literal["pre", "post"], Callable]


@contextmanager
def hooks(installed: Iterable[Hook]) -> Iterator[None]:
    """Register every hook in ``installed`` while inside the block; remove them all after."""
    handles = []
    try:
        for module, when, function in installed:
            if when == "pre":
                handles.append(module.register_forward_pre_hook(function))
            elif when == "post":
                handles.append(module.register_forward_hook(function))
            else:
                raise ValueError(f"hook kind must be 'pre' or 'post', got {when!r}")
        yield
    finally:
        for handle in handles:
            handle.remove()

"""Site names: where in the model a component reads its activation.

Sites use TransformerLens names, so specs written for SAELens/TransformerLens tools read
the same here. A ``Site`` is parsed once from its name and carries its layer and kind;
adapters (``sidecar.probe.graph.adapters``, ``sidecar.discover.capture``) map kinds to modules.

Shapes, per token:
    blocks.{L}.hook_resid_pre   [d_model]  residual stream entering block L
    blocks.{L}.hook_resid_mid   [d_model]  after attention, before the MLP
    blocks.{L}.hook_resid_post  [d_model]  leaving block L
    blocks.{L}.attn.hook_z      [n_heads, d_head]  per-head attention output (o_proj input)
    blocks.{L}.mlp.hook_post    [d_mlp]    MLP neurons (down_proj input)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class SiteKind(str, Enum):
    RESID_PRE = "hook_resid_pre"
    RESID_MID = "hook_resid_mid"
    RESID_POST = "hook_resid_post"
    ATTN_Z = "attn.hook_z"
    MLP_POST = "mlp.hook_post"


_SITE_RE = re.compile(r"^blocks\.(\d+)\.(" + "|".join(re.escape(k.value) for k in SiteKind) + r")$")


@dataclass(frozen=True)
class Site:
    layer: int
    kind: SiteKind

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.{self.kind.value}"

    @classmethod
    def parse(cls, name: str) -> Site:
        """Parse a TransformerLens site name; raises ValueError naming the accepted forms."""
        match = _SITE_RE.match(name)
        if match is None:
            forms = ", ".join(f"blocks.{{L}}.{k.value}" for k in SiteKind)
            raise ValueError(f"unknown site {name!r}: expected one of {forms}")
        return cls(layer=int(match.group(1)), kind=SiteKind(match.group(2)))

    def width(self, d_model: int, n_heads: int, d_head: int, d_mlp: int) -> int:
        """Number of features per token at this site (hook_z flattened over heads)."""
        if self.kind is SiteKind.ATTN_Z:
            return n_heads * d_head
        if self.kind is SiteKind.MLP_POST:
            return d_mlp
        return d_model

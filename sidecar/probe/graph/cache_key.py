"""The compile-cache key of what ``sidecar.probe.graph`` traces into vLLM's compiled graph.

vLLM reuses a compiled graph across engine starts when its cache key matches. The taps are part
of that graph, so the key must change whenever what they trace changes: the spec (its hash
fixes the sites, components and directions), the buffers' row count, and the code in this
package, versioned by hand below. ``vllm_internals.key_compile_cache`` writes the key where
vLLM hashes it.
"""

from __future__ import annotations

# Bump whenever the traced code changes what it puts into the graph: a hook's placement or an
# extractor in adapters.py, SiteReducer's buffers or forward in reduce.py, Tap / PositionTap
# in taps.py. Otherwise an engine may reuse a graph traced with the old taps.
TAP_LAYOUT_VERSION = 3


def compile_cache_key(spec_hash: str, rows: int) -> str:
    """The key for taps built from the spec with hash ``spec_hash``, buffers of ``rows`` rows."""
    return f"{spec_hash}/taps-v{TAP_LAYOUT_VERSION}/rows-{rows}"

"""Traced code: what runs inside vLLM's compiled graph (and CUDA graphs), once per forward.

``adapters`` (site -> module and extractor, per rank) -> ``reduce`` (``SiteReducer``:
activation -> component values) -> ``taps`` (``Tap`` / ``PositionTap`` modules whose hooks
write device buffers). Everything that runs per forward here is pure tensor ops: no host sync,
no Python per token, no data-dependent shape. ``cache_key`` keys vLLM's compile cache by this
code: bump its version when the traced code changes.

Kept free of imports, as the parent package is.
"""

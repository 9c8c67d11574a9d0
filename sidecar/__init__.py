"""Circuitwatch: live circuit monitoring for LLMs served by vLLM.

The package follows the data's path: ``spec`` (what to watch) -> ``probe`` (taps inside
the vLLM engine) -> ``protocol`` (the wire format) -> ``server`` (the sidecar: ingest,
scoring, exporters). ``discover`` holds the offline side (circuit finding, the reference
scorer) and ``models`` the bundled reference model.
"""

__version__ = "0.1.0"

"""Benchmarks of Circuitwatch: engine overhead (``overhead``) and sidecar ingest (``ingest``)."""

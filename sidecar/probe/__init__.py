"""In-engine side of Circuitwatch: the vLLM plugin and what it installs in each worker.

The data path, one module per step: ``plugin`` (entry point, wraps vLLM's worker) ->
``runtime`` (one worker's probe) -> ``adapters`` (site -> module, per rank) -> ``reduce``
(activation -> component values) -> ``taps`` (hooks writing device buffers) -> ``drain``
(per-step copy out) -> ``attribution`` (request, position, phase, sampling) -> ``shipper``
(bounded queue, gRPC stream to the sidecar). ``config`` reads the environment.

Kept free of imports: vLLM imports this package in every process it starts.
"""

"""In-engine side of Circuitwatch: the vLLM plugin and what it installs in each worker.

Top level: ``plugin`` (the entry point) wraps vLLM's worker through ``vllm_internals`` (every
read of vLLM-private state, the one file a vLLM upgrade edits) and builds one ``runtime``
probe per worker from ``config`` (the environment). Below, split by where code runs:

    graph/  traced into vLLM's compiled graph: ``adapters`` (site -> module, per rank) ->
            ``reduce`` (activation -> component values) -> ``taps`` (hooks writing device
            buffers); ``cache_key`` keys vLLM's compile cache by them
    host/   on the host, after each step: ``drain`` (per-step copy out into the ``ring``) ->
            ``attribution`` (request, position, phase, sampling) -> ``shipper`` (bounded
            queue, gRPC stream to the sidecar); ``cpus`` (threads off the forward's cores)

Kept free of imports: vLLM imports this package in every process it starts.
"""

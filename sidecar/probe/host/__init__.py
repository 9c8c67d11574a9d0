"""Host-side code: runs on the engine thread after a step, or on the shipper's thread; never traced.

``drain`` (copy the taps' buffers into the ``ring`` after each step) -> ``attribution``
(request, position, phase, sampling) -> ``shipper`` (bounded queue, gRPC stream to the
sidecar, on the CPUs ``cpus`` leaves free of the forward pass).

Kept free of imports, as the parent package is.
"""

"""The probe's settings: explicit arguments, else environment variables, else defaults.

    CIRCUITWATCH_SPEC        path to the circuit spec YAML; unset = probes off (required)
    CIRCUITWATCH_ENDPOINT    the sidecar: ``unix:///path/to.sock`` or ``host:port`` (required)
    CIRCUITWATCH_SAMPLE      tokens to ship per step: a fraction ``"0.25"`` or a cap ``"256"``
                             (default ``"512"``, see ``sidecar.probe.host.attribution``)
    CIRCUITWATCH_QUEUE_SIZE  steps the shipper may hold while the sidecar is slow (default 256)
    CIRCUITWATCH_LINGER_MS   how long the shipper gathers steps into one message (default 50):
                             longer costs the engine less and delays the metrics more
    CIRCUITWATCH_BUDGET      the share of the engine's step time the probe may spend on the
                             engine thread (default 0.005): it samples fewer tokens to stay
                             inside (see ``sidecar.probe.host.budget``); with
                             ``CIRCUITWATCH_SAMPLE=1.0`` (every token) it is only measured
    CIRCUITWATCH_FAULT       test hook, never set in production: make the probe fail for real
                             at one point (tap_error, site_missing, site_shape, collect or
                             resolve, e.g. ``collect@20``: from engine step 20), to see it turn
                             off, logged and exported while the engine serves on
                             (``sidecar.probe.host.health``)

    CIRCUITWATCH_TLS_CA, CIRCUITWATCH_TLS_CERT, CIRCUITWATCH_TLS_KEY, CIRCUITWATCH_TOKEN_FILE
                             TLS, a client certificate and a bearer token for the sidecar's
                             TCP ingest (files; see ``sidecar.probe.host.channel``)

vLLM starts its engine processes with the environment of the process that launched it, so
these must be set before the engine starts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.probe.host.attribution import DEFAULT_SAMPLE, SamplePolicy
from sidecar.probe.host.budget import DEFAULT_BUDGET, check_budget
from sidecar.probe.host.channel import ChannelSecurity
from sidecar.probe.host.health import FaultInjection
from sidecar.protocol.batch import MAX_BATCH_STEPS

ENV_SPEC = "CIRCUITWATCH_SPEC"
ENV_ENDPOINT = "CIRCUITWATCH_ENDPOINT"
ENV_SAMPLE = "CIRCUITWATCH_SAMPLE"
ENV_QUEUE_SIZE = "CIRCUITWATCH_QUEUE_SIZE"
ENV_LINGER_MS = "CIRCUITWATCH_LINGER_MS"
ENV_FAULT = "CIRCUITWATCH_FAULT"
ENV_BUDGET = "CIRCUITWATCH_BUDGET"
DEFAULT_QUEUE_SIZE = 256
DEFAULT_LINGER_MS = 50.0


@dataclass(frozen=True)
class ProbeConfig:
    spec_path: Path
    endpoint: str
    sample: SamplePolicy = SamplePolicy.parse(DEFAULT_SAMPLE)
    queue_size: int = DEFAULT_QUEUE_SIZE
    linger_ms: float = DEFAULT_LINGER_MS
    fault: FaultInjection | None = None  # test hook
    budget: float = DEFAULT_BUDGET
    security: ChannelSecurity = ChannelSecurity()

    def __post_init__(self):
        if not self.endpoint.strip():
            raise ValueError("endpoint is empty: expected unix:///path/to.sock or host:port")
        _check_queue_size(self.queue_size)
        _check_linger_ms(self.linger_ms)
        check_budget(self.budget)
        self.security.check(self.endpoint)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ProbeConfig | None:
        """The config the environment asks for; None when ``CIRCUITWATCH_SPEC`` is unset.

        Raises ValueError naming the variable when a value is missing or malformed.
        """
        env = os.environ if environ is None else environ
        spec = env.get(ENV_SPEC, "").strip()
        if not spec:
            return None
        endpoint = env.get(ENV_ENDPOINT, "").strip()
        if not endpoint:
            raise ValueError(f"{ENV_SPEC} is set but {ENV_ENDPOINT} is not: where is the sidecar?")
        try:
            sample = SamplePolicy.parse(env.get(ENV_SAMPLE, DEFAULT_SAMPLE))
        except ValueError as e:
            raise ValueError(f"{ENV_SAMPLE}: {e}") from None
        queue_size = _parse(env, ENV_QUEUE_SIZE, DEFAULT_QUEUE_SIZE, int, _check_queue_size)
        linger_ms = _parse(env, ENV_LINGER_MS, DEFAULT_LINGER_MS, float, _check_linger_ms)
        fault = None
        if env.get(ENV_FAULT, "").strip():
            try:
                fault = FaultInjection.parse(env[ENV_FAULT])
            except ValueError as e:
                raise ValueError(f"{ENV_FAULT}: {e}") from None
        budget = _parse(env, ENV_BUDGET, DEFAULT_BUDGET, float, check_budget)
        security = ChannelSecurity.from_env(env, endpoint)
        return cls(Path(spec), endpoint, sample, queue_size, linger_ms, fault, budget, security)


def _check_queue_size(steps: int) -> None:
    # A message gathers at most the queue's steps; the sidecar refuses more in one message.
    if not 1 <= steps <= MAX_BATCH_STEPS:
        raise ValueError(f"queue size {steps} is not in [1, {MAX_BATCH_STEPS}]")


def _check_linger_ms(ms: float) -> None:
    if not 0.0 <= ms <= 10_000.0:
        raise ValueError(f"linger {ms} ms is not in [0, 10000]")


def _parse(env: Mapping[str, str], name: str, default, kind: type, check: Callable) -> Any:
    """``env[name]`` (else ``default``) as ``kind``; ValueError naming ``name`` if malformed."""
    text = env.get(name, str(default))
    try:
        value = kind(text)
        check(value)
    except ValueError as e:
        raise ValueError(f"{name}: {text!r} is not valid: {e}") from None
    return value

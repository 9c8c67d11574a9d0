"""The probe's settings: explicit arguments, else environment variables, else defaults.

    CIRCUITWATCH_SPEC        path to the circuit spec YAML; unset = probes off (required)
    CIRCUITWATCH_ENDPOINT    the sidecar: ``unix:///path/to.sock`` or ``host:port`` (required)
    CIRCUITWATCH_SAMPLE      tokens to ship per step: a fraction ``"0.25"`` or a cap ``"256"``
                             (default ``"512"``, see ``sidecar.probe.attribution``)
    CIRCUITWATCH_QUEUE_SIZE  steps the shipper may hold while the sidecar is slow (default 256)

vLLM starts its engine processes with the environment of the process that launched it, so
these must be set before the engine starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sidecar.probe.attribution import DEFAULT_SAMPLE, SamplePolicy

ENV_SPEC = "CIRCUITWATCH_SPEC"
ENV_ENDPOINT = "CIRCUITWATCH_ENDPOINT"
ENV_SAMPLE = "CIRCUITWATCH_SAMPLE"
ENV_QUEUE_SIZE = "CIRCUITWATCH_QUEUE_SIZE"
DEFAULT_QUEUE_SIZE = 256


@dataclass(frozen=True)
class ProbeConfig:
    spec_path: Path
    endpoint: str
    sample: SamplePolicy = SamplePolicy.parse(DEFAULT_SAMPLE)
    queue_size: int = DEFAULT_QUEUE_SIZE

    def __post_init__(self):
        if not self.endpoint.strip():
            raise ValueError("endpoint is empty: expected unix:///path/to.sock or host:port")
        if self.queue_size < 1:
            raise ValueError(f"queue size {self.queue_size} is not >= 1")

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
        queue_text = env.get(ENV_QUEUE_SIZE, str(DEFAULT_QUEUE_SIZE))
        try:
            queue_size = int(queue_text)
        except ValueError:
            raise ValueError(f"{ENV_QUEUE_SIZE}: {queue_text!r} is not an integer") from None
        try:
            return cls(Path(spec), endpoint, sample, queue_size)
        except ValueError as e:
            raise ValueError(f"{ENV_QUEUE_SIZE}: {e}") from None

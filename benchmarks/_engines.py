"""vLLM engines for the overhead benchmark: one per configuration, each with its own settings.

The probe plugin reads ``CIRCUITWATCH_*`` when an engine's processes start, and those inherit
this process's environment, so ``start_engine`` sets (or clears) them just before
``LLM(...)``. Engine processes are spawned, not forked (``VLLM_WORKER_MULTIPROC_METHOD=
spawn``, set by ``prepare_process``): a forked engine would inherit this process's loaded
plugin state and ignore its own environment.

Step latency: vLLM stamps each step's outputs in the engine core (``EngineCoreOutputs.
timestamp``, CLOCK_MONOTONIC) when the step ends; ``StepClock`` reads those stamps as the
front end receives them, so the gaps between consecutive stamps are the engine's step
times, measured inside the engine, without front-end or IPC delays.
"""

from __future__ import annotations

import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks._models import BenchModel
from sidecar.probe.config import ENV_ENDPOINT, ENV_SAMPLE, ENV_SPEC

_GIB = 2**30


def prepare_process() -> None:
    """Environment every engine of this process needs; call before importing vLLM."""
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # apply_model / collective_rpc


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    enforce_eager: bool
    spec: str | None = None  # "typical" | "every_layer": the plugin watches this spec
    sample: str | None = None  # CIRCUITWATCH_SAMPLE; None keeps the plugin's default
    naive_hooks: bool = False
    target_ratio: float | None = None  # throughput vs the baseline must reach this
    probe_stage: str | None = None  # "taps" or "drain": cut the probe short (see limit_probe)
    probe_from: str | None = None  # a checkout whose probe the engine runs instead of this one

    @property
    def probed(self) -> bool:
        return self.spec is not None


@dataclass(frozen=True)
class Workload:
    batch: int
    prompt_tokens: int
    max_tokens: int

    def prompts(self, vocab_size: int) -> list[dict]:
        """Fixed token-id prompts, a different one per request (so no prefix is shared)."""
        rng = np.random.default_rng(0)
        return [
            {"prompt_token_ids": rng.integers(3, vocab_size - 1, self.prompt_tokens).tolist()}
            for _ in range(self.batch)
        ]

    @property
    def forward_tokens(self) -> int:
        """Tokens the engine runs forward on per generate call (the last one is never fed)."""
        return self.batch * (self.prompt_tokens + self.max_tokens - 1)


@dataclass(frozen=True)
class Device:
    kind: str  # "cpu" | "cuda"
    name: str
    total_bytes: int
    free_bytes: int

    @classmethod
    def detect(cls) -> Device:
        from vllm.platforms import current_platform

        if current_platform.is_cuda_alike():
            import torch

            free, total = torch.cuda.mem_get_info()
            return cls("cuda", torch.cuda.get_device_name(0), total, free)
        meminfo = dict(
            (line.split(":")[0], int(line.split()[1]) * 1024)
            for line in Path("/proc/meminfo").read_text().splitlines()
        )
        return cls("cpu", "cpu", meminfo["MemTotal"], meminfo["MemAvailable"])

    def wait_until_free(self, fraction: float = 0.9, timeout: float = 60.0) -> None:
        """After an engine stopped: wait until the device's memory is back (GPU only)."""
        if self.kind != "cuda":
            return
        import torch

        deadline = time.monotonic() + timeout
        while torch.cuda.mem_get_info()[0] < fraction * self.free_bytes:
            if time.monotonic() > deadline:
                return  # the next engine's own check reports what is missing
            time.sleep(1.0)


def kv_cache_bytes(model: BenchModel, workload: Workload) -> int:
    """Room for every request's whole context twice over, at least 64 MiB."""
    config = json.loads((model.path / "config.json").read_text())
    width = 2 if config.get("torch_dtype") in ("bfloat16", "float16") else 4
    shape = model.shape
    per_token = 2 * shape.n_layers * shape.n_kv_heads * shape.d_head * width
    tokens = workload.batch * (workload.prompt_tokens + workload.max_tokens + 64)
    return max(64 * 2**20, 2 * per_token * tokens)


def engine_bytes(model: BenchModel, workload: Workload, device: Device) -> int:
    """A generous estimate of one engine's memory: weights, KV cache, runtime."""
    config = json.loads((model.path / "config.json").read_text())
    width = 2 if config.get("torch_dtype") in ("bfloat16", "float16") else 4
    runtime = (3 if device.kind == "cuda" else 2) * _GIB
    return model.parameters * width + kv_cache_bytes(model, workload) + runtime


class StepClock:
    """Engine-core step stamps of one ``LLM``, read as its outputs arrive.

    Each stamp carries how many distinct requests had produced output by then: the engine
    starts stepping while the front end is still adding requests, so the first steps of a
    batch mix prefills with decodes, and only the steps after every request's first token
    are pure decode steps.
    """

    def __init__(self, llm):
        self.stamps: list[tuple[float, int]] = []
        self._seen: set[str] = set()
        core = llm.llm_engine.engine_core
        receive = core.get_output

        def get_output():
            outputs = receive()
            if outputs.outputs:
                self._seen.update(o.request_id for o in outputs.outputs)
                self.stamps.append((outputs.timestamp, len(self._seen)))
            return outputs

        core.get_output = get_output

    def take(self) -> list[tuple[float, int]]:
        stamps, self.stamps, self._seen = self.stamps, [], set()
        return stamps

    def decode_steps(self, requests: int) -> np.ndarray:
        """Durations of the pure decode steps since the last ``take`` (and take them)."""
        stamps = self.take()
        first = next((i for i, (_, seen) in enumerate(stamps) if seen >= requests), len(stamps))
        return np.diff(np.asarray([t for t, _ in stamps[first:]], dtype=np.float64))


class CpuClock:
    """CPU seconds (user + system) used by this process and by one engine's processes.

    On a shared 2-core machine throughput swings with whatever else runs; the CPU time all
    processes spend per output token swings much less, so it shows a fixed per-step cost
    that throughput noise hides. "All processes": the engine core, its workers, and this
    one (the front end and the in-process sidecars).
    """

    def __init__(self, llm):
        manager = llm.llm_engine.engine_core.resources.engine_manager
        roots = {p.pid for p in manager.processes}
        parents = {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            fields = _stat_fields(int(stat.parent.name))
            if fields is not None:
                parents[int(stat.parent.name)] = int(fields[1])
        self.pids = set(roots)
        while True:  # the engine core's descendants: its workers
            more = {pid for pid, parent in parents.items() if parent in self.pids} - self.pids
            if not more:
                break
            self.pids |= more
        self._tick = os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        own = os.times()
        total = own.user + own.system
        for pid in self.pids:
            fields = _stat_fields(pid)
            if fields is not None:
                total += (int(fields[11]) + int(fields[12])) / self._tick  # utime, stime
        return total


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


@dataclass
class Engine:
    config: Config
    llm: object  # vllm.LLM
    clock: StepClock
    cpu: CpuClock
    compilation: dict  # the compile settings vLLM settled on
    start_seconds: float

    def generate(self, prompts: list[dict], params) -> tuple[int, float, np.ndarray]:
        """(output tokens, wall seconds of llm.generate, decode step times in seconds)."""
        self.clock.take()
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        return tokens, wall, self.clock.decode_steps(len(prompts))

    def probe_stats(self):
        from sidecar.probe.plugin import probe_stats

        return self.llm.collective_rpc(probe_stats)

    def flush_probes(self) -> bool:
        from sidecar.probe.plugin import probe_flush

        return all(self.llm.collective_rpc(probe_flush, args=(30.0,)))

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        self.llm = None
        gc.collect()


def start_engine(
    config: Config,
    model: BenchModel,
    workload: Workload,
    device: Device,
    spec_path: Path | None,
    endpoint: str | None,
    engines_at_once: int,
) -> Engine:
    """An ``LLM`` for ``config``; raises RuntimeError if its probes or hooks did not install."""
    from vllm import LLM

    for name in (ENV_SPEC, ENV_ENDPOINT, ENV_SAMPLE):
        os.environ.pop(name, None)
    python_path = os.environ.get("PYTHONPATH")
    if config.probe_from is not None:
        # The engine's processes find the plugin's modules there first.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [config.probe_from, python_path]))
    if config.probed:
        os.environ[ENV_SPEC] = str(spec_path)
        os.environ[ENV_ENDPOINT] = str(endpoint)
        if config.sample is not None:
            os.environ[ENV_SAMPLE] = config.sample
    kwargs = dict(
        model=str(model.path),
        skip_tokenizer_init=True,
        seed=0,
        enforce_eager=config.enforce_eager,
        max_model_len=workload.prompt_tokens + workload.max_tokens,
        max_num_seqs=workload.batch,
        max_num_batched_tokens=max(2048, workload.batch * workload.prompt_tokens),
        enable_prefix_caching=False,
        kv_cache_memory_bytes=kv_cache_bytes(model, workload),
    )
    if model.dummy_weights:
        kwargs["load_format"] = "dummy"
    if device.kind == "cuda":
        # The startup check wants free memory >= utilization x total, with the other
        # engines of this run already resident.
        share = engine_bytes(model, workload, device) / device.total_bytes
        kwargs["gpu_memory_utilization"] = min(0.9, share, 0.9 / engines_at_once)
    start = time.perf_counter()
    try:
        llm = LLM(**kwargs)
    finally:
        for name in (ENV_SPEC, ENV_ENDPOINT, ENV_SAMPLE):
            os.environ.pop(name, None)
        if python_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = python_path
    elapsed = time.perf_counter() - start
    engine = Engine(config, llm, StepClock(llm), CpuClock(llm), _compilation(llm), elapsed)
    if config.probed and not all(s is not None for s in engine.probe_stats()):
        engine.shutdown()
        raise RuntimeError(f"{config.key}: the probes did not install (see the engine log)")
    if config.probe_stage is not None and not all(
        llm.collective_rpc(limit_probe, args=(config.probe_stage,))
    ):
        engine.shutdown()
        raise RuntimeError(f"{config.key}: the probe could not be cut short")
    if config.naive_hooks:
        from benchmarks._naive_hooks import install_naive_hooks

        if not all(llm.apply_model(install_naive_hooks)):
            engine.shutdown()
            raise RuntimeError(f"{config.key}: the naive hooks did not install")
    return engine


def limit_probe(worker, stage: str) -> bool:
    """On a worker: run its probe only up to ``stage``, to measure what each part costs.

    "taps": the taps still run in the compiled graph, but nothing is drained after a step;
    "drain": every step is drained (layout, copies into the host ring) and then discarded,
    so the shipper thread and the sidecar do nothing.
    """
    from sidecar.probe.vllm_internals import attached_probe

    probe = attached_probe(worker)
    if probe is None or stage not in ("taps", "drain"):
        return False
    if stage == "taps":
        probe.after_step = lambda runner, scheduler_output: None
    else:
        probe.shipper.submit = lambda item: item.discard()
    return True


def _compilation(llm) -> dict:
    compilation = llm.llm_engine.vllm_config.compilation_config
    settings = {}
    for name in ("mode", "cudagraph_mode"):
        value = getattr(compilation, name, None)
        settings[name] = getattr(value, "name", str(value))
    return settings

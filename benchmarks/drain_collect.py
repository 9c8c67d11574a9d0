"""Engine-thread time of ``Drain.collect`` (the per-step copies into the host ring), per step.

    python -m benchmarks.drain_collect                           # this checkout
    python -m benchmarks.drain_collect --level 0.25              # choosing rows, then copying
    PYTHONPATH=OTHER_CHECKOUT python benchmarks/drain_collect.py # another checkout's drain

No engine: a drain over taps of the overhead benchmark's spec shapes (3 taps as on the
reference model's typical spec; 90 taps, every layer of SmolLM2: 2 heads, 8 residual and 4
MLP directions each), fed steps of ``--tokens`` rows from ``--requests`` requests, timed
over ``--steps`` calls after a warm-up; each step's span is given back at once, as the
shipper would later. Each step's requests move on by their tokens, and the position buffer
holds what the layout says (as a forward writes it), so that at a ``--level`` below 1 the
rows a drain keeps are the same whether it reads the layout or the positions. Works with
drains that copy one buffer per tap (``TapSet.taps`` each with ``values``) and with those
that copy one shared buffer (``TapSet.values``).
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np
import torch

from sidecar.probe.graph.taps import PositionTap, TapSet
from sidecar.probe.host.attribution import SamplePolicy
from sidecar.probe.host.drain import BatchIdentity, Drain
from sidecar.probe.host.shipper import DropCounts
from sidecar.probe.vllm_internals import StepLayout

SHAPES = {"reference typical (3 taps)": [2, 2, 1], "smollm2 every layer (90 taps)": [2, 8, 4] * 30}
ROWS = 2048  # the taps' buffers: vLLM's max_num_batched_tokens on CPU


class _Tap:
    """Stands in for a tap whose drain copies its own buffer."""

    def __init__(self, width: int):
        self.values = torch.zeros(ROWS, width)


def _tap_set(widths: list[int]) -> TapSet:
    names = {f.name for f in fields(TapSet)}
    k = sum(widths)
    common = dict(
        positions=PositionTap(ROWS),
        component_ids=np.arange(k, dtype=np.uint32),
        handles=[],
    )
    if "values" in names:  # one shared buffer
        return TapSet(taps=[], values=torch.zeros(ROWS, k), shipped=np.arange(k), **common)
    shipped = [np.arange(w) for w in widths]
    return TapSet(taps=[_Tap(w) for w in widths], shipped=shipped, **common)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drain_collect")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--level", type=float, default=1.0, help="the latency budget's level")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    origin = Path(inspect.getfile(Drain)).parents[3]
    print(
        f"Drain.collect from {origin}, {args.tokens} rows from {args.requests} requests a step, "
        f"level {args.level}"
    )
    per_request = args.tokens // args.requests
    ids = [f"r{i}-{i:08x}" for i in range(args.requests)]
    scheduled = np.full(args.requests, per_request, np.int64)
    prompt_lens = np.full(args.requests, 4, np.int64)
    n = int(scheduled.sum())
    for name, widths in SHAPES.items():
        drain = Drain(
            _tap_set(widths),
            BatchIdentity("sha256:s", "m", 0, 1),
            SamplePolicy.parse("1.0"),
            DropCounts(),
            4 * ROWS,
        )
        level = {"level": args.level} if args.level < 1.0 else {}  # older drains had none
        times = []
        for step in range(args.steps + 200):
            computed = np.arange(args.requests, dtype=np.int64) + step * per_request
            layout = StepLayout(ids, scheduled, prompt_lens, computed)
            drain.taps.positions.positions[:n] = torch.from_numpy(
                np.repeat(computed, scheduled) + np.tile(np.arange(per_request), args.requests)
            )
            start = time.perf_counter()
            pending = drain.collect(step, layout, [], **level)
            times.append(time.perf_counter() - start)
            if pending is not None:
                pending.discard()
        measured = np.array(times[200:]) * 1e6
        print(
            f"  {name}: median {np.median(measured):.1f} µs, "
            f"p90 {np.percentile(measured, 90):.1f} µs per step"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Cross-check exact activation patching against TransformerLens' own implementation.

TransformerLens (4.x: ``TransformerBridge`` around the same HF checkpoint, its hook points and
``run_with_hooks``) patches resid_pre at a layer and position, and a head's hook_z at all
positions; ``sidecar.discover.patching`` does the same with its own hooks. Both
report recovery (0 corrupted, 1 clean); this prints and writes the largest absolute
difference. TransformerLens' pins differ from vLLM's, so it runs from its own venv:

    python3 -m venv /work/tlvenv && /work/tlvenv/bin/pip install transformer-lens
    PYTHONPATH=$PWD /work/tlvenv/bin/python benchmarks/crosscheck_transformerlens.py \\
        --model smollm2 --pairs 2 \\
        --out benchmarks/results/discover-patch-smollm2/crosscheck_transformerlens.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import torch
from tqdm import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformers import AutoModelForCausalLM, AutoTokenizer

from sidecar.discover.patch_task import load_task
from sidecar.discover.patching import run_patching
from sidecar.discover.tasks import CAPITALS_FILE
from sidecar.models.registry import resolve_model


@dataclass(frozen=True)
class Crosscheck:
    model: str
    task: str
    pairs: int
    transformer_lens: str
    resid_max_abs_diff: float
    head_max_abs_diff: float
    resid_cells: int
    heads: int
    seconds: float


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--task", default=str(CAPITALS_FILE))
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--out", default="")
    parser.add_argument("--positions", type=int, nargs="+", default=[-2, -1])
    parser.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    args = parser.parse_args()
    started = time.monotonic()
    model_dir = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task = load_task(args.task, tokenizer, limit=args.pairs)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ours = {e.component: e.exact for e in run_patching(hf, task, ("resid", "head")).effects}

    bridge = TransformerBridge.boot_transformers(str(model_dir), hf_model=hf, tokenizer=tokenizer)
    clean = torch.tensor([p.clean_ids for p in task.pairs])
    corrupted = torch.tensor([p.corrupted_ids for p in task.pairs])
    answer = torch.tensor([p.answer_id for p in task.pairs])
    wrong = torch.tensor([p.wrong_id for p in task.pairs])
    rows = torch.arange(len(task.pairs))

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return (logits[rows, -1, answer] - logits[rows, -1, wrong]).sum()

    with torch.no_grad():
        clean_logits, clean_cache = bridge.run_with_cache(clean)
        clean_value = logit_diff(clean_logits)
        corrupted_value = logit_diff(bridge(corrupted))

    def recovery(logits: torch.Tensor) -> torch.Tensor:
        return (logit_diff(logits) - corrupted_value) / (clean_value - corrupted_value)

    def patched(name: str, fix) -> float:
        with torch.no_grad():
            return float(recovery(bridge.run_with_hooks(corrupted, fwd_hooks=[(name, fix)])))

    def resid_fix(position: int):
        def hook(value, hook):
            value[:, position] = clean_cache[hook.name][:, position]
            return value

        return hook

    def head_fix(head: int):
        def hook(value, hook):  # [batch, pos, head, d_head], or flattened over heads
            clean_z = clean_cache[hook.name]
            if value.dim() == 4:
                value[:, :, head] = clean_z[:, :, head]
            else:
                d_head = value.shape[-1] // bridge.cfg.n_heads
                columns = slice(head * d_head, (head + 1) * d_head)
                value[..., columns] = clean_z[..., columns]
            return value

        return hook

    # TransformerLens' own hook points, one forward pass per patch (slow on a busy CPU): the
    # resid cells of every layer at the positions given, and every head of the layers given.
    resid_diffs, head_diffs = [], []
    for c, value in tqdm(sorted(ours.items()), desc="TransformerLens"):
        if c.family == "resid" and c.index in args.positions:
            theirs = patched(f"blocks.{c.layer}.hook_resid_pre", resid_fix(c.index))
            resid_diffs.append(abs(theirs - value))
        elif c.family == "head" and c.layer in args.layers:
            theirs = patched(f"blocks.{c.layer}.attn.hook_z", head_fix(c.index))
            head_diffs.append(abs(theirs - value))
    result = Crosscheck(
        model=args.model,
        task=Path(args.task).name,
        pairs=len(task.pairs),
        transformer_lens=version("transformer-lens"),
        resid_max_abs_diff=max(resid_diffs),
        head_max_abs_diff=max(head_diffs),
        resid_cells=len(resid_diffs),
        heads=len(head_diffs),
        seconds=round(time.monotonic() - started, 1),
    )
    print(json.dumps(asdict(result), indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(result), indent=1) + "\n")


if __name__ == "__main__":
    main()

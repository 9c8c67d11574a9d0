"""Cross-check exact activation patching against TransformerLens' own implementation.

TransformerLens (4.x: ``TransformerBridge`` around the same HF checkpoint, and its
``transformer_lens.patching`` functions) patches resid_pre by layer x position and each head's
hook_z at all positions; ``sidecar.discover.patching`` does the same with its own hooks. Both
report recovery (0 corrupted, 1 clean); this prints and writes the largest absolute
difference. TransformerLens' pins differ from vLLM's, so it runs from its own venv:

    python3 -m venv /work/tlvenv && /work/tlvenv/bin/pip install transformer-lens
    PYTHONPATH=$PWD /work/tlvenv/bin/python benchmarks/crosscheck_transformerlens.py \\
        --model smollm2 --pairs 4 --out benchmarks/results/discover-patch-smollm2/crosscheck.json
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformer_lens import patching as tl_patching
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

    with torch.no_grad():
        resid = tl_patching.get_act_patch_resid_pre(bridge, corrupted, clean_cache, recovery)
        heads = tl_patching.get_act_patch_attn_head_out_all_pos(
            bridge, corrupted, clean_cache, recovery
        )
    length = clean.shape[1]
    resid_diff = max(
        abs(float(resid[c.layer, length + c.index]) - value)
        for c, value in ours.items()
        if c.family == "resid"
    )
    head_diff = max(
        abs(float(heads[c.layer, c.index]) - value)
        for c, value in ours.items()
        if c.family == "head"
    )
    import transformer_lens

    result = Crosscheck(
        model=args.model,
        task=Path(args.task).name,
        pairs=len(task.pairs),
        transformer_lens=getattr(transformer_lens, "__version__", "4.x"),
        resid_max_abs_diff=resid_diff,
        head_max_abs_diff=head_diff,
        resid_cells=int(resid.numel()),
        heads=int(heads.numel()),
        seconds=round(time.monotonic() - started, 1),
    )
    print(json.dumps(asdict(result), indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(result), indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Patching tasks that ship with Circuitwatch, and the code that builds them.

``capitals.jsonl`` (factual recall): "The capital of France is" -> " Paris" vs " Rome",
corrupted by another country ("The capital of Italy is"), so the wrong answer is the
corrupted country's capital and the logit difference flips sign between the two runs.
Every country and capital is one token for SmolLM2's tokenizer, so the two prompts have the
same length. The file format is documented in ``sidecar.discover.patch_task``.

Rebuild (deterministic; checks the file against SmolLM2's tokenizer)::

    python -m sidecar.discover.tasks
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
CAPITALS_FILE = TASKS_DIR / "capitals.jsonl"

# Countries and capitals that are each one token for SmolLM2 (checked when building).
CAPITALS = (
    ("France", "Paris"), ("Italy", "Rome"), ("Germany", "Berlin"), ("Spain", "Madrid"),
    ("Japan", "Tokyo"), ("Russia", "Moscow"), ("China", "Beijing"), ("Egypt", "Cairo"),
    ("England", "London"), ("Greece", "Athens"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Denmark", "Copenhagen"), ("Finland", "Helsinki"), ("Hungary", "Budapest"),
    ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Cuba", "Havana"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
    ("Netherlands", "Amsterdam"), ("Scotland", "Edinburgh"), ("Wales", "Cardiff"),
    ("Korea", "Seoul"), ("Philippines", "Manila"),
)  # fmt: skip
TEMPLATE = "The capital of {} is"


def capitals_rows(seed: int = 0, count: int = 32) -> list[dict]:
    """``count`` pairs: each clean country once, its corrupted partner another country."""
    rng = random.Random(seed)
    clean = rng.sample(CAPITALS, count)
    rows = []
    for country, capital in clean:
        other, other_capital = rng.choice([c for c in CAPITALS if c[0] != country])
        rows.append(
            {
                "clean": TEMPLATE.format(country),
                "corrupted": TEMPLATE.format(other),
                "answer": f" {capital}",
                "wrong_answer": f" {other_capital}",
                "meta": {"clean_country": country, "corrupted_country": other},
            }
        )
    return rows


def write_rows(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def main() -> None:
    from transformers import AutoTokenizer

    from sidecar.discover.patch_task import load_task
    from sidecar.models.registry import model_path

    write_rows(capitals_rows(), CAPITALS_FILE)
    # load_task refuses pairs of different lengths and answers of more than one token
    task = load_task(CAPITALS_FILE, AutoTokenizer.from_pretrained(model_path("smollm2")))
    print(f"{CAPITALS_FILE}: {len(task.pairs)} pairs, {task.pairs[0].length} tokens each")

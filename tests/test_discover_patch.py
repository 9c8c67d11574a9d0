"""circuitwatch discover patch: exact and attribution patching, task files, the command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from probe_engine_helpers import tiny_model_and_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from sidecar.cli import main
from sidecar.discover.patch_task import MetricKind, TaskError, load_task
from sidecar.discover.patching import (
    Component,
    recovery_of_set,
    run_patching,
    spearman,
    top_k_overlap,
)
from sidecar.discover.tasks import CAPITALS_FILE
from sidecar.models.registry import ModelNotInstalled, model_path
from sidecar.spec.load import load_spec

# Words that are one token each for the tiny model's tokenizer.
PAIRS = [
    {"clean": " a b d s r", "corrupted": " a f d s r", "answer": " i", "wrong_answer": " b"},
    {"clean": " th r f i", "corrupted": " th r a i", "answer": " i", "wrong_answer": " b"},
    {"clean": " s s b a", "corrupted": " d s b a", "answer": " i", "wrong_answer": " b"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patch")
    model_dir, _ = tiny_model_and_spec(folder)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    task = load_task(_write(folder / "task.jsonl", PAIRS), tokenizer)
    return model_dir, tokenizer, model, task, folder


def test_patching_everything_recovers_the_clean_run_and_nothing_recovers_nothing(tiny):
    _, _, model, task, _ = tiny
    longest = max(p.length for p in task.pairs)
    embedding = [Component("resid", 0, p) for p in range(-longest, 0)]
    assert recovery_of_set(model, task, embedding) == pytest.approx(1.0, abs=1e-5)
    last = model.config.num_hidden_layers - 1
    # the last layer's input at every position: everything after it is the clean run again
    top = [Component("resid", last, p) for p in range(-longest, 0)]
    assert recovery_of_set(model, task, top) == pytest.approx(1.0, abs=1e-5)
    assert recovery_of_set(model, task, []) == pytest.approx(0.0, abs=1e-6)


def _independent_head_patch(model, clean_ids, corrupted_ids, layer, head, answer, wrong):
    """Head patching written with plain torch hooks, sharing no code with patching.py."""
    o_proj = model.model.layers[layer].self_attn.o_proj
    d_head = model.config.head_dim
    seen = {}
    handle = o_proj.register_forward_pre_hook(lambda _m, a: seen.update(z=a[0].clone()))
    with torch.no_grad():
        clean_logits = model(clean_ids).logits
    handle.remove()

    def put_clean(_m, args):
        z = args[0].clone()
        z[..., head * d_head : (head + 1) * d_head] = seen["z"][
            ..., head * d_head : (head + 1) * d_head
        ]
        return (z,)

    handle = o_proj.register_forward_pre_hook(put_clean)
    with torch.no_grad():
        patched = model(corrupted_ids).logits
    handle.remove()
    with torch.no_grad():
        corrupted = model(corrupted_ids).logits

    def diff(logits):
        return float((logits[:, -1, answer] - logits[:, -1, wrong]).sum())

    return (diff(patched) - diff(corrupted)) / (diff(clean_logits) - diff(corrupted))


def test_exact_head_patching_matches_an_independent_computation(tiny):
    _, _, model, task, _ = tiny
    result = run_patching(model, task, ("head",), progress=False)
    pair = task.pairs[0]  # one pair alone: its own task of one line
    single = type(task)(task.path, task.metric, task.chat, (pair,))
    alone = {
        e.component: e.exact for e in run_patching(model, single, ("head",), progress=False).effects
    }
    for c, value in alone.items():
        expected = _independent_head_patch(
            model,
            torch.tensor([pair.clean_ids]),
            torch.tensor([pair.corrupted_ids]),
            c.layer,
            c.index,
            pair.answer_id,
            pair.wrong_id,
        )
        assert value == pytest.approx(expected, abs=1e-4)
    assert len(result.effects) == model.config.num_hidden_layers * model.config.num_attention_heads


def test_attribution_tracks_exact_patching(tiny):
    _, _, model, task, _ = tiny
    effects = run_patching(model, task, progress=False).effects
    exact = [e.exact for e in effects]
    estimate = [e.attribution for e in effects]
    # resid patches where clean equals corrupted are exactly 0 in both
    for e in effects:
        if e.exact == 0.0:
            assert e.attribution == pytest.approx(0.0, abs=1e-6)
    assert spearman(exact, estimate) > 0.4
    # the final layer's input at the last position: only the final norm and unembedding
    # follow, so the first-order estimate is close
    last = [e for e in effects if e.component == Component("resid", 1, -1)][0]
    assert last.attribution == pytest.approx(last.exact, abs=0.25)


def test_rank_agreement_helpers():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert top_k_overlap([5, -4, 0.1, 0.2], [3, 0.1, -6, 0.2], 2) == 0.5


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (
            {"clean": " a b", "corrupted": " a b d", "answer": " i", "wrong_answer": " b"},
            "same length",
        ),
        (
            {"clean": " a b", "corrupted": " a d", "answer": " the", "wrong_answer": " b"},
            "exactly one",
        ),
        ({"clean": " a b", "corrupted": " a d", "answer": " i"}, "either"),
        (
            {"clean": " a b", "corrupted": " a d", "answer": " i", "wrong_answer": " i"},
            "same token",
        ),
        (
            {"clean": " a b", "corrupted": " a d", "continuation": " i", "colour": 1},
            "unknown keys",
        ),
    ],
)
def test_task_files_are_refused_with_the_line(tiny, tmp_path, row, message):
    _, tokenizer, _, _, _ = tiny
    path = _write(tmp_path / "bad.jsonl", [PAIRS[0], row])
    with pytest.raises(TaskError, match=message) as error:
        load_task(path, tokenizer)
    assert ":2:" in str(error.value)


def test_continuation_tasks_use_the_loss(tiny, tmp_path):
    _, tokenizer, model, _, _ = tiny
    rows = [
        {"clean": p["clean"], "corrupted": p["corrupted"], "continuation": " i b"} for p in PAIRS
    ]
    task = load_task(_write(tmp_path / "loss.jsonl", rows), tokenizer)
    assert task.metric is MetricKind.LOSS
    longest = max(p.length for p in task.pairs)
    everything = [Component("resid", 0, p) for p in range(-longest, 0)]
    assert recovery_of_set(model, task, everything) == pytest.approx(1.0, abs=1e-5)


def test_the_command_writes_report_figures_and_spec(tiny):
    model_dir, _, _, task, folder = tiny
    out = folder / "report"
    argv = ["discover", "patch", "--model", str(model_dir), "--task", task.path, "--out", str(out)]
    assert main([*argv, "--top-k", "2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["pairs"] == 3
    assert {a["family"] for a in report["agreement"]} == {"resid", "head", "mlp"}
    assert len(report["faithfulness"]["components"]) == 2
    exact = [abs(e["exact"]) for e in report["effects"]]
    assert exact == sorted(exact, reverse=True)
    for png in ("resid.png", "heads.png", "mlp.png"):
        assert (out / png).stat().st_size > 1000
    spec = load_spec(out / "spec" / "spec.yaml")
    assert len(spec.components) == 2


def test_smollm2_capitals_task(tmp_path):
    try:
        directory = model_path("smollm2")
    except ModelNotInstalled:
        pytest.skip("SmolLM2 is not installed (circuitwatch models install smollm2)")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    task = load_task(CAPITALS_FILE, tokenizer, limit=3)
    result = run_patching(model, task, ("mlp",), progress=False)
    assert result.baseline.clean_accuracy == 1.0
    assert result.baseline.clean_mean > 2 and result.baseline.corrupted_mean < -2
    best = max(result.effects, key=lambda e: e.exact)
    assert 0.05 < best.exact <= 1.2
    assert spearman([e.exact for e in result.effects], [e.attribution for e in result.effects]) > 0

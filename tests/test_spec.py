"""Spec loading: a good spec loads; every kind of bad spec is refused with file, field, problem."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from sidecar.spec.identity import model_hash, read_model_shape
from sidecar.spec.load import SpecError, check_model, load_spec
from sidecar.spec.schema import Aggregation, AggregationKind, ComponentKind
from sidecar.spec.sites import Site, SiteKind

FAKE_HASH = "sha256:" + "ab" * 32


def good_doc(hash_: str = FAKE_HASH) -> dict:
    return {
        "version": 1,
        "model": {"name": "tiny-llama", "hash": hash_},
        "components": [
            {"name": "l1h0", "kind": "head", "site": "blocks.1.attn.hook_z", "head": 0},
            {
                "name": "l1h1_dir",
                "kind": "head",
                "site": "blocks.1.attn.hook_z",
                "head": 1,
                "direction": {"file": "dirs.safetensors", "tensor": "head_dir"},
                "bias": 0.5,
            },
            {
                "name": "probe",
                "kind": "direction",
                "site": "blocks.1.hook_resid_post",
                "direction": {"file": "dirs.safetensors", "tensor": "resid"},
                "bias": -0.3,
            },
            {
                "name": "neurons",
                "kind": "direction",
                "site": "blocks.0.mlp.hook_post",
                "direction": {"file": "mlp.safetensors", "tensor": "weight"},
            },
        ],
        "circuits": [
            {
                "name": "induction",
                "description": "previous-token + induction heads",
                "components": {"l1h0": 1.0, "probe": 0.5},
                "bias": 0.25,
                "threshold": 2.0,
            },
            {"name": "mlp_only", "components": {"neurons": -1}},
        ],
    }


def write_directions(folder: Path, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    save_file(
        {
            "head_dir": torch.randn(128, generator=gen),
            "resid": torch.randn(128, generator=gen),
            "short": torch.randn(64, generator=gen),
            "matrix": torch.randn(4, 128, generator=gen),
            "ints": torch.arange(128),
            "with_nan": torch.full((128,), float("nan")),
            "half": torch.randn(128, generator=gen).half(),
            "bf16": torch.randn(128, generator=gen).bfloat16(),
            "double": torch.randn(128, generator=gen).double(),
        },
        folder / "dirs.safetensors",
    )
    save_file({"weight": torch.randn(256, generator=gen)}, folder / "mlp.safetensors")


def write_spec(folder: Path, doc: dict, name: str = "spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


@pytest.fixture
def spec_dir(tmp_path: Path) -> Path:
    write_directions(tmp_path)
    return tmp_path


def refused(path: Path, model_dir: Path | None = None) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path, model_dir)
    error = info.value
    assert error.file == str(path)
    assert str(path) in str(error) and error.field in str(error) and error.problem in str(error)
    return error


def test_good_spec_loads(spec_dir: Path) -> None:
    spec = load_spec(write_spec(spec_dir, good_doc()))

    assert [c.name for c in spec.components] == ["l1h0", "l1h1_dir", "probe", "neurons"]
    head, head_dir, probe, neurons = spec.components
    assert head.kind is ComponentKind.HEAD and head.head == 0 and head.direction is None
    assert head.site == Site(1, SiteKind.ATTN_Z)
    assert head_dir.bias == 0.5 and head_dir.direction.dtype == np.float32
    expected = load_file(spec_dir / "dirs.safetensors")["resid"].numpy()
    assert probe.kind is ComponentKind.DIRECTION and isinstance(probe.direction, np.ndarray)
    np.testing.assert_array_equal(probe.direction, expected)
    assert probe.bias == -0.3 and neurons.direction.shape == (256,) and neurons.bias == 0.0
    assert spec.sites == (
        Site(1, SiteKind.ATTN_Z),
        Site(1, SiteKind.RESID_POST),
        Site(0, SiteKind.MLP_POST),
    )
    induction, mlp_only = spec.circuits
    assert induction.weights == (1.0, 0.0, 0.5, 0.0) and induction.bias == 0.25
    assert induction.threshold == 2.0 and induction.description.startswith("previous")
    assert mlp_only.weights == (0.0, 0.0, 0.0, -1.0) and mlp_only.threshold is None
    weights, bias = spec.weight_matrix()
    assert weights.dtype == bias.dtype == np.float32
    assert weights.shape == (2, 4) and bias.tolist() == [0.25, 0.0]
    assert spec.model.name == "tiny-llama" and spec.model.hash == FAKE_HASH
    assert spec.hash.startswith("sha256:") and len(spec.hash) == 7 + 64


@pytest.mark.parametrize("stored", ["half", "bf16", "double"])
def test_other_float_directions_become_float32_as_torch_rounds(spec_dir: Path, stored: str) -> None:
    # numpy has no bfloat16 (load.py widens its bits); float64 rounds to nearest like torch.
    doc = good_doc()
    doc["components"][2]["direction"]["tensor"] = stored
    spec = load_spec(write_spec(spec_dir, doc))
    expected = load_file(spec_dir / "dirs.safetensors")[stored].to(torch.float32).numpy()
    assert spec.components[2].direction.dtype == np.float32
    np.testing.assert_array_equal(spec.components[2].direction, expected)


def test_spec_hash_covers_spec_and_direction_files(spec_dir: Path) -> None:
    path = write_spec(spec_dir, good_doc())
    first = load_spec(path).hash
    assert load_spec(path).hash == first

    write_directions(spec_dir, seed=1)
    changed_direction = load_spec(path).hash
    assert changed_direction != first

    doc = good_doc()
    doc["circuits"][0]["bias"] = 0.5
    assert load_spec(write_spec(spec_dir, doc)).hash not in (first, changed_direction)


def test_missing_file(tmp_path: Path) -> None:
    error = refused(tmp_path / "nope.yaml")
    assert "not found" in error.problem


def test_yaml_syntax_error_names_the_line(spec_dir: Path) -> None:
    path = spec_dir / "spec.yaml"
    path.write_text("version: 1\nmodel:\n  name: x\n  hash: [unclosed\ncomponents: []\n")
    error = refused(path)
    assert "YAML syntax error at line" in error.problem


def test_duplicate_yaml_key_is_refused(spec_dir: Path) -> None:
    text = yaml.safe_dump(good_doc(), sort_keys=False) + "version: 1\n"
    path = spec_dir / "spec.yaml"
    path.write_text(text)
    error = refused(path)
    assert "duplicate key 'version'" in error.problem and "line" in error.problem


def _set(path: tuple, value):
    """A mutation of good_doc(): set the value at ``path`` (a tuple of keys / indices)."""

    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _delete(path: tuple):
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]

    return mutate


def _rename_second_component_to_first(doc: dict) -> None:
    doc["components"][1]["name"] = "l1h0"


CALIBRATION = {
    "target_fpr": 0.01,
    "achieved_fpr": {"prompt": 0.0125, "generation": 0.01},
    "requests": 400,
    "data": "benign.jsonl",
    "data_hash": "sha256:" + "1" * 64,
    "model_hash": FAKE_HASH,
    "date": "2026-11-29",
    "tool_version": "0.1.0",
}


def _aggregation(**entry):
    return _set(("circuits", 0, "aggregation"), entry)


def _calibration_without(key: str):
    return _set(("circuits", 0, "calibration"), {k: v for k, v in CALIBRATION.items() if k != key})


# (id, mutation of good_doc(), field named in the error, fragment of the problem)
# fmt: off
BAD_SPECS = [
    ("version", _set(("version",), 2), "version", "unsupported version 2"),
    ("version-text", _set(("version",), "1"), "version", "unsupported version '1'"),
    ("missing-top-key", _delete(("circuits",)), "circuits", "missing required key"),
    ("unknown-top-key", _set(("circuit",), []), "circuit", "did you mean 'circuits'"),
    ("unknown-component-key", _set(("components", 0, "haed"), 1), "components[0].haed",
     "unknown key"),
    ("missing-component-name", _delete(("components", 0, "name")), "components[0].name",
     "missing required key"),
    ("bad-name", _set(("components", 0, "name"), "L1-H0"), "components[0].name", "bad name"),
    ("bad-circuit-name", _set(("circuits", 0, "name"), "Induction"), "circuits[0].name",
     "bad name"),
    ("duplicate-component", _rename_second_component_to_first, "components[1].name",
     "duplicate name 'l1h0'"),
    ("duplicate-circuit", _set(("circuits", 1, "name"), "induction"), "circuits[1].name",
     "duplicate name 'induction'"),
    ("unknown-site", _set(("components", 2, "site"), "blocks.1.hook_resid_out"),
     "components[2].site", "unknown site"),
    ("unknown-kind", _set(("components", 0, "kind"), "neuron"), "components[0].kind",
     "unknown kind 'neuron'"),
    ("head-missing", _delete(("components", 0, "head")), "components[0].head",
     "kind head needs a head index"),
    ("head-on-direction", _set(("components", 2, "head"), 0), "components[2].head",
     "only kind head takes a head index"),
    ("head-not-hook-z", _set(("components", 0, "site"), "blocks.1.hook_resid_post"),
     "components[0].site", "kind head reads blocks.L.attn.hook_z"),
    ("head-negative", _set(("components", 0, "head"), -1), "components[0].head",
     "expected an index >= 0"),
    ("head-bias-without-direction", _set(("components", 0, "bias"), 1.0), "components[0].bias",
     "no bias"),
    ("direction-missing", _delete(("components", 2, "direction")), "components[2].direction",
     "kind direction needs one"),
    ("direction-file-missing", _set(("components", 2, "direction", "file"), "gone.safetensors"),
     "components[2].direction.file", "file not found"),
    ("direction-not-safetensors", _set(("components", 2, "direction", "file"), "dirs.pt"),
     "components[2].direction.file", "not a .safetensors file"),
    ("direction-tensor-missing", _set(("components", 2, "direction", "tensor"), "resdi"),
     "components[2].direction.tensor", "no tensor 'resdi' in dirs.safetensors"),
    ("direction-not-1d", _set(("components", 2, "direction", "tensor"), "matrix"),
     "components[2].direction.tensor", "shape [4, 128], expected 1-D"),
    ("direction-int-dtype", _set(("components", 2, "direction", "tensor"), "ints"),
     "components[2].direction.tensor", "dtype I64, expected a float dtype"),
    ("direction-non-finite", _set(("components", 2, "direction", "tensor"), "with_nan"),
     "components[2].direction.tensor", "non-finite"),
    ("direction-unknown-key", _set(("components", 2, "direction", "dtype"), "f32"),
     "components[2].direction.dtype", "unknown key"),
    ("circuit-unknown-component", _set(("circuits", 0, "components", "l1h9"), 1.0),
     "circuits[0].components.l1h9", "unknown component"),
    ("circuit-weight-inf", _set(("circuits", 0, "components", "l1h0"), float("inf")),
     "circuits[0].components.l1h0", "not a finite number"),
    ("circuit-weight-nan", _set(("circuits", 0, "components", "probe"), float("nan")),
     "circuits[0].components.probe", "not a finite number"),
    ("circuit-weight-text", _set(("circuits", 0, "components", "probe"), "1e-3"),
     "circuits[0].components.probe", "write 1.0e-3"),
    ("circuit-bias-bool", _set(("circuits", 0, "bias"), True), "circuits[0].bias",
     "expected a number"),
    ("threshold-non-finite", _set(("circuits", 0, "threshold"), float("-inf")),
     "circuits[0].threshold", "not a finite number"),
    ("component-bias-nan", _set(("components", 2, "bias"), float("nan")), "components[2].bias",
     "not a finite number"),
    ("circuit-no-components", _set(("circuits", 0, "components"), {}), "circuits[0].components",
     "non-empty mapping"),
    ("no-components", _set(("components",), []), "components", "empty"),
    ("no-circuits", _set(("circuits",), []), "circuits", "empty"),
    ("components-not-list", _set(("components",), {"l1h0": 1}), "components",
     "expected a list"),
    ("model-hash-format", _set(("model", "hash"), "md5:1234"), "model.hash",
     "expected 'sha256:' and 64 lowercase hex digits"),
    ("model-name-missing", _delete(("model", "name")), "model.name", "missing required key"),
    ("aggregation-unknown-kind", _aggregation(kind="median"), "circuits[0].aggregation.kind",
     "unknown aggregation 'median' (kinds: mean, max, last, ema_max"),
    ("aggregation-kind-missing", _aggregation(window=4), "circuits[0].aggregation.kind",
     "missing required key"),
    ("aggregation-window-missing", _aggregation(kind="max_rolling_mean"),
     "circuits[0].aggregation.window", "missing: aggregation max_rolling_mean needs it"),
    ("aggregation-window-zero", _aggregation(kind="max_rolling_mean", window=0),
     "circuits[0].aggregation.window", "must be at least 1 token"),
    ("aggregation-window-fraction", _aggregation(kind="max_rolling_mean", window=2.5),
     "circuits[0].aggregation.window", "expected an index >= 0, got float 2.5"),
    ("aggregation-alpha-missing", _aggregation(kind="ema_max"), "circuits[0].aggregation.alpha",
     "missing: aggregation ema_max needs it"),
    ("aggregation-alpha-zero", _aggregation(kind="ema_max", alpha=0.0),
     "circuits[0].aggregation.alpha", "must be in (0, 1], got 0.0"),
    ("aggregation-alpha-above-one", _aggregation(kind="ema_max", alpha=1.5),
     "circuits[0].aggregation.alpha", "must be in (0, 1], got 1.5"),
    ("aggregation-temperature-zero", _aggregation(kind="softmax_max", temperature=0.0),
     "circuits[0].aggregation.temperature", "must be > 0, got 0.0"),
    ("aggregation-temperature-negative", _aggregation(kind="softmax_max", temperature=-1.0),
     "circuits[0].aggregation.temperature", "must be > 0, got -1.0"),
    ("aggregation-parameter-on-mean", _aggregation(kind="mean", window=4),
     "circuits[0].aggregation.window", "aggregation mean takes no window"),
    ("aggregation-parameter-of-another-kind",
     _aggregation(kind="ema_max", alpha=0.5, temperature=1.0),
     "circuits[0].aggregation.temperature", "aggregation ema_max takes no temperature"),
    ("aggregation-unknown-key", _aggregation(kind="max_rolling_mean", windw=4),
     "circuits[0].aggregation.windw", "did you mean 'window'"),
    ("verdict-unknown-phase", _set(("circuits", 0, "verdict_thresholds"), {"decode": 1.0}),
     "circuits[0].verdict_thresholds.decode", "unknown key (allowed: prompt, generation)"),
    ("verdict-empty", _set(("circuits", 0, "verdict_thresholds"), {}),
     "circuits[0].verdict_thresholds", "empty: name at least one phase"),
    ("verdict-threshold-text", _set(("circuits", 0, "verdict_thresholds"), {"prompt": "high"}),
     "circuits[0].verdict_thresholds.prompt", "expected a number, got string 'high'"),
    ("verdict-threshold-nan", _set(("circuits", 0, "verdict_thresholds"), {"prompt": float("nan")}),
     "circuits[0].verdict_thresholds.prompt", "not a finite number"),
    ("calibration-missing-key", _calibration_without("data_hash"),
     "circuits[0].calibration.data_hash", "missing required key"),
    ("calibration-achieved-unknown-phase",
     _set(("circuits", 0, "calibration"), {**CALIBRATION, "achieved_fpr": {"decode": 0.01}}),
     "circuits[0].calibration.achieved_fpr.decode", "unknown key"),
    ("calibration-unknown-key", _set(("circuits", 0, "calibration"), {**CALIBRATION, "fpr": 0.1}),
     "circuits[0].calibration.fpr", "unknown key"),
]
# fmt: on


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [case[1:] for case in BAD_SPECS],
    ids=[case[0] for case in BAD_SPECS],
)
def test_bad_spec_is_refused(spec_dir: Path, mutate, field: str, problem: str) -> None:
    doc = copy.deepcopy(good_doc())
    mutate(doc)
    error = refused(write_spec(spec_dir, doc))
    assert error.field == field
    assert problem in error.problem


def test_aggregation_verdict_thresholds_and_calibration_load(spec_dir: Path) -> None:
    doc = good_doc()
    doc["circuits"][0].update(
        aggregation={"kind": "max_rolling_mean", "window": 16},
        verdict_thresholds={"prompt": 1.5, "generation": 2.0},
        calibration=CALIBRATION,
    )
    doc["circuits"][1]["aggregation"] = {"kind": "softmax_max", "temperature": 0.5}
    induction, mlp_only = load_spec(write_spec(spec_dir, doc)).circuits
    assert induction.aggregation == Aggregation(AggregationKind.MAX_ROLLING_MEAN, window=16)
    assert induction.verdict_thresholds == (("prompt", 1.5), ("generation", 2.0))
    assert induction.calibration.achieved_fpr == (("prompt", 0.0125), ("generation", 0.01))
    assert (induction.calibration.requests, induction.calibration.date) == (400, "2026-11-29")
    assert mlp_only.aggregation == Aggregation(AggregationKind.SOFTMAX_MAX, temperature=0.5)
    assert mlp_only.verdict_thresholds == () and mlp_only.calibration is None


def test_not_a_safetensors_file(spec_dir: Path) -> None:
    (spec_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    doc = good_doc()
    doc["components"][2]["direction"]["file"] = "broken.safetensors"
    error = refused(write_spec(spec_dir, doc))
    assert error.field == "components[2].direction.file"
    assert "not a safetensors file" in error.problem


def test_top_level_not_a_mapping(spec_dir: Path) -> None:
    path = spec_dir / "spec.yaml"
    path.write_text("- just\n- a list\n")
    assert "expected a mapping" in refused(path).problem


# --- checks against a model directory ---------------------------------------------------------


def test_spec_for_this_model_loads_with_model_dir(spec_dir: Path, tiny_llama_dir: Path) -> None:
    spec = load_spec(write_spec(spec_dir, good_doc(model_hash(tiny_llama_dir))), tiny_llama_dir)
    assert len(spec.components) == 4


# What only the model shows: (id, mutation of good_doc(), field, fragment of the problem)
# fmt: off
MODEL_MISFITS = [
    ("head-out-of-range", _set(("components", 0, "head"), 2), "components[0].head",
     "head 2 out of range: the model has 2 heads"),
    ("layer-out-of-range", _set(("components", 2, "site"), "blocks.2.hook_resid_post"),
     "components[2].site", "layer 2 out of range: the model has 2 layers"),
    ("width", _set(("components", 2, "direction", "tensor"), "short"), "components[2].direction",
     "direction has 64 values, but site blocks.1.hook_resid_post has width 128"),
    ("width-mlp-vs-resid", _set(("components", 3, "site"), "blocks.0.hook_resid_mid"),
     "components[3].direction",
     "direction has 256 values, but site blocks.0.hook_resid_mid has width 128"),
    ("head-width", _set(("components", 1, "direction", "tensor"), "short"),
     "components[1].direction", "a head's output (d_model) has width 128"),
]
# fmt: on


@pytest.mark.parametrize(
    ("mutate", "field", "problem"),
    [case[1:] for case in MODEL_MISFITS],
    ids=[case[0] for case in MODEL_MISFITS],
)
def test_spec_that_does_not_fit_the_model(
    spec_dir: Path, tiny_llama_dir: Path, mutate, field: str, problem: str
) -> None:
    doc = good_doc(model_hash(tiny_llama_dir))
    mutate(doc)
    path = write_spec(spec_dir, doc)
    load_spec(path)  # fine on its own: only the model shows the problem
    error = refused(path, tiny_llama_dir)
    assert error.field == field
    assert problem in error.problem


def test_spec_for_another_model_is_refused(spec_dir: Path, tiny_llama_dir: Path) -> None:
    path = write_spec(spec_dir, good_doc(FAKE_HASH))
    error = refused(path, tiny_llama_dir)
    assert error.field == "model.hash"
    assert error.problem.startswith(f"spec was made for model tiny-llama ({FAKE_HASH})")
    assert error.problem.endswith(f"is {model_hash(tiny_llama_dir)}")

    spec = load_spec(path)
    with pytest.raises(SpecError, match="spec was made for model tiny-llama"):
        check_model(spec, tiny_llama_dir)


def test_check_model_without_config(spec_dir: Path, tmp_path_factory) -> None:
    spec = load_spec(write_spec(spec_dir, good_doc()))
    with pytest.raises(SpecError, match="cannot check the model: .*config.json"):
        check_model(spec, tmp_path_factory.mktemp("empty"))


# --- model identity ---------------------------------------------------------------------------


def copy_model(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_model_hash_is_stable_across_copies(tiny_llama_dir: Path, tmp_path: Path) -> None:
    digest = model_hash(tiny_llama_dir)
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert model_hash(tiny_llama_dir) == digest
    assert model_hash(copy_model(tiny_llama_dir, tmp_path / "copy")) == digest


def test_model_hash_ignores_who_wrote_the_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "copy")
    config = json.loads((model_dir / "config.json").read_text())
    config["transformers_version"] = "4.0.0"
    (model_dir / "config.json").write_text(json.dumps(config, indent=4))  # other formatting
    assert model_hash(model_dir) == model_hash(tiny_llama_dir)


def test_model_hash_sees_config_changes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "copy")
    config = json.loads((model_dir / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (model_dir / "config.json").write_text(json.dumps(config))
    assert model_hash(model_dir) != model_hash(tiny_llama_dir)


def test_model_hash_sees_retrained_weights(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "copy")
    weights = load_file(model_dir / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    retrained = {name: torch.randn(t.shape, generator=gen) for name, t in weights.items()}
    save_file(retrained, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert model_hash(model_dir) != model_hash(tiny_llama_dir)


def test_model_hash_sees_one_edited_tensor(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "copy")
    weights = load_file(model_dir / "model.safetensors")
    weights["model.layers.1.self_attn.o_proj.weight"] *= 2  # 64 KiB of a 1.6 MB file
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert model_hash(model_dir) != model_hash(tiny_llama_dir)


def test_model_hash_sees_a_dtype_change(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(tiny_llama_dir, tmp_path / "copy")
    weights = load_file(model_dir / "model.safetensors")
    halved = {name: t.half() for name, t in weights.items()}
    save_file(halved, model_dir / "model.safetensors", metadata={"format": "pt"})
    assert model_hash(model_dir) != model_hash(tiny_llama_dir)


def test_dummy_model_dir_hashes_its_config(tiny_llama_dir: Path, tmp_path: Path) -> None:
    dummy = tmp_path / "dummy"
    dummy.mkdir()
    shutil.copy(tiny_llama_dir / "config.json", dummy / "config.json")
    digest = model_hash(dummy)
    assert digest.startswith("sha256:") and digest == model_hash(dummy)
    assert digest != model_hash(tiny_llama_dir)


def test_read_model_shape(tiny_llama_dir: Path, tmp_path: Path) -> None:
    shape = read_model_shape(tiny_llama_dir)
    assert (shape.architecture, shape.n_layers, shape.d_model) == ("LlamaForCausalLM", 2, 128)
    assert (shape.n_heads, shape.n_kv_heads, shape.d_head, shape.d_mlp) == (2, 2, 64, 256)
    assert shape.width(Site(0, SiteKind.ATTN_Z)) == 128
    assert shape.width(Site(0, SiteKind.MLP_POST)) == 256

    config = json.loads((tiny_llama_dir / "config.json").read_text())
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "architectures": ["GPT2LMHeadModel"]})
    )
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        read_model_shape(tmp_path)

    del config["head_dim"]
    config["architectures"] = ["Qwen2ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_model_shape(tmp_path).d_head == 64  # hidden_size / num_attention_heads


def _spec_beside_directions(tmp_path: Path, file: str) -> Path:
    """A spec in tmp_path/spec whose third component's direction file is ``file``; valid
    direction files lie both in tmp_path (outside the spec's folder) and in tmp_path/spec."""
    folder = tmp_path / "spec"
    folder.mkdir()
    write_directions(tmp_path)
    write_directions(folder)
    doc = good_doc()
    doc["components"][2]["direction"]["file"] = file
    return write_spec(folder, doc)


@pytest.mark.parametrize(
    "file", ["../dirs.safetensors", "sub/../../dirs.safetensors", "{outside}/dirs.safetensors"]
)
def test_a_direction_file_outside_the_spec_folder_is_refused(tmp_path: Path, file: str) -> None:
    path = _spec_beside_directions(tmp_path, file.format(outside=tmp_path))
    error = refused(path)
    assert error.field == "components[2].direction.file"
    assert "outside the spec's folder" in error.problem


def test_an_absolute_direction_file_is_refused_even_inside_the_folder(tmp_path: Path) -> None:
    path = _spec_beside_directions(tmp_path, str(tmp_path / "spec" / "dirs.safetensors"))
    assert refused(path).field == "components[2].direction.file"


def test_a_symlink_out_of_the_spec_folder_is_refused(tmp_path: Path) -> None:
    path = _spec_beside_directions(tmp_path, "linked.safetensors")
    (path.parent / "linked.safetensors").symlink_to(tmp_path / "dirs.safetensors")
    error = refused(path)
    assert error.field == "components[2].direction.file"
    assert "outside the spec's folder" in error.problem


def test_direction_files_in_subfolders_and_symlinks_within_the_folder_load(tmp_path: Path) -> None:
    path = _spec_beside_directions(tmp_path, "sub/linked.safetensors")
    (path.parent / "sub").mkdir()
    (path.parent / "sub" / "linked.safetensors").symlink_to(path.parent / "dirs.safetensors")
    expected = load_file(path.parent / "dirs.safetensors")["resid"]
    np.testing.assert_array_equal(load_spec(path).components[2].direction, expected.numpy())


@pytest.mark.parametrize(
    "tag",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/new:pathlib.Path ['{marker}']",
        "!!python/name:os.system",
    ],
)
def test_yaml_python_tags_are_refused_and_never_run(spec_dir: Path, tag: str) -> None:
    marker = spec_dir / "ran"
    path = spec_dir / "spec.yaml"
    text = yaml.safe_dump(good_doc(), sort_keys=False)
    path.write_text(text.replace("name: tiny-llama", f"name: {tag.format(marker=marker)}", 1))
    error = refused(path)
    assert "YAML" in error.problem and "python" in error.problem
    assert not marker.exists()


def test_a_pickle_named_like_safetensors_is_refused(spec_dir: Path) -> None:
    # torch.save writes a zip of pickles: loading it would run code; the safetensors reader
    # refuses it as not being safetensors.
    torch.save({"resid": torch.randn(128)}, spec_dir / "pickled.safetensors")
    doc = good_doc()
    doc["components"][2]["direction"]["file"] = "pickled.safetensors"
    error = refused(write_spec(spec_dir, doc))
    assert error.field == "components[2].direction.file"
    assert "not a safetensors file" in error.problem

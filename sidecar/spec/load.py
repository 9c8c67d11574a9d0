"""Load a circuit spec YAML file (format: FORMAT.md) into a validated ``CircuitSpec``.

Every problem raises ``SpecError`` naming the file, the field path (``components[1].head``)
and what is wrong, so a typo fails at load time and not as a silent zero in production.
With a model directory, ``check_model`` also checks layers, heads, direction widths and the
model hash against that model; the plugin calls it again with the model vLLM serves.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open

from sidecar.spec.fields import FieldReader, SpecError, describe, format_spec_error
from sidecar.spec.identity import ModelShape, model_hash, read_model_shape
from sidecar.spec.schema import (
    PHASE_NAMES,
    Aggregation,
    AggregationKind,
    Calibration,
    Circuit,
    CircuitSpec,
    Component,
    ComponentKind,
    ModelIdentity,
)
from sidecar.spec.sites import Site, SiteKind

__all__ = ["SpecError", "check_model", "check_shape", "format_spec_error", "load_spec"]

SUPPORTED_VERSIONS = (1,)
MODEL_HASH_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def load_spec(path: str | Path, model_dir: str | Path | None = None) -> CircuitSpec:
    """Read and validate ``path``; with ``model_dir`` also ``check_model`` against that model."""
    path = Path(path)
    fields = FieldReader(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise fields.error("", "spec file not found") from None
    except OSError as e:
        raise fields.error("", f"cannot read the spec file: {e.strerror}") from None
    doc = fields.mapping("", fields.parse(raw), ("version", "model", "components", "circuits"))
    version = doc["version"]
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise fields.error("version", f"unsupported version {version!r}: this loader reads 1")
    directions = _DirectionFiles(fields)
    components = _components(fields, doc["components"], directions)
    spec = CircuitSpec(
        path=path,
        model=_model(fields, doc["model"]),
        components=components,
        circuits=_circuits(fields, doc["circuits"], [c.name for c in components]),
        hash=directions.spec_hash(raw),
    )
    if model_dir is not None:
        check_model(spec, model_dir)
    return spec


def check_model(spec: CircuitSpec, model_dir: str | Path) -> None:
    """Refuse ``spec`` unless it was made for the model in ``model_dir`` and fits its shape."""
    try:
        shape = read_model_shape(model_dir)
        actual = model_hash(model_dir)
    except (OSError, ValueError) as e:
        raise SpecError(spec.path, "model", f"cannot check the model: {e}") from None
    if actual != spec.model.hash:
        raise SpecError(
            spec.path,
            "model.hash",
            f"spec was made for model {spec.model.name} ({spec.model.hash}), "
            f"this model ({model_dir}) is {actual}",
        )
    check_shape(spec, shape)


def check_shape(spec: CircuitSpec, shape: ModelShape) -> None:
    """Check layers, heads and direction widths against ``shape`` (no hash: no weights read)."""
    for i, component in enumerate(spec.components):
        field = f"components[{i}]"
        site = component.site
        if site.layer >= shape.n_layers:
            raise SpecError(
                spec.path,
                f"{field}.site",
                f"layer {site.layer} out of range: the model has {shape.n_layers} layers "
                f"(0..{shape.n_layers - 1})",
            )
        if component.head is not None and component.head >= shape.n_heads:
            raise SpecError(
                spec.path,
                f"{field}.head",
                f"head {component.head} out of range: the model has {shape.n_heads} heads "
                f"(0..{shape.n_heads - 1})",
            )
        if component.direction is not None:
            of_head = component.kind is ComponentKind.HEAD
            width = shape.d_model if of_head else shape.width(site)
            if component.direction.shape[0] != width:
                reads = "a head's output (d_model)" if of_head else f"site {site.name}"
                raise SpecError(
                    spec.path,
                    f"{field}.direction",
                    f"direction has {component.direction.shape[0]} values, but {reads} "
                    f"has width {width} in this model",
                )


def _model(fields: FieldReader, value: object) -> ModelIdentity:
    model = fields.mapping("model", value, ("name", "hash"))
    digest = fields.string("model.hash", model["hash"])
    if not MODEL_HASH_RE.match(digest):
        raise fields.error(
            "model.hash", f"expected 'sha256:' and 64 lowercase hex digits, got {digest!r}"
        )
    return ModelIdentity(name=fields.string("model.name", model["name"]), hash=digest)


def _components(
    fields: FieldReader, value: object, directions: _DirectionFiles
) -> tuple[Component, ...]:
    components = []
    for i, item in enumerate(fields.items("components", value)):
        field = f"components[{i}]"
        entry = fields.mapping(field, item, ("name", "kind", "site"), ("head", "direction", "bias"))
        name = fields.name(f"{field}.name", entry["name"])
        kinds = [k.value for k in ComponentKind]
        if entry["kind"] not in kinds:
            raise fields.error(
                f"{field}.kind", f"unknown kind {entry['kind']!r} (kinds: {', '.join(kinds)})"
            )
        kind = ComponentKind(entry["kind"])
        try:
            site = Site.parse(fields.string(f"{field}.site", entry["site"]))
        except ValueError as e:
            raise fields.error(f"{field}.site", str(e)) from None
        head = None
        if kind is ComponentKind.HEAD:
            if site.kind is not SiteKind.ATTN_Z:
                raise fields.error(
                    f"{field}.site", f"kind head reads blocks.L.attn.hook_z, got {site.name}"
                )
            if "head" not in entry:
                raise fields.error(f"{field}.head", "missing: kind head needs a head index")
            head = fields.index(f"{field}.head", entry["head"])
            if "bias" in entry and "direction" not in entry:
                raise fields.error(
                    f"{field}.bias", "a head without a direction reads ||c||, which has no bias"
                )
        else:
            if "head" in entry:
                raise fields.error(f"{field}.head", "only kind head takes a head index")
            if "direction" not in entry:
                raise fields.error(f"{field}.direction", "missing: kind direction needs one")
        direction = None
        if "direction" in entry:
            direction = directions.load(f"{field}.direction", entry["direction"])
        bias = fields.number(f"{field}.bias", entry["bias"]) if "bias" in entry else 0.0
        components.append(Component(name, kind, site, head, direction, bias))
    fields.unique("components", [c.name for c in components])
    return tuple(components)


def _circuits(
    fields: FieldReader, value: object, component_names: list[str]
) -> tuple[Circuit, ...]:
    circuits = []
    for i, item in enumerate(fields.items("circuits", value)):
        field = f"circuits[{i}]"
        entry = fields.mapping(
            field,
            item,
            ("name", "components"),
            (
                "description",
                "bias",
                "threshold",
                "aggregation",
                "verdict_thresholds",
                "calibration",
            ),
        )
        uses = entry["components"]
        if not isinstance(uses, dict) or not uses:
            raise fields.error(
                f"{field}.components",
                f"expected a non-empty mapping of component: weight, got {describe(uses)}",
            )
        weights = [0.0] * len(component_names)
        for used, weight in uses.items():
            if used not in component_names:
                raise fields.error(
                    f"{field}.components.{used}",
                    f"unknown component (components: {', '.join(component_names)})",
                )
            weights[component_names.index(used)] = fields.number(
                f"{field}.components.{used}", weight
            )
        description = entry.get("description", "")
        if not isinstance(description, str):
            raise fields.error(
                f"{field}.description", f"expected text, got {describe(description)}"
            )
        threshold = None
        if "threshold" in entry:
            threshold = fields.number(f"{field}.threshold", entry["threshold"])
        circuits.append(
            Circuit(
                name=fields.name(f"{field}.name", entry["name"]),
                weights=tuple(weights),
                bias=fields.number(f"{field}.bias", entry["bias"]) if "bias" in entry else 0.0,
                description=description,
                threshold=threshold,
                aggregation=_aggregation(fields, f"{field}.aggregation", entry.get("aggregation")),
                verdict_thresholds=_per_phase(
                    fields, f"{field}.verdict_thresholds", entry.get("verdict_thresholds")
                ),
                calibration=_calibration(fields, f"{field}.calibration", entry.get("calibration")),
            )
        )
    fields.unique("circuits", [c.name for c in circuits])
    return tuple(circuits)


# What each aggregation kind takes besides ``kind``, and the range of each parameter.
_AGGREGATION_PARAMETERS = {
    AggregationKind.MAX_ROLLING_MEAN: ("window",),
    AggregationKind.EMA_MAX: ("alpha",),
    AggregationKind.SOFTMAX_MAX: ("temperature",),
}


def _aggregation(fields: FieldReader, field: str, value: object) -> Aggregation:
    if value is None:
        return Aggregation()
    entry = fields.mapping(field, value, ("kind",), ("window", "alpha", "temperature"))
    kinds = [k.value for k in AggregationKind]
    if entry["kind"] not in kinds:
        raise fields.error(
            f"{field}.kind", f"unknown aggregation {entry['kind']!r} (kinds: {', '.join(kinds)})"
        )
    kind = AggregationKind(entry["kind"])
    takes = _AGGREGATION_PARAMETERS.get(kind, ())
    for key in ("window", "alpha", "temperature"):
        if key in takes and key not in entry:
            raise fields.error(f"{field}.{key}", f"missing: aggregation {kind.value} needs it")
        if key in entry and key not in takes:
            raise fields.error(f"{field}.{key}", f"aggregation {kind.value} takes no {key}")
    window = fields.index(f"{field}.window", entry["window"]) if "window" in entry else 0
    if "window" in entry and window < 1:
        raise fields.error(f"{field}.window", "must be at least 1 token")
    alpha = fields.number(f"{field}.alpha", entry["alpha"]) if "alpha" in entry else 0.0
    if "alpha" in entry and not 0.0 < alpha <= 1.0:
        raise fields.error(f"{field}.alpha", f"must be in (0, 1], got {alpha}")
    temperature = 0.0
    if "temperature" in entry:
        temperature = fields.number(f"{field}.temperature", entry["temperature"])
        if temperature <= 0.0:
            raise fields.error(f"{field}.temperature", f"must be > 0, got {temperature}")
    return Aggregation(kind=kind, window=window, alpha=alpha, temperature=temperature)


def _per_phase(fields: FieldReader, field: str, value: object) -> tuple[tuple[str, float], ...]:
    """A mapping from phase name to a number (either phase may be left out)."""
    if value is None:
        return ()
    entry = fields.mapping(field, value, (), PHASE_NAMES)
    if not entry:
        raise fields.error(field, f"empty: name at least one phase ({', '.join(PHASE_NAMES)})")
    return tuple((phase, fields.number(f"{field}.{phase}", entry[phase])) for phase in entry)


def _calibration(fields: FieldReader, field: str, value: object) -> Calibration | None:
    if value is None:
        return None
    keys = ("target_fpr", "achieved_fpr", "requests", "data", "data_hash", "model_hash", "date",
            "tool_version")  # fmt: skip
    entry = fields.mapping(field, value, keys)
    return Calibration(
        target_fpr=fields.number(f"{field}.target_fpr", entry["target_fpr"]),
        achieved_fpr=_per_phase(fields, f"{field}.achieved_fpr", entry["achieved_fpr"]),
        requests=fields.index(f"{field}.requests", entry["requests"]),
        data=fields.string(f"{field}.data", entry["data"]),
        data_hash=fields.string(f"{field}.data_hash", entry["data_hash"]),
        model_hash=fields.string(f"{field}.model_hash", entry["model_hash"]),
        date=fields.string(f"{field}.date", str(entry["date"])),
        tool_version=fields.string(f"{field}.tool_version", entry["tool_version"]),
    )


class _DirectionFiles:
    """Reads direction tensors relative to the spec's folder and hashes every file it read.

    Directions load as numpy arrays, never torch tensors: the sidecar loads specs too, and
    its image has no torch. The engine side converts with ``torch.from_numpy`` once, when it
    builds its reducers.
    """

    def __init__(self, fields: FieldReader):
        self._fields = fields
        self._digests: dict[str, bytes] = {}  # file name as written -> sha256, first-use order

    def load(self, field: str, value: object) -> np.ndarray:
        fields = self._fields
        entry = fields.mapping(field, value, ("file", "tensor"))
        name = fields.string(f"{field}.file", entry["file"])
        tensor_name = fields.string(f"{field}.tensor", entry["tensor"])
        path = fields.file.parent / name
        if path.suffix != ".safetensors":
            raise fields.error(
                f"{field}.file", f"{name}: not a .safetensors file (tensors never load from pickle)"
            )
        # A spec is a folder that travels whole: it reads nothing from outside it (no
        # absolute path, no '..', no symlink out), so loading one cannot read other files.
        folder = fields.file.parent.resolve()
        if Path(name).is_absolute() or not path.resolve().is_relative_to(folder):
            raise fields.error(
                f"{field}.file",
                f"{name}: outside the spec's folder {folder} (give a path inside it)",
            )
        if not path.is_file():
            raise fields.error(f"{field}.file", f"{name}: file not found (looked at {path})")
        try:
            with safe_open(path, framework="np") as tensors:
                if tensor_name not in tensors.keys():
                    have = ", ".join(sorted(tensors.keys())) or "none"
                    raise fields.error(
                        f"{field}.tensor", f"no tensor {tensor_name!r} in {name} (has: {have})"
                    )
                stored = tensors.get_slice(tensor_name)
                dtype, shape = stored.get_dtype(), stored.get_shape()
                label = f"{name}:{tensor_name}"
                if dtype not in _FLOAT_DTYPES:
                    raise fields.error(
                        f"{field}.tensor",
                        f"{label} has dtype {dtype}, expected a float dtype "
                        f"({', '.join(_FLOAT_DTYPES)})",
                    )
                if len(shape) != 1 or shape[0] == 0:
                    raise fields.error(
                        f"{field}.tensor", f"{label} has shape {shape}, expected 1-D and non-empty"
                    )
                if dtype == "BF16":
                    vector = _read_bfloat16(path, tensor_name)
                else:
                    vector = tensors.get_tensor(tensor_name)
        except SafetensorError as e:
            raise fields.error(f"{field}.file", f"{name}: not a safetensors file ({e})") from None
        if name not in self._digests:
            self._digests[name] = hashlib.sha256(path.read_bytes()).digest()
        # A float32 copy: the same rounding as torch's .to(float32) for F64, exact for the rest.
        vector = np.array(vector, dtype=np.float32, order="C")
        if not np.isfinite(vector).all():
            raise fields.error(f"{field}.tensor", f"{label} holds non-finite values (nan or inf)")
        return vector

    def spec_hash(self, spec_bytes: bytes) -> str:
        """sha256 over the spec file's bytes and every direction file's name and bytes."""
        digest = hashlib.sha256(hashlib.sha256(spec_bytes).digest())
        for name, file_digest in self._digests.items():
            encoded = name.encode()
            digest.update(struct.pack("<Q", len(encoded)) + encoded + file_digest)
        return f"sha256:{digest.hexdigest()}"


# safetensors dtype names a direction may have; numpy has no bfloat16, so BF16 is widened here.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _read_bfloat16(path: Path, tensor_name: str) -> np.ndarray:
    """A BF16 tensor as float32: bfloat16 is the top half of a float32's bits (exact)."""
    with path.open("rb") as f:
        (header_size,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(header_size))[tensor_name]["data_offsets"]
        f.seek(8 + header_size + begin)
        raw = np.frombuffer(f.read(end - begin), dtype="<u2")
    return (raw.astype(np.uint32) << 16).view(np.float32)

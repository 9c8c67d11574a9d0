"""Model identity: a fast fingerprint of a model directory, and its shape from config.json.

A spec is made for one model; ``model_hash`` lets the loader, the plugin and the sidecar
refuse a spec meant for another model, and ``read_model_shape`` gives the sizes that site
widths, layer and head indices are checked against.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sidecar.spec.sites import Site

# Architectures whose HF and vLLM module trees use Llama's names (model.layers[L].self_attn.
# o_proj, mlp.down_proj, ...) with the same meaning, so every site maps the same way.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# config.json keys that record who wrote the file, not what the model computes: re-saving the
# same weights with another transformers version must not change the model's identity.
_PROVENANCE_KEYS = ("transformers_version", "_name_or_path")

_PICKLED_SUFFIXES = (".bin", ".pt", ".pth")
_CHUNKS = 16
_CHUNK_BYTES = 4096
_TENSOR_SAMPLE_BYTES = 256


def model_hash(model_dir: str | Path) -> str:
    """Fingerprint of a model directory, ``"sha256:<hex>"``, in milliseconds even for 16 GB.

    Hashed, in order: config.json canonicalised (JSON with sorted keys, compact separators,
    without the provenance keys ``transformers_version`` and ``_name_or_path``); then for each
    ``*.safetensors`` file, sorted by name: its name, its size, its whole header (the 8-byte
    length and the JSON table of tensor names, dtypes, shapes and offsets), 16 evenly
    spaced 4 KiB chunks of its data section (all of it when smaller) and up to 256 bytes from
    the middle of every tensor; then for each pickled weight file (``*.bin``, ``*.pt``,
    ``*.pth``; never unpickled) its name, its size and 16 evenly spaced 4 KiB chunks.

    It tells apart different architectures (config), different tensor shapes or dtypes
    (headers) and different weights (sampled data), down to one edited tensor: the per-tensor
    samples catch a single replaced or edited matrix (e.g. a ROME-style edit) that the 16
    chunks would miss in a large file. It is not a checksum: a few changed bytes outside the
    samples go unnoticed. A directory with config.json and no weights (vLLM's
    ``load_format="dummy"``) hashes its config only. A 16 GB model with ~300 tensors reads
    about 150 KiB.
    """
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    digest.update(_canonical_config(model_dir))
    for weights in sorted(model_dir.glob("*.safetensors")):
        digest.update(_field(weights.name.encode()))
        digest.update(_safetensors_fingerprint(weights))
    for suffix in _PICKLED_SUFFIXES:
        for weights in sorted(model_dir.glob(f"*{suffix}")):
            digest.update(_field(weights.name.encode()))
            size = weights.stat().st_size
            with weights.open("rb") as f:
                digest.update(struct.pack("<Q", size) + _sample(f, 0, size))
    return f"sha256:{digest.hexdigest()}"


def _field(data: bytes) -> bytes:
    """Length-prefixed, so that no two different sequences of fields hash the same bytes."""
    return struct.pack("<Q", len(data)) + data


def _canonical_config(model_dir: Path) -> bytes:
    config = _read_config(model_dir)
    for key in _PROVENANCE_KEYS:
        config.pop(key, None)
    return _field(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


def _safetensors_fingerprint(path: Path) -> bytes:
    size = path.stat().st_size
    parts = [struct.pack("<Q", size)]
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        data_start = 8 + header_len
        if data_start > size:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len} > size)")
        header = f.read(header_len)
        parts.append(_field(header))
        parts.append(_sample(f, data_start, size - data_start))
        for begin, end in _tensor_extents(path, header):
            middle = data_start + (begin + end) // 2
            f.seek(max(data_start + begin, middle - _TENSOR_SAMPLE_BYTES // 2))
            parts.append(f.read(min(end - begin, _TENSOR_SAMPLE_BYTES)))
    return b"".join(parts)


def _tensor_extents(path: Path, header: bytes) -> list[tuple[int, int]]:
    """Each tensor's [begin, end) in the data section, in file order."""
    try:
        table = json.loads(header)
        extents = sorted(
            tuple(entry["data_offsets"]) for name, entry in table.items() if name != "__metadata__"
        )
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{path}: not a safetensors file (unreadable header)") from None
    return extents


def _sample(f: BinaryIO, start: int, length: int) -> bytes:
    """``length`` bytes from ``start``, or 16 evenly spaced 4 KiB chunks of them."""
    if length <= _CHUNKS * _CHUNK_BYTES:
        f.seek(start)
        return f.read(length)
    span = length - _CHUNK_BYTES
    chunks = []
    for i in range(_CHUNKS):
        f.seek(start + span * i // (_CHUNKS - 1))
        chunks.append(f.read(_CHUNK_BYTES))
    return b"".join(chunks)


def _read_config(model_dir: Path) -> dict:
    path = model_dir / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing, not a Hugging Face model directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int

    def width(self, site: Site) -> int:
        """Features per token at ``site`` in this model."""
        return site.width(self.d_model, self.n_heads, self.d_head, self.d_mlp)


def read_model_shape(model_dir: str | Path) -> ModelShape:
    """The sizes in ``model_dir``/config.json; ValueError for an architecture we cannot map."""
    model_dir = Path(model_dir)
    try:
        return shape_from_config(_read_config(model_dir))
    except ValueError as e:
        raise ValueError(f"{model_dir / 'config.json'}: {e}") from None


def shape_from_config(config: dict) -> ModelShape:
    """The sizes in a config.json dictionary (the plugin passes vLLM's ``hf_config.to_dict()``)."""
    architectures = config.get("architectures") or []
    supported = [a for a in architectures if a in SUPPORTED_ARCHITECTURES]
    if not supported:
        raise ValueError(
            f"unsupported architecture {architectures or 'none given'}: "
            f"Circuitwatch maps sites for {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    try:
        d_model = int(config["hidden_size"])
        n_heads = int(config["num_attention_heads"])
        return ModelShape(
            architecture=supported[0],
            n_layers=int(config["num_hidden_layers"]),
            d_model=d_model,
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            d_head=int(config.get("head_dim") or d_model // n_heads),
            d_mlp=int(config["intermediate_size"]),
        )
    except KeyError as e:
        raise ValueError(f"config has no {e.args[0]!r}") from None

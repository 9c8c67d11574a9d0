"""Regenerates the Python stubs in this folder from ``protos/`` (grpcio-tools).

Run ``python -m sidecar.protocol.generate`` after editing a .proto; a test checks that
the committed stubs are current. protoc writes absolute imports rooted at the proto
path (``from circuitwatch.v1 import ...``); they are rewritten to live under this package.
"""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parents[2] / "protos"
OUT_ROOT = Path(__file__).resolve().parent
PROTOS = ("circuitwatch/v1/ingest.proto",)
_ROOTED_IMPORT = re.compile(r"^from circuitwatch\.", flags=re.M)


def generate(out_root: Path = OUT_ROOT) -> list[Path]:
    """Write *_pb2.py and *_pb2_grpc.py for every proto under ``out_root``; return their paths."""
    from grpc_tools import protoc  # build-time dependency only

    with tempfile.TemporaryDirectory() as tmp:
        args = ["protoc", f"-I{PROTO_ROOT}", f"--python_out={tmp}", f"--grpc_python_out={tmp}"]
        if protoc.main(args + list(PROTOS)) != 0:
            raise RuntimeError(f"protoc failed on {PROTOS} under {PROTO_ROOT}")
        written = []
        for src in sorted(Path(tmp).rglob("*.py")):
            rel = src.relative_to(tmp)
            text = _ROOTED_IMPORT.sub("from sidecar.protocol.circuitwatch.", src.read_text())
            dest = out_root / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(text)
            written.append(dest)
    for pkg in {p.parent for p in written} | {out_root / "circuitwatch"}:
        (pkg / "__init__.py").touch()
    return written


if __name__ == "__main__":
    for path in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else OUT_ROOT):
        print(path)

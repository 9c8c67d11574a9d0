#!/bin/sh
# Install the circuitwatch sidecar alone into the Python environment of PYTHON (default python3):
# the wheel without its dependencies (torch, vLLM, transformers are for the engine side), then
# the [sidecar] extra's requirements, read from the installed wheel's own metadata so the list
# lives in one place (pyproject.toml). Used by Containerfile.sidecar and check_sidecar_install.sh.
#
#   deploy/install_sidecar.sh dist/circuitwatch-0.1.0-py3-none-any.whl [PYTHON]
set -eu
wheel=$1
python=${2:-python3}
"$python" -m pip install --no-cache-dir --no-deps "$wheel"
requirements=$(mktemp)
"$python" - >"$requirements" <<'PY'
from importlib.metadata import requires

for requirement in requires("circuitwatch") or ():
    spec, _, marker = requirement.partition(";")
    if marker.replace(" ", "").replace("'", '"') == 'extra=="sidecar"':
        print(spec.strip())
PY
if [ ! -s "$requirements" ]; then
    echo "install_sidecar.sh: the wheel declares no [sidecar] extra" >&2
    exit 1
fi
"$python" -m pip install --no-cache-dir -r "$requirements"
rm -f "$requirements"

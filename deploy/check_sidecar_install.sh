#!/bin/sh
# What Containerfile.sidecar does, without a container runtime: build this repository's
# wheel, install it into a fresh venv the way the image does (deploy/install_sidecar.sh),
# then check that torch, vLLM and transformers are absent, that `circuitwatch serve --help`
# runs, and that a real `circuitwatch serve` on the bundled reference spec starts, answers
# the chart's health probe (files/healthcheck.py) and /metrics, and stops with status 0 on
# SIGTERM. Prints the installed size of site-packages. Takes about a minute with a warm
# wheel cache; needs the package index pip is configured with.
#
#   deploy/check_sidecar_install.sh [PYTHON]     (PYTHON: a 3.10+ interpreter, default python3)
set -eu
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${1:-python3}
work=$(mktemp -d)
server=""
cleanup() {
    if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '== %s\n' "$*"; }

step "wheel"
"$python" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" "$repo"
wheel=$(ls "$work"/dist/circuitwatch-*.whl)

step "fresh venv + install_sidecar.sh"
"$python" -m venv "$work/venv"
venv_python="$work/venv/bin/python"
"$repo/deploy/install_sidecar.sh" "$wheel" "$venv_python" >"$work/install.log" 2>&1 \
    || { cat "$work/install.log"; exit 1; }

cd "$work"  # never import the repository's own tree
step "no torch, vLLM or transformers installed"
"$venv_python" - <<'PY'
import importlib.util, sys
present = [m for m in ("torch", "vllm", "transformers", "triton") if importlib.util.find_spec(m)]
sys.exit(f"installed but must not be: {present}" if present else 0)
PY
"$venv_python" -c "import sidecar, sys; assert sidecar.__file__.startswith(sys.prefix), sidecar.__file__"

step "circuitwatch serve --help"
"$work/venv/bin/circuitwatch" serve --help >/dev/null

step "circuitwatch serve: start, health, /metrics, SIGTERM"
port=$("$venv_python" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$work/venv/bin/circuitwatch" serve --spec "$repo/sidecar/models/reference_spec/spec.yaml" \
    --model-dir "$repo/sidecar/models/reference" --listen "unix://$work/ingest.sock" \
    --metrics-host 127.0.0.1 --metrics-port "$port" >"$work/serve.log" 2>&1 &
server=$!
tries=0
until "$venv_python" "$repo/deploy/helm/circuitwatch/files/healthcheck.py" \
    "unix://$work/ingest.sock" 2 2>/dev/null; do
    tries=$((tries + 1))
    if [ "$tries" -gt 60 ] || ! kill -0 "$server" 2>/dev/null; then
        cat "$work/serve.log"
        echo "serve never became SERVING" >&2
        exit 1
    fi
    sleep 1
done
"$venv_python" - "$port" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
assert "circuitwatch_build_info{" in text, text[:500]
PY
kill -TERM "$server"
status=0
wait "$server" || status=$?
server=""
if [ "$status" -ne 0 ]; then
    cat "$work/serve.log"
    echo "serve exited with status $status after SIGTERM" >&2
    exit 1
fi
site=$("$venv_python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
step "installed size"
du -sh "$site" | sed "s|$work/||"
echo "largest:"
du -sk "$site"/* | sort -rn | head -6 | while read -r kib path; do
    printf '  %6d KiB  %s\n' "$kib" "$(basename "$path")"
done
"$venv_python" -m pip list --format=freeze 2>/dev/null | wc -l | sed 's/^/packages installed: /'
echo "OK"

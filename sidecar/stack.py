"""``circuitwatch stack``: the whole monitored stack on this machine, to watch and to alert on.

Starts, all on 127.0.0.1: the sidecar (in this process, anomaly detection on), vLLM's
OpenAI-compatible server with the Circuitwatch plugin (``python -m
vllm.entrypoints.openai.api_server``, which works on both the CUDA and the CPU build),
Prometheus scraping both with deploy's rules, and Alertmanager (sidecar.monitoring writes
their configs, as tests/test_alerts_e2e.py does). Prints where to look, then runs until
Ctrl-C and stops everything.

    circuitwatch stack --model smollm2                    # the model's default spec
    circuitwatch stack --model smollm2 --spec DIR/spec.yaml --scale 20 --anomaly-warmup 30

``--scale 20`` divides the rules' windows and ``for:`` durations by 20 (alerts in seconds,
for a demo); ``--webhook URL`` sends alerts there (Alertmanager's webhook JSON).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.demo import default_spec
from sidecar.models.registry import ModelNotInstalled, resolve_model
from sidecar.monitoring import (
    RULES,
    Target,
    alertmanager_config,
    prometheus_config,
    scaled_rules,
    start_alertmanager,
    start_prometheus,
    stop_process,
    wait_until_up,
)
from sidecar.probe.config import ENV_ENDPOINT, ENV_SPEC
from sidecar.server.anomaly import AnomalyConfig
from sidecar.server.service import Sidecar
from sidecar.spec.load import SpecError, load_spec

ENGINE_START_S = 900


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2", help="smollm2 (default), reference, or DIR")
    parser.add_argument("--spec", type=Path, help="circuit spec YAML (default: the model's own)")
    parser.add_argument("--served-model-name", default=None, help="default: the model's name")
    parser.add_argument("--port", type=int, default=8000, help="OpenAI API port (default 8000)")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="divide the rules' durations by this (default 1)"
    )
    parser.add_argument(
        "--anomaly-warmup",
        type=int,
        default=AnomalyConfig.warmup,
        help=f"requests before anomaly scoring (default {AnomalyConfig.warmup})",
    )
    parser.add_argument("--webhook", help="Alertmanager posts alerts to this URL")
    parser.add_argument("--workdir", type=Path, help="configs, data and logs (default: a temp dir)")


def run(args: argparse.Namespace) -> int:
    try:
        model_dir = resolve_model(args.model)
        spec_path = args.spec or default_spec(args.model)
        if spec_path is None:
            raise SpecError("--spec is required for a model directory")
        spec = load_spec(spec_path, model_dir=model_dir)
    except (ModelNotInstalled, SpecError, ValueError) as error:
        print(f"circuitwatch stack: {error}", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="circuitwatch-stack-"))
    workdir.mkdir(parents=True, exist_ok=True)
    served = args.served_model_name or spec.model.name
    anomaly = AnomalyConfig(warmup=args.anomaly_warmup)
    with Sidecar(spec, f"unix://{workdir}/ingest.sock", metrics_port=0,
                 metrics_host="127.0.0.1", anomaly=anomaly) as sidecar:  # fmt: skip
        alertmanager = start_alertmanager(
            workdir / "alertmanager",
            alertmanager_config(args.webhook, group_wait="5s", group_interval="30s"),
        )
        engine_log = open(workdir / "vllm.log", "w")
        env = dict(os.environ, **{ENV_SPEC: str(spec_path), ENV_ENDPOINT: sidecar.address})
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                   "--model", str(model_dir), "--served-model-name", served,
                   "--host", "127.0.0.1", "--port", str(args.port),
                   "--gpu-memory-utilization", "0.2", "--no-enable-prefix-caching"]  # fmt: skip
        engine = subprocess.Popen(command, env=env, stdout=engine_log, stderr=subprocess.STDOUT)
        api = f"http://127.0.0.1:{args.port}"
        targets = [
            Target(sidecar.metrics_url.split("/")[2], "sidecar"),
            Target(f"127.0.0.1:{args.port}", "vllm"),
        ]
        config = prometheus_config(RULES, targets, alertmanager.url.removeprefix("http://"))
        prometheus = start_prometheus(
            workdir / "prometheus", config, scaled_rules(RULES.read_text(), args.scale)
        )
        # `kill` (SIGTERM, what a terminal closing or a supervisor sends) stops it the way
        # Ctrl-C does, so the engine, Prometheus and Alertmanager never outlive it.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            prometheus.wait_ready()
            alertmanager.wait_ready()
            print(f"starting vLLM (log: {workdir / 'vllm.log'}) ...", flush=True)
            wait_until_up(f"{api}/health", engine, "vLLM", ENGINE_START_S)
            print(_where_to_look(api, served, sidecar.metrics_url, prometheus.url,
                                 alertmanager.url, workdir), flush=True)  # fmt: skip
            while engine.poll() is None:
                time.sleep(1)
            print(f"vLLM exited with status {engine.returncode}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            stop_process(engine, timeout=60)
            engine_log.close()
            prometheus.stop()
            alertmanager.stop()


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _where_to_look(api, served, metrics, prometheus, alertmanager, workdir) -> str:
    return f"""
Circuitwatch stack is up (Ctrl-C stops it):
  OpenAI API       {api}/v1   (model "{served}")
  sidecar metrics  {metrics}
  Prometheus       {prometheus}/alerts   and   {prometheus}/graph
  Alertmanager     {alertmanager}/#/alerts
  configs, logs    {workdir}
Try:
  curl -s {api}/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{served}", "messages": [{{"role": "user", "content": "Hi!"}}]}}'
"""

"""A local Prometheus and Alertmanager for Circuitwatch: their configs and their processes.

``circuitwatch stack`` and tests/test_alerts_e2e.py both run this: Prometheus (Debian's
``prometheus``) scrapes the sidecar (and vLLM, when given) with the labels the chart's
monitors attach, evaluates deploy's rules (``deploy/prometheus/rules.yaml``, read from the
source tree) and sends alerts to Alertmanager (Debian's ``prometheus-alertmanager``),
which routes them to a webhook, or nowhere when none is given.

``scaled_rules`` divides every duration of the rules (range windows, ``for:``, group
intervals) by a factor, so that a demo or a test sees in seconds what production sees in
minutes; thresholds and per-minute floors are rates and do not change.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules.yaml"
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
_DURATION = re.compile(r"(\d+)([smhd])")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
# Range selectors `[5m]`, and the `for:` / `interval:` keys of rules and groups.
_RULE_DURATIONS = re.compile(r"(\[)(\d+[smhd])(\])|(^\s*(?:for|interval): )(\d+[smhd])$", re.M)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scale_duration(duration: str, factor: float) -> str:
    """``"5m"`` divided by ``factor`` as whole seconds (at least 1 s), e.g. ``"15s"`` for 20."""
    match = _DURATION.fullmatch(duration)
    if match is None:
        raise ValueError(f"not a single-unit Prometheus duration: {duration!r}")
    seconds = int(match.group(1)) * _SECONDS[match.group(2)]
    return f"{max(1, round(seconds / factor))}s"


def scaled_rules(text: str, factor: float) -> str:
    """The rules file ``text`` with every window, ``for:`` and group interval divided by
    ``factor`` (1 returns it unchanged). Recording rule names keep their `_5m` suffixes."""
    if factor == 1:
        return text

    def shorter(match: re.Match) -> str:
        if match.group(1):
            return f"[{scale_duration(match.group(2), factor)}]"
        return f"{match.group(4)}{scale_duration(match.group(5), factor)}"

    return _RULE_DURATIONS.sub(shorter, text)


@dataclass(frozen=True)
class Target:
    """A scrape target and the ``circuitwatch`` label the rules know it by."""

    address: str  # host:port
    role: str  # "sidecar" or "vllm"
    metrics_path: str = "/metrics"


def prometheus_config(
    rule_file: Path,
    targets: list[Target],
    alertmanager: str | None,
    interval: str = "1s",
    namespace: str = "local",
    pod: str = "stack",
) -> dict:
    """Scrapes ``targets`` every ``interval`` with the labels deploy's rules join on
    (``namespace``, ``pod``, ``circuitwatch``), evaluates ``rule_file`` as often, and sends
    alerts to ``alertmanager`` (host:port), if any."""
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "rule_files": [str(rule_file)],
        "scrape_configs": [
            {
                "job_name": f"circuitwatch-{target.role}",
                "metrics_path": target.metrics_path,
                "static_configs": [
                    {
                        "targets": [target.address],
                        "labels": {"circuitwatch": target.role, "namespace": namespace,
                                   "pod": pod},
                    }
                ],
            }
            for target in targets
        ],
    }  # fmt: skip
    if alertmanager is not None:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


def alertmanager_config(
    webhook_url: str | None, group_wait: str = "30s", group_interval: str = "5m"
) -> dict:
    """One route: every alert, grouped by alert name and the labels the alerts carry, to
    ``webhook_url`` (Alertmanager's webhook JSON), or to a receiver that drops them."""
    receiver: dict = {"name": "default"}
    if webhook_url is not None:
        receiver["webhook_configs"] = [{"url": webhook_url, "send_resolved": False}]
    return {
        "route": {
            "receiver": "default",
            "group_by": ["alertname", "namespace", "model_name", "circuit", "phase", "detector"],
            "group_wait": group_wait,
            "group_interval": group_interval,
            "repeat_interval": "4h",
        },
        "receivers": [receiver],
    }


def stop_process(process: subprocess.Popen, timeout: float) -> None:
    """SIGTERM, then SIGKILL if ``process`` has not exited within ``timeout`` seconds."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_until_up(url: str, process: subprocess.Popen, name: str, timeout: float) -> None:
    """Poll ``url`` until it answers; fail at once if ``process`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{name} not up after {timeout:.0f} s")


class Server:
    """A Prometheus or Alertmanager process on 127.0.0.1, its config and data in ``workdir``."""

    def __init__(self, command: list[str], port: int, log_path: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)

    def get(self, path: str, **params: str) -> dict | None:
        """The decoded JSON at ``path``, None while the server does not answer."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)
        except OSError:
            return None

    def wait_ready(self, timeout: float = 60) -> None:
        name = f"{self.log_path.stem} (log: {self.log_path})"
        wait_until_up(f"{self.url}/-/ready", self.process, name, timeout)

    def stop(self) -> None:
        stop_process(self.process, timeout=30)
        self._log.close()


class Prometheus(Server):
    def query(self, expr: str) -> list[dict]:
        """The instant vector ``expr`` evaluates to now (empty while not answering)."""
        answer = self.get("/api/v1/query", query=expr)
        return [] if answer is None else answer["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict]:
        """``expr`` from ``start`` to ``end`` (Unix seconds), every ``step`` seconds."""
        answer = self.get("/api/v1/query_range", query=expr, start=str(start), end=str(end),
                          step=str(step))  # fmt: skip
        return [] if answer is None else answer["data"]["result"]

    def firing(self) -> list[dict]:
        """Alerts in state firing, as /api/v1/alerts lists them."""
        answer = self.get("/api/v1/alerts")
        alerts = [] if answer is None else answer["data"]["alerts"]
        return [alert for alert in alerts if alert["state"] == "firing"]


def binary(names: tuple[str, ...], package: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path is not None:
            return path
    raise FileNotFoundError(f"{names[0]} not found: install Debian's `{package}` package")


def start_prometheus(workdir: Path, config: dict, rules_text: str | None = None) -> Prometheus:
    """Prometheus with ``config``; ``rules_text`` (e.g. ``scaled_rules``) replaces the rule
    file the config names, written into ``workdir``."""
    workdir.mkdir(parents=True, exist_ok=True)
    if rules_text is not None:
        (workdir / "rules.yaml").write_text(rules_text)
        config = {**config, "rule_files": [str(workdir / "rules.yaml")]}
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    command = [
        binary(("prometheus",), "prometheus"),
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    return Prometheus(command, port, workdir / "prometheus.log")


def start_alertmanager(workdir: Path, config: dict) -> Server:
    """Alertmanager with ``config``, alone (its cluster listener off)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    command = [
        binary(ALERTMANAGER_BINARIES, "prometheus-alertmanager"),
        f"--config.file={workdir / 'alertmanager.yml'}",
        f"--storage.path={workdir / 'alertmanager-data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
    ]
    return Server(command, port, workdir / "alertmanager.log")

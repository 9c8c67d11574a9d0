"""sidecar.monitoring: time-scaled rules and the Prometheus / Alertmanager configs it writes,
checked by the servers' own tools (promtool, amtool from the Debian packages)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from sidecar.monitoring import (
    RULES,
    Target,
    alertmanager_config,
    prometheus_config,
    scale_duration,
    scaled_rules,
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not found (Debian's prometheus / prometheus-alertmanager packages)")
    return path


def test_scale_duration() -> None:
    assert scale_duration("5m", 20) == "15s"
    assert scale_duration("1d", 20) == "4320s"
    assert scale_duration("10s", 100) == "1s"  # never zero
    with pytest.raises(ValueError, match="1h30m"):
        scale_duration("1h30m", 2)


def test_scaled_rules_shorten_every_duration_and_nothing_else() -> None:
    text = RULES.read_text()
    assert scaled_rules(text, 1) == text
    scaled = scaled_rules(text, 20)
    original, fast = yaml.safe_load(text), yaml.safe_load(scaled)
    for group, fast_group in zip(original["groups"], fast["groups"], strict=True):
        if "interval" in group:
            assert fast_group["interval"] == scale_duration(group["interval"], 20)
        for rule, fast_rule in zip(group["rules"], fast_group["rules"], strict=True):
            windows = re.findall(r"\[(\w+)\]", rule["expr"])
            assert re.findall(r"\[(\w+)\]", fast_rule["expr"]) == [
                scale_duration(w, 20) for w in windows
            ]
            assert re.sub(r"\[\w+\]", "", rule["expr"]) == re.sub(r"\[\w+\]", "", fast_rule["expr"])
            if "for" in rule:
                assert fast_rule["for"] == scale_duration(rule["for"], 20)
            assert fast_rule.get("annotations") == rule.get("annotations")


def test_written_configs_pass_promtool_and_amtool(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(scaled_rules(RULES.read_text(), 20))
    targets = [Target("127.0.0.1:9464", "sidecar"), Target("127.0.0.1:8000", "vllm")]
    config = prometheus_config(tmp_path / "rules.yaml", targets, "127.0.0.1:9093")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    check = subprocess.run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")],
                           capture_output=True, text=True)  # fmt: skip
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 20 rules found" in check.stdout + check.stderr
    for webhook in ("http://127.0.0.1:5001/alerts", None):
        (tmp_path / "am.yml").write_text(yaml.safe_dump(alertmanager_config(webhook)))
        check = subprocess.run([tool("amtool"), "check-config", str(tmp_path / "am.yml")],
                               capture_output=True, text=True)  # fmt: skip
        assert check.returncode == 0, check.stdout + check.stderr

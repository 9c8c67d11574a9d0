"""deploy/: alerting rules (promtool), the generated dashboard, the Helm chart, the health probe.

promtool comes from Debian's `prometheus` package. Chart rendering uses helm-python-sdk
(Helm's own Go engine, no cluster needed) and, where installed, kubernetes-validate
checks the rendered objects against Kubernetes' strict schemas; without them only the
chart's static checks run. The Prometheus Operator objects are checked against the
operator's own CRD schemas (tests/data/crds, vendored) with jsonschema.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import shutil
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "circuitwatch"
RULES = CHART / "files" / "rules.yaml"
RULES_TEST = DEPLOY / "prometheus" / "rules_test.yaml"
CRDS = ROOT / "tests" / "data" / "crds"
HEALTHCHECK = CHART / "files" / "healthcheck.py"

# What the sidecar exports: metric name -> its labels (histograms by their base name).
SIDECAR_METRICS = {
    "circuitwatch_circuit_score": {"circuit", "model_name", "phase", "aggregation"},
    "circuitwatch_tokens_sampled_total": {"model_name", "phase"},
    "circuitwatch_batches_received_total": {"model_name"},
    "circuitwatch_requests_scored_total": {"model_name", "finished_by"},
    "circuitwatch_samples_dropped_total": {"model_name", "reason"},
    "circuitwatch_probe_sampled_tokens_total": {"model_name", "rank"},
    "circuitwatch_probe_scored_tokens_total": {"model_name", "rank"},
    "circuitwatch_probe_dropped_tokens_total": {"model_name", "rank", "reason"},
    "circuitwatch_prefix_cached_tokens_total": {"model_name"},
    "circuitwatch_ingest_errors_total": {"reason"},
    "circuitwatch_probe_enabled": {"model_name", "rank"},
    "circuitwatch_probe_errors_total": {"model_name", "rank", "reason"},
    "circuitwatch_trace_context_invalid_total": set(),
    "circuitwatch_circuit_firing_tokens_total": {"circuit", "model_name"},
    "circuitwatch_verdicts_total": {"circuit", "model_name", "phase", "verdict"},
    "circuitwatch_anomaly_score": {"detector", "model_name"},
    "circuitwatch_anomalous_requests_total": {"detector", "model_name"},
    "circuitwatch_live_requests": {"model_name"},
    "circuitwatch_token_to_metric_seconds": {"model_name"},
    "circuitwatch_build_info": {"version", "spec_hash", "model_hash", "model_name"},
    "circuitwatch_probe_overhead_ratio": {"model_name", "rank"},
    "circuitwatch_probe_budget_ratio": {"model_name", "rank"},
    "circuitwatch_probe_sample_level": {"model_name", "rank"},
    "circuitwatch_probe_graph_cost_ratio": {"model_name", "rank"},
}
HISTOGRAMS = {
    "circuitwatch_circuit_score",
    "circuitwatch_token_to_metric_seconds",
    "circuitwatch_anomaly_score",
    "circuitwatch_probe_overhead_ratio",
}
# The rules also read these: Prometheus' own target health and vLLM's token counter.
OTHER_RULE_METRICS = {"up", "vllm:generation_tokens_total"}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def exported_names() -> set[str]:
    names = set(SIDECAR_METRICS)
    for base in HISTOGRAMS:
        names.remove(base)
        names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
    # Scores can be negative, so the sidecar's score histogram has no _sum.
    return names - {"circuitwatch_circuit_score_sum"}


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads (functions, keywords and labels left out)."""
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = GROUPING.sub(" ", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        is_call = expr[match.end() :].lstrip().startswith("(")
        if not is_call and match.group().lower() not in PROMQL_WORDS:
            names.add(match.group())
    return names


# ---------------------------------------------------------------- alerting rules


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install Debian's `prometheus` package")
    return path


@pytest.fixture(scope="module")
def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES.read_text())["groups"]


def test_plain_prometheus_reads_the_charts_rules_file_not_a_copy() -> None:
    link = DEPLOY / "prometheus" / "rules.yaml"
    assert link.is_symlink()
    assert link.resolve() == RULES


def test_promtool_checks_the_rules(promtool: str) -> None:
    run = subprocess.run(
        [promtool, "check", "rules", str(DEPLOY / "prometheus" / "rules.yaml")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_promtool_rule_unit_tests_pass(promtool: str) -> None:
    run = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=RULES_TEST.parent,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_every_alert_is_tested_firing_and_quiet(rule_groups: list[dict]) -> None:
    alerts = {rule["alert"] for group in rule_groups for rule in group["rules"] if "alert" in rule}
    cases = [
        case
        for test in yaml.safe_load(RULES_TEST.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts and firing == alerts and quiet == alerts


def test_alerts_carry_severity_and_annotations(rule_groups: list[dict]) -> None:
    for rule in (rule for group in rule_groups for rule in group["rules"] if "alert" in rule):
        assert rule["alert"].startswith("Circuitwatch")
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_links_its_runbook_section(rule_groups: list[dict]) -> None:
    headings = re.findall(r"^## (\w+)$", (DEPLOY / "RUNBOOKS.md").read_text(), re.M)
    alerts = [rule for group in rule_groups for rule in group["rules"] if "alert" in rule]
    assert sorted(headings) == sorted(rule["alert"] for rule in alerts)
    for rule in alerts:
        assert rule["annotations"]["runbook_url"] == f"deploy/RUNBOOKS.md#{rule['alert'].lower()}"


def test_rules_read_only_exported_or_recorded_metrics(rule_groups: list[dict]) -> None:
    rules = [rule for group in rule_groups for rule in group["rules"]]
    recorded = {rule["record"] for rule in rules if "record" in rule}
    assert all(re.fullmatch(r"circuitwatch:[a-z0-9_]+:[a-z0-9_]+", name) for name in recorded)
    known = exported_names() | recorded | OTHER_RULE_METRICS
    for rule in rules:
        assert metric_names(rule["expr"]) <= known, rule.get("alert") or rule["record"]


def test_the_metric_name_check_catches_unknown_names() -> None:
    expr = 'sum by (circuit) (rate(circuitwatch_circuit_scor_total{phase="x"}[5m])) > 0.5'
    assert metric_names(expr) == {"circuitwatch_circuit_scor_total"}


def test_metric_list_matches_what_the_sidecar_declares() -> None:
    from prometheus_client import CollectorRegistry

    from sidecar.server.metrics import SidecarMetrics
    from sidecar.spec.schema import Circuit

    registry = CollectorRegistry()
    SidecarMetrics(registry, [Circuit("induction", (1.0,), threshold=0.5)])
    declared = {family.name for family in registry.collect()}
    assert declared == {name.removesuffix("_total") for name in SIDECAR_METRICS}


# ---------------------------------------------------------------- dashboard


@pytest.fixture(scope="module")
def generator():
    path = DEPLOY / "dashboards" / "generate.py"
    spec = importlib.util.spec_from_file_location("circuitwatch_dashboard_generate", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_what_the_generator_writes(generator) -> None:
    committed = (DEPLOY / "dashboards" / "circuitwatch.json").read_text()
    assert committed == generator.render(), "run: python deploy/dashboards/generate.py"


def test_dashboard_reads_only_exported_metrics_and_labels(generator) -> None:
    queries = generator.queries(generator.build_dashboard())
    labels = set().union(*SIDECAR_METRICS.values()) | {"le"}
    for expr in queries:
        assert metric_names(expr) and metric_names(expr) <= exported_names(), expr
        for group in re.findall(r"\bby \(([^)]*)\)", expr):
            assert {label.strip() for label in group.split(",")} <= labels, expr


def test_dashboard_queries_are_valid_promql(generator, promtool: str, tmp_path: Path) -> None:
    queries = generator.queries(generator.build_dashboard())
    concrete = [q.replace("$__rate_interval", "5m").replace("$", "") for q in queries]
    records = [{"record": f"dashboard:query:{i}", "expr": q} for i, q in enumerate(concrete)]
    rules = {"groups": [{"name": "dashboard", "rules": records}]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump(rules))
    run = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "queries.yaml")], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_dashboard_has_its_variables_and_panels(generator) -> None:
    dashboard = generator.build_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["model_name"]["multi"] and variables["circuit"]["multi"]
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    assert all(t["datasource"]["uid"] == "${datasource}" for p in panels for t in p["targets"])
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])
    assert any(p.get("repeat") == "circuit" for p in dashboard["panels"] if p["type"] == "row")
    read = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
    unread = {name for name in exported_names() if name.endswith(("_count", "_sum"))}
    assert read == exported_names() - unread


# ---------------------------------------------------------------- health probe


@pytest.fixture
def health_server(tmp_path: Path):
    target = f"unix://{tmp_path}/h.sock"
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    server.add_insecure_port(target)
    server.start()
    yield target, servicer, server
    server.stop(None)


def probe(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=30)


def test_health_probe_follows_the_servers_status(health_server) -> None:
    target, servicer, server = health_server
    command = [sys.executable, str(HEALTHCHECK), target, "2"]
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe(command).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    run = probe(command)
    assert run.returncode == 1 and "NOT_SERVING" in run.stderr
    server.stop(None)
    run = probe(command)
    assert run.returncode == 1 and "UNAVAILABLE" in run.stderr


# ---------------------------------------------------------------- chart: static checks


def values_paths(node: object, prefix: str = "") -> set[str]:
    paths = {prefix} if prefix else set()
    if isinstance(node, dict):
        for key, child in node.items():
            paths |= values_paths(child, f"{prefix}.{key}" if prefix else key)
    return paths


def test_chart_files_parse_and_templates_use_only_defined_values() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "circuitwatch"
    defined = values_paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    for template in (CHART / "templates").iterdir():
        text = template.read_text()
        assert text.count("{{") == text.count("}}"), template.name
        used = set(re.findall(r"\.Values\.([A-Za-z0-9_.]+)", text))
        assert used <= defined, f"{template.name}: {sorted(used - defined)}"


# ---------------------------------------------------------------- chart: rendered by Helm

MINIMAL = {
    "vllm": {"model": "org/model", "servedModelName": "served"},
    "spec": {"yaml": "version: 1\n", "binaryData": {"dirs.safetensors": "AAAA"}},
}
ALL_ON = {
    **MINIMAL,
    "prometheusRule": {"enabled": True},
    "monitoring": {"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}},
}


@pytest.fixture(scope="module")
def helm():
    return pytest.importorskip(
        "helm_python", reason="helm-python-sdk not installed (pip install helm-python-sdk)"
    )


def render(helm, values: dict) -> dict[str, dict]:
    """The chart's objects by kind, as `helm template` would print them."""
    with helm.Chart.load(str(CHART)) as chart:
        manifests = chart.render(values=values, name="demo", namespace="ml")
    texts = [text for path, text in manifests.items() if path.endswith(".yaml")]
    docs = [doc for text in texts for doc in yaml.safe_load_all(text) if doc]
    by_kind = {doc["kind"]: doc for doc in docs}
    assert len(by_kind) == len(docs)
    return by_kind


def test_chart_lints_clean(helm) -> None:
    report = helm.lint(str(CHART), ALL_ON, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not report["errors"] and not problems, report


def test_chart_requires_a_model(helm) -> None:
    with pytest.raises(helm.HelmError, match="vllm.model"):
        render(helm, {"spec": MINIMAL["spec"]})


def test_monitors_and_rules_are_off_by_default(helm) -> None:
    assert set(render(helm, MINIMAL)) == {"ConfigMap", "Deployment", "Service"}


def test_pod_runs_the_sidecar_natively_beside_vllm(helm) -> None:
    pod = render(helm, MINIMAL)["Deployment"]["spec"]["template"]["spec"]
    (sidecar,), (vllm,) = pod["initContainers"], pod["containers"]
    assert sidecar["restartPolicy"] == "Always"
    assert " ".join(sidecar["command"] + sidecar["args"]) == (
        "circuitwatch serve --spec /etc/circuitwatch/spec.yaml"
        " --listen unix:///run/circuitwatch/ingest.sock --metrics-port 9464"
    )
    assert vllm["command"] == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert vllm["args"][:4] == ["--model", "org/model", "--served-model-name", "served"]
    env = {item["name"]: item["value"] for item in vllm["env"]}
    assert env["CIRCUITWATCH_SPEC"] == "/etc/circuitwatch/spec.yaml"
    assert env["CIRCUITWATCH_ENDPOINT"] == "unix:///run/circuitwatch/ingest.sock"
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["socket"]["emptyDir"]["medium"] == "Memory"
    assert volumes["spec"]["configMap"]["name"] == "demo-circuitwatch-spec"
    for container in (sidecar, vllm):
        mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
        assert mounts["socket"]["mountPath"] == "/run/circuitwatch"
        assert mounts["spec"]["readOnly"] is True
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_sidecar_probes_run_the_health_check_script(helm) -> None:
    sidecar = render(helm, MINIMAL)["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    socket = "unix:///run/circuitwatch/ingest.sock"
    expected = ["python3", "-c", HEALTHCHECK.read_text(), socket, "5"]
    assert sidecar["startupProbe"]["exec"]["command"] == expected
    assert sidecar["livenessProbe"]["exec"]["command"] == expected
    assert "readinessProbe" not in sidecar


def test_rendered_probe_command_answers_a_real_server(helm, health_server) -> None:
    target, servicer, _ = health_server
    sidecar = render(helm, MINIMAL)["Deployment"]["spec"]["template"]["spec"]["initContainers"][0]
    _, flag, script, _, timeout = sidecar["startupProbe"]["exec"]["command"]
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert probe([sys.executable, flag, script, target, timeout]).returncode == 0


def test_spec_configmap_carries_yaml_and_direction_files(helm) -> None:
    config_map = render(helm, MINIMAL)["ConfigMap"]
    assert yaml.safe_load(config_map["data"]["spec.yaml"]) == {"version": 1}
    assert config_map["binaryData"] == {"dirs.safetensors": "AAAA"}
    existing = {**MINIMAL, "spec": {"existingConfigMap": "my-spec"}}
    objects = render(helm, existing)
    assert "ConfigMap" not in objects
    volumes = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "spec", "configMap": {"name": "my-spec"}} in volumes


def test_enabled_flags_add_monitors_and_the_same_rules(helm) -> None:
    objects = render(helm, ALL_ON)
    assert objects["PrometheusRule"]["spec"] == yaml.safe_load(RULES.read_text())
    for endpoints in (
        objects["ServiceMonitor"]["spec"]["endpoints"],
        objects["PodMonitor"]["spec"]["podMetricsEndpoints"],
    ):
        labels = {e["port"]: e["relabelings"][0]["replacement"] for e in endpoints}
        assert labels == {"cw-metrics": "sidecar", "http": "vllm"}
    ports = {port["name"]: port["targetPort"] for port in objects["Service"]["spec"]["ports"]}
    assert ports == {"http": "http", "cw-metrics": 9464}


def test_rendered_objects_match_the_kubernetes_schema(helm) -> None:
    validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate missing")
    objects = render(helm, {**ALL_ON, "sidecar": {"probes": {"readiness": {"enabled": True}}}})
    for kind in ("ConfigMap", "Deployment", "Service"):
        validate.validate(objects[kind], "1.29.0", strict=True)  # the chart's kubeVersion floor


# ---------------------------------------------------------------- chart: Prometheus Operator CRDs

OPERATOR_KINDS = ("ServiceMonitor", "PodMonitor", "PrometheusRule")


def strict(schema: dict) -> dict:
    """``schema`` with unknown fields refused wherever the CRD lists an object's fields, as the
    API server's strict field validation does (it would otherwise prune them silently)."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: strict(s) for name, s in out["properties"].items()}
        open_ended = out.get("x-kubernetes-preserve-unknown-fields", False)
        if "additionalProperties" not in out and not open_ended:
            out["additionalProperties"] = False
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = strict(out[key])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [strict(s) for s in out[key]]
    return out


@pytest.fixture(scope="module")
def crd_validators() -> dict:
    """apiVersion + kind -> a validator of the CRD's openAPIV3Schema (OpenAPI 3.0 ~ draft 4)."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema missing (dev extra)")
    validators = {}
    for path in sorted(CRDS.glob("monitoring.coreos.com_*.yaml")):
        crd = yaml.safe_load(path.read_text())
        for version in crd["spec"]["versions"]:
            if version["served"]:
                key = (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
                schema = strict(version["schema"]["openAPIV3Schema"])
                validators[key] = jsonschema.Draft4Validator(schema)
    assert {kind for _, kind in validators} == set(OPERATOR_KINDS)
    return validators


def crd_errors(validators: dict, obj: dict) -> list[str]:
    validator = validators[(obj["apiVersion"], obj["kind"])]
    errors = validator.iter_errors(obj)
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors]


def test_operator_objects_match_the_operators_crd_schemas(helm, crd_validators) -> None:
    values = {
        **ALL_ON,
        "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
        "monitoring": {
            kind: {"enabled": True, "labels": {"release": "prometheus"}, "interval": "15s",
                   "scrapeTimeout": "5s"}
            for kind in ("serviceMonitor", "podMonitor")
        },
    }  # fmt: skip
    objects = render(helm, values)
    for kind in OPERATOR_KINDS:
        assert crd_errors(crd_validators, objects[kind]) == [], kind


def test_crd_check_refuses_unknown_fields_and_bad_values(helm, crd_validators) -> None:
    monitor = render(helm, ALL_ON)["ServiceMonitor"]
    typo = copy.deepcopy(monitor)
    typo["spec"]["endpoints"][0]["scrapeTimout"] = "5s"
    assert any("scrapeTimout" in e for e in crd_errors(crd_validators, typo))
    bad_interval = copy.deepcopy(monitor)
    bad_interval["spec"]["endpoints"][0]["interval"] = "30 seconds"
    errors = crd_errors(crd_validators, bad_interval)
    assert any(e.startswith("spec.endpoints.0.interval") for e in errors)
    rule = copy.deepcopy(render(helm, ALL_ON)["PrometheusRule"])
    del rule["spec"]["groups"][0]["name"]
    assert any("'name' is a required property" in e for e in crd_errors(crd_validators, rule))

"""Generates the Circuitwatch Grafana dashboard, circuitwatch.json beside this file.

The JSON is committed for importing into Grafana, and this code is its source: change the
panels here, run ``python deploy/dashboards/generate.py``, commit both. ``--check`` exits 1
when the committed file differs from what the code generates (tests/test_deploy.py makes
the same check). Standard library only, so it runs anywhere Python does.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

OUTPUT = Path(__file__).with_name("circuitwatch.json")

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
MODEL = 'model_name=~"$model_name"'
CIRCUIT = 'circuit=~"$circuit"'
RATE = "[$__rate_interval]"
GRID_WIDTH = 24


@dataclass(frozen=True)
class Query:
    """One PromQL query of a panel and the legend of the series it returns."""

    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    """A Grafana panel: ``kind`` is timeseries, stat or table; width in grid units of 24."""

    title: str
    description: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8


@dataclass(frozen=True)
class Row:
    """A titled row of panels; ``repeat`` names a variable to repeat the row for."""

    title: str
    panels: tuple[Panel, ...]
    repeat: str | None = None


def score_quantiles(phase: str) -> tuple[Query, ...]:
    """p50/p95/p99 of per-request mean scores, p95 of per-request max scores and p95 of
    the circuit's configured aggregate where the spec configures another kind."""

    def quantile(q: float, aggregation: str, by: str = "le") -> str:
        selector = f'{MODEL},circuit="$circuit",phase="{phase}",aggregation{aggregation}'
        return (
            f"histogram_quantile({q}, sum by ({by}) "
            f"(rate(circuitwatch_circuit_score_bucket{{{selector}}}{RATE})))"
        )

    return (
        Query(quantile(0.5, '="mean"'), "p50 of request means"),
        Query(quantile(0.95, '="mean"'), "p95 of request means"),
        Query(quantile(0.99, '="mean"'), "p99 of request means"),
        Query(quantile(0.95, '="max"'), "p95 of request maxima"),
        Query(quantile(0.95, '!~"mean|max"', "le, aggregation"), "p95 of request {{aggregation}}"),
    )


def flagged_share() -> Query:
    """Share of finished requests flagged by each circuit's verdict threshold, per phase."""
    selector = f"{MODEL},{CIRCUIT}"
    return Query(
        "sum by (circuit, phase) (rate(circuitwatch_verdicts_total"
        f'{{{selector},verdict="flagged"}}{RATE}))'
        " / sum by (circuit, phase) "
        f"(rate(circuitwatch_verdicts_total{{{selector}}}{RATE}))",
        "{{circuit}} {{phase}}",
    )


def rows() -> tuple[Row, ...]:
    """The dashboard's content, top to bottom."""
    overview = Row(
        "Overview",
        (
            Panel(
                "Sidecars",
                "One line per running sidecar: its version and the hashes of the spec and "
                "model it watches.",
                (Query(f"circuitwatch_build_info{{{MODEL}}}", ""),),
                kind="table",
                width=12,
                height=6,
            ),
            Panel(
                "Live requests",
                "Requests the sidecars are aggregating now.",
                (Query(f"sum(circuitwatch_live_requests{{{MODEL}}})", "live requests"),),
                kind="stat",
                width=4,
                height=6,
            ),
            Panel(
                "Requests scored",
                "Finished requests per second, by what finished them: the engine's finish "
                "marker or the sidecar's idle timeout.",
                (
                    Query(
                        "sum by (finished_by) "
                        f"(rate(circuitwatch_requests_scored_total{{{MODEL}}}{RATE}))",
                        "{{finished_by}}",
                    ),
                ),
                unit="reqps",
                width=8,
                height=6,
            ),
        ),
    )
    activity = Row(
        "Circuit activity",
        (
            Panel(
                "Firing tokens",
                "Sampled tokens per second whose score is above the circuit's threshold.",
                (
                    Query(
                        "sum by (circuit) (rate(circuitwatch_circuit_firing_tokens_total"
                        f"{{{MODEL},{CIRCUIT}}}{RATE}))",
                        "{{circuit}}",
                    ),
                ),
                unit="short",
                width=8,
            ),
            Panel(
                "Flagged requests",
                "Share of finished requests whose configured aggregate is above the circuit's "
                "verdict threshold, per phase (circuits with verdict thresholds only). "
                "Thresholds calibrated at a target false-positive rate should stay near it on "
                "benign traffic.",
                (flagged_share(),),
                unit="percentunit",
                width=8,
            ),
            Panel(
                "Tokens sampled",
                "Tokens per second the sidecars scored, by phase.",
                (
                    Query(
                        "sum by (phase) "
                        f"(rate(circuitwatch_tokens_sampled_total{{{MODEL}}}{RATE}))",
                        "{{phase}}",
                    ),
                ),
                unit="short",
                width=8,
            ),
        ),
    )
    # Anomaly detectors (sidecar.server.anomaly): one per circuit, named after it, and
    # "multivariate" (shown whichever circuits are picked). Only requests past a model's
    # warm-up are scored; the +Inf bucket counts them.
    detectors = f'{MODEL},detector=~"$circuit|multivariate"'
    scored = f'circuitwatch_anomaly_score_bucket{{{detectors},le="+Inf"}}'
    anomaly = Row(
        "Anomaly",
        (
            Panel(
                "Anomalous requests",
                "Share of scored requests whose anomaly score is above the sidecar's "
                "threshold, per detector (alert CircuitwatchAnomalousActivity: over 10% "
                "for 5 minutes). Near zero on steady traffic.",
                (
                    Query(
                        "sum by (detector) (rate(circuitwatch_anomalous_requests_total"
                        f"{{{detectors}}}{RATE})) / sum by (detector) (rate({scored}{RATE}))",
                        "{{detector}}",
                    ),
                ),
                unit="percentunit",
                width=12,
            ),
            Panel(
                "Anomaly scores",
                "p50 and p99 of per-request anomaly scores (robust z scale) per detector; the "
                "sidecar's --anomaly-threshold (default 4) marks a request anomalous.",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le, detector) "
                        f"(rate(circuitwatch_anomaly_score_bucket{{{detectors}}}{RATE})))",
                        f"{{{{detector}}}} p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ),
                width=12,
            ),
        ),
    )
    per_circuit = Row(
        "Circuit $circuit",
        tuple(
            Panel(
                f"$circuit: {phase} scores",
                f"Quantiles of per-request aggregate scores over the {phase} tokens.",
                score_quantiles(phase),
            )
            for phase in ("prompt", "generation")
        ),
        repeat="circuit",
    )
    pipeline = Row(
        "Pipeline health",
        (
            Panel(
                "Samples dropped",
                "Sampled tokens per second lost before scoring, by reason.",
                (
                    Query(
                        "sum by (reason) "
                        f"(rate(circuitwatch_samples_dropped_total{{{MODEL}}}{RATE}))",
                        "{{reason}}",
                    ),
                ),
                width=6,
            ),
            Panel(
                "Ingest errors",
                "Batches per second the sidecars rejected, by reason, and malformed trace "
                "contexts per second (those requests' spans start traces of their own).",
                (
                    Query(
                        f"sum by (reason) (rate(circuitwatch_ingest_errors_total{RATE}))",
                        "{{reason}}",
                    ),
                    Query(
                        f"sum(rate(circuitwatch_trace_context_invalid_total{RATE}))",
                        "malformed traceparent",
                    ),
                ),
                width=6,
            ),
            Panel(
                "Token to metric latency",
                "From a request's first token reaching the sidecar to its scores in the metrics.",
                tuple(
                    Query(
                        f"histogram_quantile({q}, sum by (le) "
                        f"(rate(circuitwatch_token_to_metric_seconds_bucket{{{MODEL}}}{RATE})))",
                        f"p{round(q * 100)}",
                    )
                    for q in (0.5, 0.99)
                ),
                unit="s",
                width=6,
            ),
            Panel(
                "Batches received",
                "Batches per second from the engines' probes.",
                (
                    Query(
                        "sum by (model_name) "
                        f"(rate(circuitwatch_batches_received_total{{{MODEL}}}{RATE}))",
                        "{{model_name}}",
                    ),
                ),
                width=6,
            ),
            Panel(
                "Probe books",
                "Per rank, tokens per second the probes sampled, and what became of them: "
                "scored, or dropped by reason (lost_in_transit: handed to a stream that broke). "
                "Sampled = scored + dropped.",
                (
                    Query(
                        "sum by (rank) "
                        f"(rate(circuitwatch_probe_sampled_tokens_total{{{MODEL}}}{RATE}))",
                        "sampled rank {{rank}}",
                    ),
                    Query(
                        "sum by (rank) "
                        f"(rate(circuitwatch_probe_scored_tokens_total{{{MODEL}}}{RATE}))",
                        "scored rank {{rank}}",
                    ),
                    Query(
                        "sum by (rank, reason) "
                        f"(rate(circuitwatch_probe_dropped_tokens_total{{{MODEL}}}{RATE}))",
                        "{{reason}} rank {{rank}}",
                    ),
                ),
            ),
            Panel(
                "Prefix-cached prompt tokens",
                "Prompt tokens per second served from the engine's prefix cache: no probe sees "
                "them, so prompt aggregates cover only the uncached tail.",
                (
                    Query(
                        "sum by (model_name) "
                        f"(rate(circuitwatch_prefix_cached_tokens_total{{{MODEL}}}{RATE}))",
                        "{{model_name}}",
                    ),
                ),
            ),
            Panel(
                "Probes",
                "1 while an engine worker's probe runs, 0 once a fault turned it off; and the "
                "faults inside the probes so far, by reason.",
                (
                    Query(
                        f"min by (model_name, rank) (circuitwatch_probe_enabled{{{MODEL}}})",
                        "on: {{model_name}} rank {{rank}}",
                    ),
                    Query(
                        f"sum by (reason) (circuitwatch_probe_errors_total{{{MODEL}}})",
                        "faults: {{reason}}",
                    ),
                ),
                width=6,
            ),
        ),
    )
    overhead = f"circuitwatch_probe_overhead_ratio_bucket{{{MODEL}}}"
    probe = Row(
        "Probe cost",
        (
            Panel(
                "Probe overhead",
                "Share of the engine's step time the probe spent on the engine thread: p50 and "
                "p99 of its batches' reports (one about every 50 ms), against its budget "
                "(CIRCUITWATCH_BUDGET; alert CircuitwatchProbeOverBudget when the mean is "
                "above it for 15 minutes), and the in-graph cost estimated from the spec "
                "(probe over model FLOPs per token).",
                (
                    *(
                        Query(
                            f"histogram_quantile({q}, sum by (le, model_name, rank) "
                            f"(rate({overhead}{RATE})))",
                            f"{{{{model_name}}}} rank {{{{rank}}}} p{round(q * 100)}",
                        )
                        for q in (0.5, 0.99)
                    ),
                    Query(
                        f"max by (model_name, rank) (circuitwatch_probe_budget_ratio{{{MODEL}}})",
                        "{{model_name}} rank {{rank}} budget",
                    ),
                    Query(
                        "max by (model_name, rank) "
                        f"(circuitwatch_probe_graph_cost_ratio{{{MODEL}}})",
                        "{{model_name}} rank {{rank}} in-graph estimate",
                    ),
                ),
                unit="percentunit",
                width=12,
            ),
            Panel(
                "Sampling level",
                "Share of each request's tokens the probe's budget lets through now (1: "
                "every token); it falls when the probe costs more than its budget.",
                (
                    Query(
                        f"max by (model_name, rank) (circuitwatch_probe_sample_level{{{MODEL}}})",
                        "{{model_name}} rank {{rank}}",
                    ),
                ),
                unit="percentunit",
                width=12,
            ),
        ),
    )
    return (overview, activity, anomaly, per_circuit, pipeline, probe)


def panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict:
    """Grafana's JSON for one panel placed at grid position (x, y)."""
    targets = []
    for index, query in enumerate(panel.queries):
        target = {
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend,
            "refId": chr(ord("A") + index),
        }
        if panel.kind == "table":
            target.update(format="table", instant=True)
        targets.append(target)
    result = {
        "datasource": DATASOURCE,
        "description": panel.description,
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "id": panel_id,
        "targets": targets,
        "title": panel.title,
        "type": panel.kind,
    }
    if panel.kind == "table":
        # Labels are the content; the sample time and the constant 1 are noise.
        result["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True, "Value": True}}}
        ]
    return result


def layout(content: tuple[Row, ...]) -> list[dict]:
    """Rows and their panels, flattened the way Grafana stores them, left to right."""
    panels: list[dict] = []
    y = 0
    for row in content:
        row_json = {
            "collapsed": False,
            "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
            "id": len(panels) + 1,
            "panels": [],
            "title": row.title,
            "type": "row",
        }
        if row.repeat:
            row_json["repeat"] = row.repeat
        panels.append(row_json)
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            panels.append(panel_json(panel, len(panels) + 1, x, y))
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return panels


def query_variable(name: str, label: str, query: str) -> dict:
    """A multi-value template variable filled from a label_values() query."""
    return {
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "datasource": DATASOURCE,
        "definition": query,
        "includeAll": True,
        "label": label,
        "multi": True,
        "name": name,
        "query": {"qryType": 1, "query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "type": "query",
    }


def build_dashboard() -> dict:
    """The whole dashboard as Grafana's JSON model."""
    variables = [
        {
            "current": {},
            "label": "Data source",
            "name": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "type": "datasource",
        },
        query_variable("model_name", "Model", "label_values(circuitwatch_build_info, model_name)"),
        query_variable(
            "circuit",
            "Circuit",
            f"label_values(circuitwatch_circuit_score_count{{{MODEL}}}, circuit)",
        ),
    ]
    return {
        "annotations": {"list": []},
        "description": "Live circuit activity of LLMs served by vLLM, from Circuitwatch.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": layout(rows()),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["circuitwatch", "vllm"],
        "templating": {"list": variables},
        "time": {"from": "now-6h", "to": "now"},
        "timezone": "",
        "title": "Circuitwatch",
        "uid": "circuitwatch",
        "version": 1,
    }


def queries(dashboard: dict) -> list[str]:
    """Every PromQL expression the dashboard runs: panel targets, then the selectors of
    the template variables' label_values() queries."""
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            selector, _, _ = (
                variable["query"]["query"].removeprefix("label_values(").rpartition(",")
            )
            exprs.append(selector)
    return exprs


def render() -> str:
    """The dashboard's file content, stable from run to run."""
    return json.dumps(build_dashboard(), indent=2, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: %(default)s")
    args = parser.parse_args(argv)
    content = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != content:
            print(f"{args.output} is stale: run {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(content)
    return 0


if __name__ == "__main__":
    sys.exit(main())

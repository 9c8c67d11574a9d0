"""``circuitwatch serve``: load a spec and run the sidecar until SIGTERM/SIGINT.

Configuration order: command-line option, then environment variable, then default:

    --listen        CIRCUITWATCH_LISTEN         unix:///tmp/circuitwatch.sock
    --metrics-port  CIRCUITWATCH_METRICS_PORT   9464
    --otlp-endpoint OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT
                    (no trace export when none is set)
    --otlp-protocol OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, OTEL_EXPORTER_OTLP_PROTOCOL  grpc

Ingest over TCP must authenticate its clients (sidecar.server.auth): mutual TLS
(``--tls-cert``, ``--tls-key``, ``--tls-client-ca``) or a bearer token (``--token-file``, env
``CIRCUITWATCH_TOKEN_FILE``; the probes send the same file's token), or both. A TCP
``--listen`` with neither is refused (exit status 2) unless ``--insecure`` is given.
``--tls-cert``/``--tls-key`` alone encrypt without authenticating.

A Unix socket is mode 0600, or 0660 in the group given with ``--socket-group``. The process
creates no other file, so its umask is set to that mode's complement before anything is
bound: the socket is never, even for the moment between bind and chmod, open to others.
(A umask set and restored around the bind would race with other threads' files; that is
why ``Sidecar`` itself only chmods, before it starts accepting.)

Anomaly detection (sidecar.server.anomaly) is on by default: ``--no-anomaly`` turns it
off; ``--anomaly-warmup``, ``--anomaly-window``, ``--anomaly-threshold`` and
``--no-anomaly-length-control`` tune it.

Exit status: 0 after a graceful stop, 2 for a bad spec or option (nothing is bound),
1 when the ingest or metrics address cannot be bound.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from sidecar.server.anomaly import DEFAULT_ANOMALY, AnomalyConfig
from sidecar.server.auth import IngestAuth, check_listener, is_tcp
from sidecar.server.service import Sidecar
from sidecar.server.tracing import OTLP_PROTOCOLS, tracer_provider_from_config

DEFAULT_LISTEN = "unix:///tmp/circuitwatch.sock"
DEFAULT_METRICS_PORT = 9464

logger = logging.getLogger("circuitwatch.serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", required=True, help="circuit spec YAML file to score")
    parser.add_argument(
        "--listen",
        help="ingest address, unix:///path or host:port "
        f"(env CIRCUITWATCH_LISTEN, default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help=f"/metrics port (env CIRCUITWATCH_METRICS_PORT, default {DEFAULT_METRICS_PORT})",
    )
    parser.add_argument("--metrics-host", default="0.0.0.0", help="/metrics bind address")
    parser.add_argument(
        "--socket-group",
        help="let this group connect to the Unix socket (mode 0660; default 0600, owner only)",
    )
    parser.add_argument("--tls-cert", help="PEM certificate chain: serve ingest over TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    parser.add_argument(
        "--tls-client-ca",
        help="PEM CA bundle: require client certificates signed by it (mutual TLS)",
    )
    parser.add_argument(
        "--token-file",
        help="file holding the bearer token every ingest call must carry "
        "(env CIRCUITWATCH_TOKEN_FILE)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="allow a TCP --listen without client certificates or token: anyone who reaches "
        "the port can feed the metrics",
    )
    parser.add_argument(
        "--max-streams",
        type=int,
        default=64,
        help="concurrent ingest streams and health checks; more are refused (default 64)",
    )
    parser.add_argument(
        "--max-requests-per-stream",
        type=int,
        help="live requests one ingest stream may open; beyond it the stream's least recently "
        "updated is evicted (default: --max-requests)",
    )
    parser.add_argument("--model-dir", help="check the spec against this model directory")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        help="finish a request after this many seconds without data (default 60)",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=10_000,
        help="live requests kept; beyond it the least recently updated is evicted (default 10000)",
    )
    parser.add_argument(
        "--tp-join-timeout",
        type=float,
        default=5.0,
        help="seconds to wait for every tensor-parallel rank of a step (default 5)",
    )
    parser.add_argument(
        "--otlp-endpoint",
        help="export one span per request over OTLP (env OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, "
        "then OTEL_EXPORTER_OTLP_ENDPOINT; no export when none is set)",
    )
    parser.add_argument(
        "--otlp-protocol",
        choices=OTLP_PROTOCOLS,
        help="OTLP transport (env OTEL_EXPORTER_OTLP_TRACES_PROTOCOL, then "
        "OTEL_EXPORTER_OTLP_PROTOCOL; default grpc)",
    )
    parser.add_argument(
        "--anomaly",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="score each request against the model's recent requests (default on)",
    )
    parser.add_argument(
        "--anomaly-warmup",
        type=int,
        default=DEFAULT_ANOMALY.warmup,
        help=f"requests per model that only build the baseline (default {DEFAULT_ANOMALY.warmup})",
    )
    parser.add_argument(
        "--anomaly-window",
        type=int,
        default=DEFAULT_ANOMALY.window,
        help="non-anomalous requests the baseline is computed from "
        f"(default {DEFAULT_ANOMALY.window})",
    )
    parser.add_argument(
        "--anomaly-threshold",
        type=float,
        default=DEFAULT_ANOMALY.threshold,
        help="a score above this (robust z; multivariate on the same z scale) marks a request "
        f"anomalous (default {DEFAULT_ANOMALY.threshold})",
    )
    parser.add_argument(
        "--anomaly-length-control",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_ANOMALY.length_control,
        help="regress aggregates on log(token count) before scoring (default on)",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from sidecar.spec.load import SpecError, load_spec

    try:
        spec = load_spec(args.spec, model_dir=args.model_dir)
    except (SpecError, OSError) as error:
        print(f"circuitwatch serve: {error}", file=sys.stderr)
        return 2
    try:
        listen = args.listen or os.environ.get("CIRCUITWATCH_LISTEN") or DEFAULT_LISTEN
        metrics_port = _metrics_port(args.metrics_port)
        anomaly = (
            AnomalyConfig(
                warmup=args.anomaly_warmup,
                window=args.anomaly_window,
                threshold=args.anomaly_threshold,
                length_control=args.anomaly_length_control,
            )
            if args.anomaly
            else None
        )
        auth = IngestAuth.from_files(
            args.tls_cert,
            args.tls_key,
            args.tls_client_ca,
            args.token_file or os.environ.get("CIRCUITWATCH_TOKEN_FILE") or None,
        )
        check_listener(listen, auth, args.insecure)
        if is_tcp(listen) and auth.token is not None and not auth.tls:
            logger.warning("bearer token over plaintext TCP: readable by anyone on the path")
        tracer_provider = tracer_provider_from_config(args.otlp_endpoint, args.otlp_protocol)
        sidecar = Sidecar(
            spec,
            listen,
            metrics_port=metrics_port,
            metrics_host=args.metrics_host,
            tracer_provider=tracer_provider,
            idle_timeout=args.idle_timeout,
            max_requests=args.max_requests,
            join_timeout=args.tp_join_timeout,
            socket_group=args.socket_group,
            anomaly=anomaly,
            auth=auth,
            max_streams=args.max_streams,
            max_requests_per_stream=args.max_requests_per_stream,
        )
    except ValueError as error:
        print(f"circuitwatch serve: {error}", file=sys.stderr)
        return 2
    os.umask(0o177 if args.socket_group is None else 0o117)
    try:
        asyncio.run(_serve(sidecar))
    except (RuntimeError, OSError) as error:
        print(f"circuitwatch serve: cannot serve: {error}", file=sys.stderr)
        return 1
    finally:
        if tracer_provider is not None:
            tracer_provider.shutdown()
    return 0


def _metrics_port(option: int | None) -> int:
    if option is not None:
        return option
    value = os.environ.get("CIRCUITWATCH_METRICS_PORT")
    if value is None:
        return DEFAULT_METRICS_PORT
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"CIRCUITWATCH_METRICS_PORT={value!r} is not a port number") from None


async def _serve(sidecar: Sidecar) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await sidecar.start()
        logger.info(
            "scoring spec %s (%d circuits) for %s; ingest on %s, metrics on %s",
            sidecar.spec.path,
            len(sidecar.spec.circuits),
            sidecar.spec.model.name,
            sidecar.address,
            sidecar.metrics_url,
        )
        await stop.wait()
        logger.info("stopping: finishing open streams")
    finally:
        await sidecar.stop()

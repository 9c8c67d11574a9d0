"""The running sidecar: gRPC ingest + health, the /metrics endpoint and the periodic tick.

``Sidecar`` wires one spec's ``Pipeline`` to a grpc.aio server (``circuitwatch.v1.Ingest``
and ``grpc.health.v1``, NOT_SERVING until ready and again on shutdown) and to
prometheus_client's HTTP server on the registry passed in (a private one by default).
Run it on an event loop (``start``/``stop``), or as a context manager that runs it on a
background thread with its own loop::

    sink = CollectingSink()
    with Sidecar(spec, "unix:///tmp/cw.sock", metrics_port=0, sinks=[sink]) as sidecar:
        ...  # stream batches to sidecar.address
        records = sink.wait_for(3, timeout=5)

A Unix socket is made private right after it is bound, before the server accepts anything:
mode 0600, or 0660 owned by ``socket_group``. Whoever can connect can feed the sidecar
activations and so its metrics. Over TCP, ``auth`` (``sidecar.server.auth``) adds TLS,
client certificates and a bearer token; ``circuitwatch serve`` refuses a TCP listener that
authenticates no one unless told ``--insecure`` (this class leaves that rule to its caller).

Caps, so that no client can grow the sidecar's memory without bound (the oldest state goes
first wherever one is reached, and what it held is counted as dropped):

    max_streams                  concurrent RPCs on the server (ingest streams and health
                                 checks); one more ends with RESOURCE_EXHAUSTED
    max_streams_per_connection   concurrent streams on one HTTP/2 connection; more wait in
                                 the client until one ends
    MAX_MESSAGE_BYTES            one message (RESOURCE_EXHAUSTED, the stream ends; steps and
                                 string lengths: ``sidecar.protocol.batch``); a stream
                                 holds one message at a time: the next is read only after the
                                 last was processed, the rest waits in HTTP/2 flow control
    max_requests                 live requests in all (least recently updated evicted,
                                 ``state_full``), and finished ids remembered for late tokens
    max_requests_per_stream      live requests one stream opened (its own least recently
                                 updated evicted, ``stream_state_full``)
    RankJoiner                   tensor-parallel steps waiting for their other ranks: 1024 in
                                 all, 256 opened by one stream, 256 MiB of values
                                 (``tp_join_overflow``)

Other per-sender state is bounded where it lives: model names and drop reasons become
label values only up to a fixed count (``metrics.BoundedLabel``), the books to 1,024
senders (``books``), engines to one per stream (``ingest.EngineStreams``), component
layouts (``scoring``).
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import threading
import time
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry, start_http_server

from sidecar import __version__
from sidecar.protocol.batch import MAX_MESSAGE_BYTES
from sidecar.server.anomaly import DEFAULT_ANOMALY, AnomalyConfig, AnomalyMonitor
from sidecar.server.auth import UNAUTHENTICATED, IngestAuth
from sidecar.server.ingest import SERVICE_NAME, IngestService
from sidecar.server.metrics import DEFAULT_SCORE_BUCKETS, MetricsSink, SidecarMetrics
from sidecar.server.pipeline import Pipeline
from sidecar.server.records import RecordSink
from sidecar.server.scoring import Scorer
from sidecar.server.tracing import TracingSink
from sidecar.spec.schema import CircuitSpec

logger = logging.getLogger(__name__)

SERVER_OPTIONS = (
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # The probes ping every second (see shipper.py) to notice a stopped sidecar; by default
    # a server allows one ping per 5 minutes on a stream it sends no data on, and closes the
    # connection (too_many_pings) after two more.
    ("grpc.http2.min_ping_interval_without_data_ms", 500),
    ("grpc.http2.max_ping_strikes", 0),
)

_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Sidecar:
    def __init__(
        self,
        spec: CircuitSpec,
        listen: str,
        *,
        metrics_port: int | None = None,
        metrics_host: str = "0.0.0.0",
        registry: CollectorRegistry | None = None,
        sinks: Sequence[RecordSink] = (),
        tracer_provider: TracerProvider | None = None,
        idle_timeout: float = 60.0,
        max_requests: int = 10_000,
        keep_token_scores: int = 0,
        join_timeout: float = 5.0,
        engine_grace: float = 10.0,
        score_buckets: Sequence[float] = DEFAULT_SCORE_BUCKETS,
        socket_group: str | None = None,
        anomaly: AnomalyConfig | None = DEFAULT_ANOMALY,
        auth: IngestAuth | None = None,
        max_streams: int = 64,
        max_streams_per_connection: int = 16,
        max_requests_per_stream: int | None = None,
    ) -> None:
        """``listen``: ``unix:///path`` or ``host:port`` (port 0 picks a free one).
        ``metrics_port``: None serves no /metrics endpoint, 0 picks a free port.
        ``socket_group``: a Unix socket is mode 0600 (only this user may connect); with a
        group it belongs to that group and is mode 0660. Raises ValueError for an unknown
        group. ``anomaly``: None turns anomaly detection off. ``engine_grace``: an engine
        whose streams all ended is given this many seconds to come back before its requests
        are closed (see ingest.py). ``auth``: TLS and client authentication (None:
        plaintext, anyone who can connect). Caps: see above; ``max_requests_per_stream``
        None means ``max_requests``."""
        if max_streams < 1 or max_streams_per_connection < 1:
            raise ValueError("max_streams and max_streams_per_connection must be at least 1")
        self.spec = spec
        self.auth = auth if auth is not None else IngestAuth()
        self.max_streams = max_streams
        self.max_streams_per_connection = max_streams_per_connection
        self.listen = listen
        self.socket_path = unix_socket_path(listen)
        self.socket_gid: int | None = None
        if socket_group is not None:
            try:
                self.socket_gid = grp.getgrnam(socket_group).gr_gid
            except KeyError:
                raise ValueError(f"socket group {socket_group!r} does not exist") from None
        self.metrics_port = metrics_port
        self.metrics_host = metrics_host
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = SidecarMetrics(
            self.registry,
            spec.circuits,
            score_buckets=score_buckets,
            anomaly_threshold=(anomaly or DEFAULT_ANOMALY).threshold,
        )
        self.metrics.set_build_info(__version__, spec.hash, spec.model.hash, spec.model.name)
        all_sinks: list[RecordSink] = [MetricsSink(self.metrics)]
        if tracer_provider is not None:
            all_sinks.append(
                TracingSink(tracer_provider, self.metrics.counter_trace_context_invalid)
            )
        all_sinks.extend(sinks)
        scorer = Scorer.from_spec(spec)
        self.pipeline = Pipeline(
            scorer,
            self.metrics,
            all_sinks,
            idle_timeout=idle_timeout,
            max_requests=max_requests,
            keep_token_scores=keep_token_scores,
            join_timeout=join_timeout,
            anomaly=None if anomaly is None else AnomalyMonitor(spec.circuits, anomaly),
            max_requests_per_source=max_requests_per_stream,
        )
        self.tick_interval = max(0.01, min(1.0, idle_timeout / 4, join_timeout / 4))
        self.address: str | None = None  # the bound ingest address, once started
        self.metrics_url: str | None = None  # http://host:port/metrics, once started
        self._ingest = IngestService(
            self.pipeline, spec.hash, scorer.num_components, engine_grace=engine_grace
        )
        self._server: grpc.aio.Server | None = None
        self._health: health_aio.HealthServicer | None = None
        self._http = None
        self._ticker: asyncio.Task | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_requested: asyncio.Event | None = None

    async def start(self) -> None:
        """Bind and serve; raises RuntimeError if the address cannot be bound."""
        self._health = health_aio.HealthServicer()
        for service in ("", SERVICE_NAME):
            await self._health.set(service, _NOT_SERVING)
        self._server = grpc.aio.server(
            interceptors=self.auth.interceptors(lambda: self.metrics.ingest_error(UNAUTHENTICATED)),
            options=(
                *SERVER_OPTIONS,
                ("grpc.max_concurrent_streams", self.max_streams_per_connection),
            ),
            maximum_concurrent_rpcs=self.max_streams,
        )
        self._server.add_generic_rpc_handlers((self._ingest.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        credentials = self.auth.server_credentials()
        # Both bind (and replace a stale socket file).
        if credentials is None:
            port = self._server.add_insecure_port(self.listen)
        else:
            port = self._server.add_secure_port(self.listen, credentials)
        if self.socket_path is not None:
            # Before start(): nothing is accepted while the mode is still the umask's (the
            # CLI's umask keeps even that moment private, see app.py).
            self._restrict_socket(self.socket_path)
        self.address = (
            self.listen
            if self.listen.startswith("unix:")
            else (f"{self.listen.rpartition(':')[0]}:{port}")
        )
        await self._server.start()
        if self.metrics_port is not None:
            self._http, _ = start_http_server(
                self.metrics_port, addr=self.metrics_host, registry=self.registry
            )
            host = "127.0.0.1" if self.metrics_host in ("0.0.0.0", "") else self.metrics_host
            self.metrics_url = f"http://{host}:{self._http.server_port}/metrics"
        self._ticker = asyncio.create_task(self._tick_forever())
        for service in ("", SERVICE_NAME):
            await self._health.set(service, _SERVING)

    def _restrict_socket(self, path: str) -> None:
        if self.socket_gid is not None:
            os.chown(path, -1, self.socket_gid)
        os.chmod(path, 0o600 if self.socket_gid is None else 0o660)

    async def stop(self, grace: float = 5.0) -> None:
        """Report NOT_SERVING, let open streams finish for ``grace`` seconds, then stop."""
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._ticker is not None:
            self._ticker.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None

    def __enter__(self) -> Sidecar:
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(
            target=asyncio.run,
            args=(self._run_in_thread(ready, errors),),
            daemon=True,
            name="circuitwatch-sidecar",
        )
        self._thread.start()
        ready.wait()
        if errors:
            self._thread.join()
            raise errors[0]
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop_requested is not None:
            self._loop.call_soon_threadsafe(self._stop_requested.set)
        if self._thread is not None:
            self._thread.join()

    async def _run_in_thread(self, ready: threading.Event, errors: list[BaseException]) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_requested = asyncio.Event()
        try:
            await self.start()
        except BaseException as error:
            errors.append(error)
            await self.stop(grace=0)
            return
        finally:
            ready.set()
        await self._stop_requested.wait()
        await self.stop(grace=1.0)

    async def _tick_forever(self) -> None:
        while True:
            await asyncio.sleep(self.tick_interval)
            try:
                self._ingest.tick(time.monotonic())
            except Exception:  # keep ticking: idle requests must still be closed later
                logger.exception("periodic tick failed")


def unix_socket_path(listen: str) -> str | None:
    """The file of a ``unix:path`` or ``unix:///abs/path`` address; None for any other."""
    if not listen.startswith("unix:"):
        return None
    path = listen.removeprefix("unix:")
    return "/" + path.lstrip("/") if path.startswith("//") else path

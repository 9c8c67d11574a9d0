"""Who may stream to the ingest: mutual TLS, a bearer token, or both; required over TCP.

Whoever can stream to the sidecar feeds its metrics, so a TCP listener must authenticate its
clients. Two ways, which may be combined:

* **Mutual TLS**: the server presents ``tls_cert``/``tls_key`` and, with ``client_ca``,
  requires every client to present a certificate signed by that CA (checked in the TLS
  handshake: a client without one never gets to send a byte of gRPC).
* **Bearer token** (gRPC call credentials): every ingest call must carry the metadata
  ``authorization: Bearer <token>``; a call without it, or with another token, ends with
  ``UNAUTHENTICATED`` before its first message is read, and is counted in
  ``circuitwatch_ingest_errors_total{reason="unauthenticated"}``. ``grpc.health.v1`` stays
  open (it tells nothing but whether the sidecar serves). Over plaintext TCP the token is
  readable on the network: use it with TLS, or on the loopback interface only.

TLS without a client CA encrypts but does not authenticate; a token alone authenticates.
``check_listener`` is the rule ``circuitwatch serve`` enforces: a TCP listener with neither a
client CA nor a token is refused unless the operator says ``insecure``. A Unix socket is
authenticated by its file mode (see service.py) and needs neither, though a token, when set,
applies there too.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

HEALTH_PREFIX = "/grpc.health.v1.Health/"
UNAUTHENTICATED = "unauthenticated"  # the ingest_errors reason of a refused call


@dataclass(frozen=True)
class IngestAuth:
    tls_cert: bytes | None = None  # PEM certificate chain the server presents
    tls_key: bytes | None = field(default=None, repr=False)  # its PEM private key
    client_ca: bytes | None = None  # PEM CA(s) client certificates must chain to (mTLS)
    token: str | None = field(default=None, repr=False)  # required bearer token

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.client_ca is not None and self.tls_cert is None:
            raise ValueError("a client CA (mutual TLS) needs the server's certificate and key")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError("the bearer token is empty or contains whitespace")

    @classmethod
    def from_files(
        cls,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        tls_client_ca: str | None = None,
        token_file: str | None = None,
    ) -> IngestAuth:
        """Reads the files named; ValueError naming the file when one cannot be read."""
        token = _read(token_file)
        return cls(
            tls_cert=_read(tls_cert),
            tls_key=_read(tls_key),
            client_ca=_read(tls_client_ca),
            token=None if token is None else token.decode().strip(),
        )

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    @property
    def authenticates(self) -> bool:
        """Whether a client must prove who it is (a client certificate or the token)."""
        return self.client_ca is not None or self.token is not None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials for the listener; None for a plaintext one."""
        if self.tls_cert is None or self.tls_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self, refused: Callable[[], None]) -> tuple[grpc.aio.ServerInterceptor, ...]:
        """The token check (none without a token); ``refused`` is called per refused call."""
        return () if self.token is None else (BearerTokenInterceptor(self.token, refused),)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Ends every call but health checks with UNAUTHENTICATED unless it carries the token."""

    def __init__(self, token: str, refused: Callable[[], None]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._refused = refused

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(HEALTH_PREFIX):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent = sent.encode() if isinstance(sent, str) else sent
        if hmac.compare_digest(sent, self._expected):
            return handler
        self._refused()
        return _refusal_like(handler)


def _refusal_like(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts before reading any message."""

    async def refuse(_request, context: grpc.aio.ServicerContext):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(refuse)


def is_tcp(listen: str) -> bool:
    return not listen.startswith("unix:")


def check_listener(listen: str, auth: IngestAuth, insecure: bool) -> None:
    """Raises ValueError for a TCP listener that authenticates no one, unless ``insecure``."""
    if is_tcp(listen) and not auth.authenticates and not insecure:
        raise ValueError(
            f"{listen} is a TCP address: anyone who reaches it could feed the metrics. Require "
            "client certificates (--tls-cert, --tls-key, --tls-client-ca) or a bearer token "
            "(--token-file), listen on a Unix socket, or pass --insecure to accept this"
        )


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"cannot read {path}: {error.strerror}") from None

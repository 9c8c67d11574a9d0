"""The probe's gRPC channel to the sidecar: TLS and a bearer token when configured.

``ChannelSecurity`` holds what ``sidecar.probe.config`` read from the environment:

    CIRCUITWATCH_TLS_CA       PEM CA bundle that signed the sidecar's certificate: TLS on
    CIRCUITWATCH_TLS_CERT     PEM client certificate (mutual TLS), with
    CIRCUITWATCH_TLS_KEY      its private key
    CIRCUITWATCH_TOKEN_FILE   file holding the bearer token sent with every stream

``open_channel`` picks the credentials: TLS (``ssl_channel_credentials``) when a CA is set;
otherwise plaintext, and then a token travels through gRPC's local credentials, which exist
for exactly this: call credentials on a Unix socket or a loopback TCP connection, nowhere
else. A token over plaintext TCP to another host is refused when the configuration is read
(it would cross the network readable), as is a client certificate without TLS.
The server's certificate must name the host written in ``CIRCUITWATCH_ENDPOINT``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

ENV_TLS_CA = "CIRCUITWATCH_TLS_CA"
ENV_TLS_CERT = "CIRCUITWATCH_TLS_CERT"
ENV_TLS_KEY = "CIRCUITWATCH_TLS_KEY"
ENV_TOKEN_FILE = "CIRCUITWATCH_TOKEN_FILE"


@dataclass(frozen=True)
class ChannelSecurity:
    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    @property
    def plaintext(self) -> bool:
        return self.ca is None

    def check(self, endpoint: str) -> None:
        """ValueError when this cannot be used safely with ``endpoint``."""
        if (self.cert is None) != (self.key is None):
            raise ValueError(f"{ENV_TLS_CERT} and {ENV_TLS_KEY} go together")
        if self.cert is not None and self.ca is None:
            raise ValueError(f"a client certificate needs TLS: set {ENV_TLS_CA}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise ValueError(f"{ENV_TOKEN_FILE}: the token is empty or contains whitespace")
        if self.token is not None and self.ca is None and not _stays_on_host(endpoint):
            raise ValueError(
                f"a bearer token over plaintext TCP to {endpoint} would be readable on the "
                f"network: set {ENV_TLS_CA} (TLS) or use a Unix socket or loopback address"
            )

    @classmethod
    def from_env(cls, env, endpoint: str) -> ChannelSecurity:
        """Reads the files the variables name; ValueError naming the variable on a problem."""
        security = cls(
            ca=_read(env, ENV_TLS_CA),
            cert=_read(env, ENV_TLS_CERT),
            key=_read(env, ENV_TLS_KEY),
            token=None if (raw := _read(env, ENV_TOKEN_FILE)) is None else raw.decode().strip(),
        )
        security.check(endpoint)
        return security


def open_channel(endpoint: str, options: tuple, security: ChannelSecurity | None = None):
    """A ``grpc.Channel`` to ``endpoint`` with the credentials ``security`` asks for."""
    # Imported here: the plugin reads its configuration (this module's dataclass) in every
    # vLLM process, and must not load gRPC where the probes are off.
    import grpc

    if security is None or (security.plaintext and security.token is None):
        return grpc.insecure_channel(endpoint, options=options)
    if security.ca is not None:
        credentials = grpc.ssl_channel_credentials(security.ca, security.key, security.cert)
    elif _stays_on_host(endpoint):
        unix = endpoint.startswith("unix:")
        kind = grpc.LocalConnectionType.UDS if unix else grpc.LocalConnectionType.LOCAL_TCP
        credentials = grpc.local_channel_credentials(kind)
    else:  # check() refuses this configuration; never send a token in clear
        raise ValueError(f"no plaintext token to {endpoint}")
    if security.token is not None:
        token = grpc.access_token_call_credentials(security.token)
        credentials = grpc.composite_channel_credentials(credentials, token)
    return grpc.secure_channel(endpoint, credentials, options=options)


def _stays_on_host(endpoint: str) -> bool:
    """A Unix socket, or TCP to a loopback address."""
    if endpoint.startswith("unix:"):
        return True
    host = endpoint.removeprefix("dns:///").rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def _read(env, name: str) -> bytes | None:
    path = env.get(name, "").strip()
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise ValueError(f"{name}: cannot read {path}: {error.strerror}") from None

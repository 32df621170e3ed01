"""One place every client builds its channel: TLS trust, an optional client certificate, and the bearer token.

Each command has a role whose token it sends by default: ``infer``, ``batch`` and ``impression``
send ``inference.token``, ``reviewer`` sends ``reviewer.token``, ``review`` (list, stop, delete,
flows) sends ``admin.token``. What is used, first match wins:

- token: ``--token``, then ``--token-file``, then ``$MEDGATE_TOKEN``, then ``<credentials_dir>/<role>.token``;
- CA: ``--ca``, then ``<credentials_dir>/ca.pem``, then gRPC's bundled public roots;
- client certificate (mutual TLS): ``--cert`` with ``--key``, else ``<credentials_dir>/client.pem`` and
  ``client.key`` when both exist (a server that does not ask for one never sees it);
- ``--insecure``, or ``security.tls`` off in the settings (the server's own switch) without ``--ca`` or
  ``--cert``: plaintext. The token then goes only to a loopback address (gRPC's local credentials),
  never in clear text over a network.

``credentials_dir`` is ``security.credentials_dir`` (``var/credentials`` by default, where
``medgate credentials`` and ``make run`` put the development CA and tokens).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.security.identity import Role

TOKEN_ENV = "MEDGATE_TOKEN"
CA_FILE, CLIENT_CERT, CLIENT_KEY = "ca.pem", "client.pem", "client.key"

ChannelOptions = Sequence[tuple[str, Any]]


class ConnectError(ValueError):
    """TLS material or a token that was asked for but cannot be read; the message names the file."""


@dataclass(frozen=True)
class ClientSecurity:
    """How a client connects: TLS files (None = not used) and the bearer token ("" = none).

    ``insecure`` means plaintext; the token is then sent only to loopback targets.
    """

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    token: str = field(default="", repr=False)  # a credential: never in logs or reprs
    insecure: bool = False

    def channel_credentials(self, target: str) -> grpc.ChannelCredentials | None:
        """The credentials for ``target``; None for a plaintext channel without a token."""
        if self.insecure:
            if self.token and _is_loopback(target):
                # Plaintext on loopback; gRPC sends call credentials only over channels it deems secure, and
                # local credentials are that on 127.0.0.1/::1 (and refuse any other address).
                local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
                return grpc.composite_channel_credentials(local, grpc.access_token_call_credentials(self.token))
            return None
        transport = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA certificate") if self.ca_file else None,
            private_key=_read(self.key_file, "client key") if self.key_file else None,
            certificate_chain=_read(self.cert_file, "client certificate") if self.cert_file else None,
        )
        if not self.token:
            return transport
        return grpc.composite_channel_credentials(transport, grpc.access_token_call_credentials(self.token))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConnectError(f"cannot read the {what} {path}: {exc.strerror}") from None


def _is_loopback(target: str) -> bool:
    """Whether ``host:port`` (``[v6]:port``, ``dns:///host:port``, ``ipv4:addr:port``) names this machine."""
    address = target.split("///", 1)[-1].removeprefix("ipv4:").removeprefix("ipv6:")
    if address.startswith("["):
        host = address[1:].split("]", 1)[0]
    elif address.count(":") == 1:
        host = address.split(":", 1)[0]
    else:
        host = address  # a bare IPv6 address, or a host without a port
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _token_from(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConnectError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not text:
        raise ConnectError(f"the token file {path} is empty")
    return text


def resolve(
    role: Role | str,
    *,
    credentials_dir: Path,
    ca: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    token: str | None = None,
    token_file: Path | None = None,
    insecure: bool = False,
    environ: Mapping[str, str] | None = None,
) -> ClientSecurity:
    """A :class:`ClientSecurity` from explicit choices, then the environment, then ``credentials_dir``."""
    env = os.environ if environ is None else environ
    if (cert is None) != (key is None):
        raise ConnectError("--cert and --key go together (the client certificate and its private key)")
    if token:
        chosen = token.strip()
    elif token_file is not None:
        chosen = _token_from(token_file)
    elif env.get(TOKEN_ENV, "").strip():
        chosen = env[TOKEN_ENV].strip()
    else:
        default = credentials_dir / f"{Role(role).value}.token"
        chosen = _token_from(default) if default.is_file() else ""
    if insecure:
        return ClientSecurity(token=chosen, insecure=True)
    if ca is None and (credentials_dir / CA_FILE).is_file():
        ca = credentials_dir / CA_FILE
    if cert is None and (credentials_dir / CLIENT_CERT).is_file() and (credentials_dir / CLIENT_KEY).is_file():
        cert, key = credentials_dir / CLIENT_CERT, credentials_dir / CLIENT_KEY
    return ClientSecurity(ca_file=ca, cert_file=cert, key_file=key, token=chosen)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ca``, ``--cert``, ``--key``, ``--token``, ``--token-file`` and ``--insecure``."""
    group = parser.add_argument_group("connection security (defaults from security.credentials_dir)")
    group.add_argument("--ca", type=Path, help="CA certificate (PEM) the server's certificate must chain to")
    group.add_argument("--cert", type=Path, help="client certificate (PEM) for mutual TLS; with --key")
    group.add_argument("--key", type=Path, help="the client certificate's private key (PEM)")
    group.add_argument("--token", help=f"bearer token (JWT); visible to other users in ps: prefer ${TOKEN_ENV}")
    group.add_argument("--token-file", type=Path, help="read the bearer token from this file")
    group.add_argument("--insecure", action="store_true", help="plaintext, for a server without TLS (loopback)")


def from_args(args: argparse.Namespace, role: Role | str) -> ClientSecurity:
    """The command's security from its parsed flags, the environment and the settings."""
    from services.settings import load_settings

    security = load_settings().security
    # With security.tls off (the same settings as the server's) the default is plaintext; --ca or --cert
    # asks for TLS all the same.
    explicit_tls = getattr(args, "ca", None) is not None or getattr(args, "cert", None) is not None
    return resolve(
        role,
        credentials_dir=Path(security.credentials_dir),
        ca=getattr(args, "ca", None),
        cert=getattr(args, "cert", None),
        key=getattr(args, "key", None),
        token=getattr(args, "token", None),
        token_file=getattr(args, "token_file", None),
        insecure=bool(getattr(args, "insecure", False)) or (not security.tls and not explicit_tls),
    )


def channel(target: str, security: ClientSecurity, options: ChannelOptions = ()) -> grpc.Channel:
    """A blocking channel to ``target``."""
    credentials = security.channel_credentials(target)
    if credentials is None:
        return grpc.insecure_channel(target, options=list(options))
    return grpc.secure_channel(target, credentials, options=list(options))


def aio_channel(
    target: str,
    security: ClientSecurity,
    options: ChannelOptions = (),
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target``."""
    credentials = security.channel_credentials(target)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=list(options), interceptors=interceptors)


def explain(exc: grpc.RpcError) -> str:
    """A hint after an error a user fixes with credentials, else ""."""
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f" (send a token: --token-file, ${TOKEN_ENV}, or `medgate credentials` for the development ones)"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return " (another role's token: --token-file)"
    if code == grpc.StatusCode.UNAVAILABLE:
        details = (exc.details() or "").lower() if hasattr(exc, "details") else ""
        if "ssl" in details or "handshake" in details or "certificate" in details:
            return " (TLS failed: --ca for the server's CA, --cert/--key if it requires a client certificate)"
        if "socket closed" in details:
            return " (a TLS server closes plaintext connections: leave out --insecure)"
    return ""

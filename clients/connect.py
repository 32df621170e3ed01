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

Targets (:func:`parse_target`): one ``host:port`` as before; several, comma-separated
(``10.0.0.5:50051,10.0.0.6:50051``), or ``dns:///name:port`` for every address a DNS name has (a
Kubernetes headless Service): calls are then spread over all of them with gRPC's ``round_robin``
policy. gRPC keeps a connection open for many calls, so a balancer in front (L4) pins a client to one
server; balancing per call has to happen in the client.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from services.security.identity import Role

TOKEN_ENV = "MEDGATE_TOKEN"
CA_FILE, CLIENT_CERT, CLIENT_KEY = "ca.pem", "client.pem", "client.key"

ChannelOptions = Sequence[tuple[str, Any]]

ROUND_ROBIN: tuple[str, Any] = ("grpc.lb_policy_name", "round_robin")


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

    def channel_credentials(self, target: str | Target) -> grpc.ChannelCredentials | None:
        """The credentials for ``target``; None for a plaintext channel without a token."""
        if self.insecure:
            hosts = (target if isinstance(target, Target) else parse_target(target)).hosts
            if self.token and hosts and all(_is_loopback(host) for host in hosts):
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


def _host_of(address: str) -> str:
    """The host of ``host:port``, ``[v6]:port``, a bare IPv6 address, or a host without a port."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    if address.count(":") == 1:
        return address.split(":", 1)[0]
    return address


def _is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, as :attr:`Target.hosts` holds them) is this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Target:
    """What gRPC is given for a ``--target``: the URI, the channel options it needs, and the hosts it names."""

    uri: str
    options: tuple[tuple[str, Any], ...] = ()
    hosts: tuple[str, ...] = ()


def _split_host_port(address: str, target: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port); a ConnectError naming ``target`` otherwise."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        port_text = rest.removeprefix(":") if rest.startswith(":") else ""
    else:
        host, _, port_text = address.rpartition(":")
        if ":" in host:  # an IPv6 address without brackets: where its port starts is a guess
            host = ""
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConnectError(
            f"target {target!r}: {address!r} is not host:port (IPv6 as [addr]:port); several are separated by commas"
        )
    return host, int(port_text)


def _literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def _resolve(host: str, port: int, family: socket.AddressFamily) -> list[str]:
    """The addresses of ``host`` in ``family``, once: a list of names is not followed when DNS changes."""
    try:
        found = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM)
    except socket.gaierror:
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in found))


def parse_target(target: str) -> Target:
    """A ``--target`` as gRPC takes it.

    - ``host:port``: unchanged (one server; gRPC's default ``pick_first``);
    - ``dns:///name:port`` (or ``dns://server/name:port``): every address of ``name``, re-resolved when
      connections fail; the TLS name checked is ``name``;
    - ``a:port,b:port,...``: an ``ipv4:`` (or ``ipv6:``) address list; host names are resolved once, here. The TLS
      name checked on every server is the first host's, so the servers' certificates must all carry it (a shared
      service name, or the address when the list is of addresses);
    - ``ipv4:``/``ipv6:``/``unix:`` URIs: passed on as they are.

    Several servers (a list, or a DNS name) get ``round_robin``: each call goes to the next ready server.
    """
    text = target.strip()
    if not text:
        raise ConnectError("the target is empty (host:port, several comma-separated, or dns:///name:port)")
    if text.startswith("dns:"):
        rest = text.removeprefix("dns:")
        name = rest.split("/", 3)[-1] if rest.startswith("//") else rest
        return Target(text, (ROUND_ROBIN,), (_host_of(name),))
    if text.startswith(("ipv4:", "ipv6:")):
        _, _, listed = text.partition(":")
        hosts = tuple(_split_host_port(a.strip(), target)[0] for a in listed.split(","))
        if len(hosts) == 1:
            return Target(text, (), hosts)
        return Target(text, (ROUND_ROBIN, ("grpc.default_authority", _bracketed(hosts[0]))), hosts)
    if text.startswith("unix:"):
        return Target(text, (), ("localhost",))
    if "," not in text:
        return Target(text, (), (_host_of(text.split("///", 1)[-1]),))
    pairs = [_split_host_port(part.strip(), target) for part in text.split(",") if part.strip()]
    literals = [_literal(host) for host, _ in pairs]
    family = socket.AF_INET
    if all(address is not None and address.version == 6 for address in literals):
        family = socket.AF_INET6
    addresses: list[str] = []
    for (host, port), literal in zip(pairs, literals, strict=True):
        if literal is not None:
            if (literal.version == 6) != (family == socket.AF_INET6):
                raise ConnectError(f"target {target!r}: IPv4 and IPv6 addresses cannot share one list")
            found = [str(literal)]
        else:
            found = _resolve(host, port, family)
            if not found:
                kind = "IPv6" if family == socket.AF_INET6 else "IPv4"
                raise ConnectError(f"target {target!r}: {host} has no {kind} address")
        addresses += [f"[{a}]:{port}" if family == socket.AF_INET6 else f"{a}:{port}" for a in found]
    scheme = "ipv6" if family == socket.AF_INET6 else "ipv4"
    hosts = tuple(host for host, _ in pairs)
    return Target(
        f"{scheme}:{','.join(addresses)}", (ROUND_ROBIN, ("grpc.default_authority", _bracketed(hosts[0]))), hosts
    )


def _bracketed(host: str) -> str:
    literal = _literal(host)
    return f"[{host}]" if literal is not None and literal.version == 6 else host


def _channel_options(target: Target, options: ChannelOptions) -> list[tuple[str, Any]]:
    """The target's options, then the caller's; a caller's option of the same name wins."""
    merged = dict(target.options)
    merged.update(dict(options))
    return list(merged.items())


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
    """A blocking channel to ``target`` (one server, several, or a DNS name: :func:`parse_target`)."""
    spec = parse_target(target)
    credentials = security.channel_credentials(spec)
    merged = _channel_options(spec, options)
    if credentials is None:
        return grpc.insecure_channel(spec.uri, options=merged)
    return grpc.secure_channel(spec.uri, credentials, options=merged)


def aio_channel(
    target: str,
    security: ClientSecurity,
    options: ChannelOptions = (),
    *,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A grpc.aio channel to ``target`` (one server, several, or a DNS name: :func:`parse_target`)."""
    spec = parse_target(target)
    credentials = security.channel_credentials(spec)
    merged = _channel_options(spec, options)
    if credentials is None:
        return grpc.aio.insecure_channel(spec.uri, options=merged, interceptors=interceptors)
    return grpc.aio.secure_channel(spec.uri, credentials, options=merged, interceptors=interceptors)


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

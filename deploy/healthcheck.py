"""Container health check: gRPC health of the medgate server in this container, over its own TLS.

    python deploy/healthcheck.py 50051              # ready: exit 0 when the server says SERVING
    python deploy/healthcheck.py 50051 --alive      # alive: exit 0 when the server answers at all
    python deploy/healthcheck.py 50052 --service medgate.v1.Review

Why not the kubelet's native gRPC probe: it dials plaintext (TLS only as an alpha feature of Kubernetes 1.37,
``GRPCContainerProbeTLS``, and never with a client certificate), and every medgate listener speaks TLS. This
check reads the same settings as the server (the container's ``MEDGATE_SECURITY_*``): it trusts
``client_ca_file`` (the CA of medgate's nodes), checks the server's certificate against the first name in
``cert_file`` (the certificate the server presents, so no name has to be configured), and under mutual TLS
presents that certificate. The health service needs no token. ``--alive`` passes on NOT_SERVING too: a
gateway whose Triton is down is not ready, but restarting it would not help.

Exit status: 0 healthy, 1 not (with one line on stderr saying why), 2 usage or settings errors.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # services/ beside deploy/, installed or not

from services.settings import SecuritySettings, SettingsError, load_settings


def _server_name(cert_file: Path) -> str:
    """The first DNS name (else IP address) of the server's own certificate: what TLS will check."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        names = san.get_values_for_type(x509.DNSName) or [str(a) for a in san.get_values_for_type(x509.IPAddress)]
        if names:
            # A wildcard certificate (*.medgate.svc) matches any one label in its place.
            return "health" + names[0][1:] if names[0].startswith("*.") else names[0]
    common = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(common[0].value) if common else "localhost"


def _channel(port: int, security: SecuritySettings) -> grpc.Channel:
    target = f"127.0.0.1:{port}"
    if not security.tls:
        return grpc.insecure_channel(target)
    mutual = security.require_client_cert
    credentials = grpc.ssl_channel_credentials(
        root_certificates=Path(security.client_ca_file).read_bytes(),
        private_key=Path(security.key_file).read_bytes() if mutual else None,
        certificate_chain=Path(security.cert_file).read_bytes() if mutual else None,
    )
    name = _server_name(Path(security.cert_file))
    return grpc.secure_channel(target, credentials, options=[("grpc.ssl_target_name_override", name)])


def check(port: int, *, service: str = "", alive: bool = False, timeout_s: float = 4.0) -> tuple[bool, str]:
    """(healthy, what was seen) for the server on 127.0.0.1:``port``."""
    security = load_settings().security
    with _channel(port, security) as channel:
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if alive and code == grpc.StatusCode.NOT_FOUND:
                return True, f"answering (no health entry named {service!r})"
            details = exc.details() if hasattr(exc, "details") else ""
            return False, f"{getattr(code, 'name', code)}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return (alive or answer.status == health_pb2.HealthCheckResponse.SERVING), status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("port", type=int, help="the server's gRPC port in this container")
    parser.add_argument("--service", default="", help="health entry to ask for (default: the whole server)")
    parser.add_argument("--alive", action="store_true", help="pass whenever the server answers (liveness)")
    parser.add_argument("--timeout", type=float, default=4.0, help="seconds for the check (default 4)")
    args = parser.parse_args(argv)
    try:
        healthy, seen = check(args.port, service=args.service, alive=args.alive, timeout_s=args.timeout)
    except SettingsError as exc:
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"healthcheck: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    if not healthy:
        print(f"healthcheck: 127.0.0.1:{args.port} {args.service or '(server)'}: {seen}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

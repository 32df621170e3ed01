"""TLS for every listener: server certificates re-read from disk when they change, optional mutual TLS.

gRPC asks the fetcher for a new configuration on every new connection; it answers None (keep the
current one) unless a file's modification time changed, so a certificate renewed by the hospital's
tooling (certbot, cert-manager, a Vault agent) takes effect without a restart.
"""

from __future__ import annotations

import ipaddress
import logging
from pathlib import Path

import grpc

from services.settings import SecuritySettings

log = logging.getLogger("medgate.security")


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class CertificateFiles:
    """The PEM files of one listener, re-read when any of them changes."""

    def __init__(self, security: SecuritySettings) -> None:
        self.cert_file = Path(security.cert_file)
        self.key_file = Path(security.key_file)
        self.client_ca_file = Path(security.client_ca_file) if security.require_client_cert else None
        self._stamp: tuple[float, ...] = ()

    def _files(self) -> list[Path]:
        return [self.cert_file, self.key_file, *([self.client_ca_file] if self.client_ca_file else [])]

    def _current_stamp(self) -> tuple[float, ...]:
        return tuple(path.stat().st_mtime_ns for path in self._files())

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        self._stamp = self._current_stamp()
        pair = (self.key_file.read_bytes(), self.cert_file.read_bytes())
        roots = self.client_ca_file.read_bytes() if self.client_ca_file else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's fetcher: a new configuration when the files changed, else None."""
        try:
            if self._current_stamp() == self._stamp:
                return None
            configuration = self.configuration()
        except (OSError, ValueError):
            log.error("TLS files could not be re-read; the previous certificate stays in use", exc_info=True)
            return None
        log.info("TLS certificate re-read from %s", self.cert_file)
        return configuration


def server_credentials(security: SecuritySettings) -> grpc.ServerCredentials:
    files = CertificateFiles(security)
    try:
        initial = files.configuration()
    except OSError as exc:
        raise RuntimeError(
            f"TLS is on but its files cannot be read ({exc.filename}); run `medgate credentials` for the "
            "development ones or set security.cert_file and security.key_file"
        ) from None
    return grpc.dynamic_ssl_server_credentials(
        initial, files.fetch, require_client_authentication=security.require_client_cert
    )


def check_plaintext_allowed(host: str, security: SecuritySettings) -> None:
    """Plaintext only on loopback, unless the loudly named setting says otherwise."""
    if is_loopback(host) or security.allow_plaintext_on_network:
        return
    raise RuntimeError(
        f"refusing to listen on {host} without TLS: patient images would cross the network in clear text "
        "(turn security.tls on, or set MEDGATE_SECURITY_ALLOW_PLAINTEXT_ON_NETWORK=true if something else encrypts)"
    )

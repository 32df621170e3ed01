"""The audit trail's optional mirror to a syslog collector: RFC 5424 messages over UDP (RFC 5426) or TCP (RFC 6587).

Best effort by design: the fsynced file is the record, and a collector that is down must not stop
the service or delay calls for long. A failed send is logged (once per outage, not once per event)
and a TCP collector is retried at most every ``retry_s``. The target is ``host:port`` (UDP),
``udp://host:port`` or ``tcp://host:port``; an IPv6 host goes in brackets (``udp://[::1]:514``).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime

from services.audit.events import iso_ms

log = logging.getLogger("medgate.audit")

# RFC 5424 PRI = facility * 8 + severity; facility 10 is security/authorization (authpriv).
FACILITY_AUTHPRIV = 10
SEVERITY_WARNING = 4
SEVERITY_NOTICE = 5
MSGID = "MEDGATE-AUDIT"
_BOM = b"\xef\xbb\xbf"  # RFC 5424 6.4: a UTF-8 MSG starts with the byte order mark


def parse_target(target: str) -> tuple[str, str, int]:
    """``udp://host:514`` -> (``udp``, ``host``, 514); a target without a scheme is UDP."""
    scheme, sep, rest = target.partition("://")
    if not sep:
        scheme, rest = "udp", target
    scheme = scheme.lower()
    if scheme not in {"udp", "tcp"}:
        raise ValueError(f"security.audit_syslog: scheme must be udp or tcp, not {scheme!r}")
    host, _, port = rest.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("security.audit_syslog must be [udp://|tcp://]host:port")
    return scheme, host, int(port)


def _printable(value: str, limit: int) -> str:
    """RFC 5424 header fields are PRINTUSASCII without spaces; NILVALUE when nothing is left."""
    cleaned = "".join(c for c in value if 33 <= ord(c) <= 126)[:limit]
    return cleaned or "-"


def format_message(
    payload: bytes, moment: datetime, *, hostname: str, app_name: str, procid: int, severity: int
) -> bytes:
    """One RFC 5424 message: ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID - BOM payload``."""
    header = (
        f"<{FACILITY_AUTHPRIV * 8 + severity}>1 {iso_ms(moment)} {_printable(hostname, 255)} "
        f"{_printable(app_name, 48)} {procid} {MSGID} - "
    )
    return header.encode("ascii") + _BOM + payload


class SyslogMirror:
    """Sends each audit line to a syslog collector; never raises."""

    def __init__(self, target: str, *, hostname: str, app_name: str, timeout_s: float = 1.0, retry_s: float = 30.0):
        self.scheme, self.host, self.port = parse_target(target)
        self.hostname = hostname
        self.app_name = app_name
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self._sock: socket.socket | None = None
        self._down_since: float | None = None

    def send(self, payload: bytes, moment: datetime, *, failed: bool) -> bool:
        """Send one event; False (and logged once per outage) when the collector did not take it."""
        message = format_message(
            payload, moment, hostname=self.hostname, app_name=self.app_name, procid=os.getpid(),
            severity=SEVERITY_WARNING if failed else SEVERITY_NOTICE,
        )  # fmt: skip
        retry_later = self._down_since is not None and time.monotonic() - self._down_since < self.retry_s
        if retry_later and self.scheme == "tcp":
            return False
        try:
            sock = self._connect()
            if self.scheme == "tcp":
                sock.sendall(f"{len(message)} ".encode() + message)  # RFC 6587 octet counting
            else:
                sock.send(message)
        except OSError as exc:
            self._drop()
            if self._down_since is None:
                log.error("audit syslog mirror %s:%d failed (%s); the audit file still has every event",
                          self.host, self.port, type(exc).__name__)  # fmt: skip
            self._down_since = time.monotonic()
            return False
        if self._down_since is not None:
            log.warning("audit syslog mirror %s:%d is back", self.host, self.port)
            self._down_since = None
        return True

    def _connect(self) -> socket.socket:
        if self._sock is not None:
            return self._sock
        kind = socket.SOCK_STREAM if self.scheme == "tcp" else socket.SOCK_DGRAM
        family, _, _, _, address = socket.getaddrinfo(self.host, self.port, type=kind)[0]
        sock = socket.socket(family, kind)
        sock.settimeout(self.timeout_s)
        try:
            sock.connect(address)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def close(self) -> None:
        self._drop()

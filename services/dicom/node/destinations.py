"""Where results go: C-STORE peers (``AE@host:port``) and DICOMweb STOW-RS endpoints, each with a stable key.

The key names a destination in the outbox ledger, so what was sent where survives a restart and a
destination added later never receives what was sent before it existed.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # the AE VR: no backslash, no control characters


class DestinationError(ValueError):
    """A destination setting that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Destination:
    """A C-STORE peer (``kind`` "cstore": ae_title, host, port) or a STOW-RS endpoint (``kind`` "stow": url)."""

    kind: str
    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @property
    def key(self) -> str:
        if self.kind == "cstore":
            return f"cstore:{self.ae_title}@{self.host}:{self.port}"
        return f"stow:{self.url}"

    def __str__(self) -> str:
        if self.kind == "cstore":
            return f"{self.ae_title}@{self.host}:{self.port}"
        parts = urllib.parse.urlsplit(self.url)  # never print credentials a URL might carry
        return urllib.parse.urlunsplit((parts.scheme, parts.hostname or "", parts.path, "", ""))


def parse_cstore(text: str) -> Destination:
    """``AE@host:port`` (``AE@[::1]:104`` for IPv6)."""
    ae, at, address = text.strip().rpartition("@")
    if not at or not ae.strip() or not address:
        raise DestinationError(f"destination {text.strip()!r} must be AE@host:port")
    if not _AE.match(ae) or not ae.strip():
        raise DestinationError(f"destination {text.strip()!r}: AE title must be 1-16 printable characters")
    host, colon, port_text = address.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not colon or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise DestinationError(f"destination {text.strip()!r} must be AE@host:port with a port from 1 to 65535")
    return Destination("cstore", ae_title=ae.strip(), host=host, port=int(port_text))


def parse_stow(url: str) -> Destination:
    parts = urllib.parse.urlsplit(url.strip())
    if parts.scheme not in {"http", "https"} or not parts.hostname:
        raise DestinationError("dicom.stow_url must be an http(s) URL (the DICOMweb base, e.g. http://pacs/dicom-web)")
    return Destination("stow", url=url.strip().rstrip("/"))


def parse_destinations(cstore: str, stow_url: str = "") -> list[Destination]:
    """Every destination of the settings: comma-separated ``AE@host:port``, then the STOW-RS URL."""
    found = [parse_cstore(item) for item in cstore.split(",") if item.strip()]
    if stow_url.strip():
        found.append(parse_stow(stow_url))
    keys = [d.key for d in found]
    if len(set(keys)) != len(keys):
        raise DestinationError("a destination is named twice")
    return found

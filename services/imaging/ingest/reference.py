"""By-reference input: an image the gateway reads itself, from an allow-listed folder or DICOMweb server.

A PACS router on the gateway's host, or an archive with a DICOMweb face, need not push every 7 MB image through
gRPC: it names the file or the WADO-RS instance instead. Everything outside the allow-lists is refused with
:class:`ReferenceDenied` (PERMISSION_DENIED) *before* anything is opened or any connection is made, and the
messages never echo the path or URL back (they name the field and the rule).

* A file path must be absolute and resolve (symlinks and ``..`` resolved) under one of ``roots``; the file is
  opened without following a final symlink, and the path the open file really has (``/proc/self/fd``) is checked
  again, so a symlink swapped in between the check and the open is caught. Only regular files, at most
  ``max_bytes``.
* A WADO-RS URL must have the scheme, host, port and path prefix of one of ``base_urls`` and then exactly
  ``studies/{uid}/series/{uid}/instances/{uid}``; no user info, query, fragment or encoded characters. The fetch
  follows no redirect, uses no proxy from the environment, passes the caller's bearer token on, reads at most
  ``max_bytes`` and gives up after ``timeout_s`` in all.

Pure: no gRPC (``requests`` for HTTP, a dependency of dicomweb-client). Blocking: call it off the event loop.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from services.imaging.errors import LimitExceeded
from services.rpc.errors import BadRequest
from services.security.errors import PermissionDenied

_UID = r"[0-9]+(?:\.[0-9]+)*"
_INSTANCE_PATH = re.compile(rf"^studies/{_UID}/series/{_UID}/instances/{_UID}/?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
_CHUNK = 1 << 20


class ReferenceDenied(PermissionDenied):
    """A reference outside the allow-lists (PERMISSION_DENIED); the message names the rule, never the target."""


class ReferenceNotFound(LookupError):
    """An allowed reference that names nothing (NOT_FOUND)."""


class ReferenceUnavailable(RuntimeError):
    """The DICOMweb server could not be reached or failed (UNAVAILABLE)."""


@dataclass(frozen=True)
class ReferencePolicy:
    """The allow-lists and limits (``gateway.reference_*`` settings, ``ingest.max_input_bytes``)."""

    roots: tuple[Path, ...]
    base_urls: tuple[str, ...]
    max_bytes: int
    timeout_s: float

    @classmethod
    def from_settings(cls, roots: str, base_urls: str, *, max_bytes: int, timeout_s: float) -> ReferencePolicy:
        """From the comma-separated settings; each root is resolved once, now."""
        return cls(
            roots=tuple(Path(os.path.realpath(r.strip())) for r in roots.split(",") if r.strip()),
            base_urls=tuple(u.strip() for u in base_urls.split(",") if u.strip()),
            max_bytes=max_bytes,
            timeout_s=timeout_s,
        )


# --- files ----------------------------------------------------------------------------------------------------------


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(root) or path.startswith(str(root).rstrip(os.sep) + os.sep) for root in roots)


def check_file(path: str, policy: ReferencePolicy) -> str:
    """The resolved path of ``path`` when it is under an allowed root; ReferenceDenied (or BadRequest) otherwise."""
    field = "image.reference.file_path"
    if not policy.roots:
        raise ReferenceDenied(f"{field}: file references are not enabled on this server (gateway.reference_roots)")
    if not path or "\x00" in path:
        raise BadRequest(f"{field} is empty or holds a NUL character")
    if not os.path.isabs(path):
        raise BadRequest(f"{field} must be an absolute path")
    resolved = os.path.realpath(path)  # symlinks and `..`, whether or not the file exists
    if not _under(resolved, policy.roots):
        raise ReferenceDenied(f"{field} is outside the allowed roots (gateway.reference_roots)")
    return resolved


def read_file(path: str, policy: ReferencePolicy) -> bytes:
    """The bytes of the allowed file ``path`` (at most ``policy.max_bytes``)."""
    field = "image.reference.file_path"
    resolved = check_file(path, policy)
    try:
        # O_NONBLOCK: a FIFO put under the root must not hang the open (it is refused as not a regular file).
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)
        fd = os.open(resolved, flags)
    except FileNotFoundError:
        raise ReferenceNotFound(f"{field}: no such file under the allowed roots") from None
    except OSError:
        # ELOOP (a symlink put there since the check), EACCES, EISDIR...: nothing this server may read.
        raise ReferenceDenied(f"{field} cannot be read under the allowed roots") from None
    try:
        opened = _opened_path(fd)
        if opened is not None and not _under(opened, policy.roots):
            raise ReferenceDenied(f"{field} is outside the allowed roots (gateway.reference_roots)")
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReferenceDenied(f"{field} is not a regular file")
        if info.st_size > policy.max_bytes:
            raise LimitExceeded("max_input_bytes", policy.max_bytes, info.st_size, what=field)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            # Sized by fstat: read(max_bytes + 1) allocates the whole limit (64 MiB) before shrinking it, which
            # cost 5-10 ms for RG1_UNCI.dcm's 7.2 MB against 0.8 ms (bench/bench_floor.py's by-reference arm).
            data = handle.read(info.st_size + 1)
            if len(data) > info.st_size:  # it grew since fstat: the rest, up to the limit
                data += handle.read(policy.max_bytes + 1 - len(data))
        if len(data) > policy.max_bytes:
            raise LimitExceeded("max_input_bytes", policy.max_bytes, what=field)
        return data
    finally:
        os.close(fd)


def _opened_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None


# --- DICOMweb -------------------------------------------------------------------------------------------------------


def _origin(url: str) -> tuple[str, str, int, str] | None:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        return None
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        return None
    return scheme, parts.hostname.lower(), port, parts.path


def check_url(url: str, policy: ReferencePolicy) -> str:
    """``url`` when it is a WADO-RS instance URL under an allowed base URL; ReferenceDenied otherwise.

    Checked on the text alone, before any connection: scheme, host and port equal to a base's, the base's path
    as a prefix, then exactly ``studies/{uid}/series/{uid}/instances/{uid}``.
    """
    field = "image.reference.wadors_url"
    if not policy.base_urls:
        raise ReferenceDenied(
            f"{field}: DICOMweb references are not enabled on this server (gateway.reference_base_urls)"
        )
    denied = ReferenceDenied(f"{field} is not a WADO-RS instance URL under the allowed base URLs")
    if not url or len(url) > 2048 or any(c in url for c in "\\%@?#") or any(ord(c) <= 32 or ord(c) > 126 for c in url):
        raise denied
    target = _origin(url)
    if target is None:
        raise denied
    scheme, host, port, path = target
    for base in policy.base_urls:
        allowed = _origin(base)
        if allowed is None or (scheme, host, port) != allowed[:3]:
            continue
        prefix = allowed[3].rstrip("/") + "/"
        if path.startswith(prefix) and _INSTANCE_PATH.match(path[len(prefix) :]):
            return url
    raise denied


def fetch_wadors(url: str, policy: ReferencePolicy, *, token: str = "", deadline: float | None = None) -> bytes:
    """The DICOM Part 10 bytes of the WADO-RS instance ``url`` (checked first: nothing else is ever fetched).

    ``token``: the caller's bearer token, passed on. ``deadline``: ``time.monotonic()`` the caller stops waiting;
    the fetch gives up at the earlier of that and ``policy.timeout_s`` from now.
    """
    import requests

    field = "image.reference.wadors_url"
    check_url(url, policy)
    stop = time.monotonic() + policy.timeout_s
    if deadline is not None:
        stop = min(stop, deadline)
    remaining = stop - time.monotonic()
    if remaining <= 0:
        raise TimeoutError(f"no time left to fetch {field}")
    headers = {"Accept": _ACCEPT}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    session = requests.Session()
    session.trust_env = False  # no proxy, netrc or CA bundle from the environment
    try:
        with session.get(url, headers=headers, stream=True, allow_redirects=False, timeout=remaining) as answer:
            status = answer.status_code
            if 300 <= status < 400:
                raise ReferenceDenied(f"{field}: the DICOMweb server answered with a redirect, which is not followed")
            if status in (401, 403):
                raise ReferenceDenied(f"{field}: the DICOMweb server refused the caller's credentials ({status})")
            if status == 404:
                raise ReferenceNotFound(f"{field}: the DICOMweb server has no such instance")
            if status != 200:
                raise ReferenceUnavailable(f"{field}: the DICOMweb server answered {status}")
            declared = answer.headers.get("Content-Length", "")
            allowance = policy.max_bytes + 64 * 1024  # multipart headers and boundaries
            if declared.isdigit() and int(declared) > allowance:
                raise LimitExceeded("max_input_bytes", policy.max_bytes, what=field)
            body = bytearray()
            for chunk in answer.iter_content(_CHUNK):
                body += chunk
                if len(body) > allowance:
                    raise LimitExceeded("max_input_bytes", policy.max_bytes, what=field)
                if time.monotonic() > stop:
                    raise TimeoutError(f"{field}: the fetch took longer than allowed")
            content_type = answer.headers.get("Content-Type", "")
    except requests.TooManyRedirects:
        raise ReferenceDenied(f"{field}: the DICOMweb server answered with a redirect, which is not followed") from None
    except requests.Timeout:
        raise TimeoutError(f"{field}: the fetch took longer than allowed") from None
    except requests.RequestException as exc:
        raise ReferenceUnavailable(f"{field}: the DICOMweb server cannot be reached ({type(exc).__name__})") from None
    finally:
        session.close()
    data = first_part(bytes(body), content_type)
    if len(data) > policy.max_bytes:
        raise LimitExceeded("max_input_bytes", policy.max_bytes, what=field)
    return data


def first_part(body: bytes, content_type: str) -> bytes:
    """The first part of a ``multipart/related`` body (WADO-RS), or ``body`` when it is a single part."""
    kind, _, params = content_type.partition(";")
    if kind.strip().lower() != "multipart/related":
        return body
    boundary = ""
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.strip().lower() == "boundary":
            boundary = value.strip().strip('"')
    if not boundary:
        raise ReferenceUnavailable("image.reference.wadors_url: the DICOMweb answer has no multipart boundary")
    delimiter = b"--" + boundary.encode("ascii", "replace")
    start = body.find(delimiter)
    header_end = body.find(b"\r\n\r\n", start) if start >= 0 else -1
    if header_end < 0:
        raise ReferenceUnavailable("image.reference.wadors_url: the DICOMweb answer holds no instance")
    content = header_end + 4
    end = body.find(b"\r\n" + delimiter, content)
    return body[content : end if end >= 0 else len(body)]

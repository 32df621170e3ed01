"""The audit trail's hash chain: each line carries the digest of the line before it and of itself; ``verify`` checks it.

A chained line is the event's JSON object with one more member, last::

    {...event...,"chain":{"seq":7,"alg":"sha256","prev":"<64 hex>","hash":"<64 hex>"}}\\n

``prev`` is the digest of the previous line's exact bytes (newline included); ``hash`` is the digest of
this line's bytes up to and including ``prev`` (every byte of the line but the hash itself). The first
line of a file has ``"start":"file"`` and ``prev`` = the digest of a genesis value naming the file
(``audit-YYYYMMDD.jsonl``), so records moved between day files are caught. ``seq`` counts from 1 and
tells a deletion from a reordering. Where the line before could not be chained onto (a write cut
short by a crash, or a line without a chain), the writer starts again with ``"start":"torn"`` or
``"start":"unchained"``, seq 1, and ``prev`` = the digest of that line as it is (for a torn line, of the
line before it and the torn line): the break is recorded, never hidden, and what it follows can no
longer be changed or cut away unnoticed.

The digest is SHA-256, or HMAC-SHA256 under a key (``"alg":"hmac-sha256"`` and ``"kid"``, the key's
id): without the key, someone who can write the file cannot recompute the chain. A bare SHA-256 chain
catches edits, deletions and reorderings by anyone who does not recompute every later line.

A key is rotated by a record under the old key that announces the new key's id (Security Alert / Security
Configuration, ``medgate audit rotate-key``): given both keys, ``verify`` accepts the new key's records from
there on (the old key's still, until the first record under the new one; never after it), and a record
under another key without such an announcement is a break.

What no in-file chain can show: the last records of a file cut off, or a whole file removed (the
syslog mirror receives every chained line and is the outside copy to compare against: ``mirror.py``).
Pure: no gRPC.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GENESIS = b"medgate-audit-chain/1 genesis "
KEY_MIN_BYTES = 32
_HASH_FIELD = b',"hash":"'
_RECORD = re.compile(
    rb',"chain":\{"seq":(?P<seq>[1-9][0-9]{0,17}),"alg":"(?P<alg>sha256|hmac-sha256)"(?:,"kid":"(?P<kid>[0-9a-f]{16})")?'
    rb'(?:,"start":"(?P<start>file|torn|unchained)")?,"prev":"(?P<prev>[0-9a-f]{64})","hash":"(?P<hash>[0-9a-f]{64})"\}\}\n\Z'
)


class AuditKeyError(ValueError):
    """The HMAC key file cannot be used (missing, too short, readable by others)."""


def load_key(path: Path) -> bytes:
    """The HMAC key in ``path``: its bytes less surrounding whitespace, at least 32, the file 0600 or stricter."""
    try:
        info = path.stat()
        key = path.read_bytes().strip()
    except OSError as exc:
        raise AuditKeyError(f"audit key file {path} cannot be read ({type(exc).__name__})") from None
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise AuditKeyError(f"audit key file {path} is readable by others: chmod 600 it")
    if len(key) < KEY_MIN_BYTES:
        raise AuditKeyError(f"audit key file {path} holds {len(key)} bytes; at least {KEY_MIN_BYTES} are needed")
    return key


@dataclass(frozen=True)
class Digest:
    """SHA-256, or HMAC-SHA256 under ``key``."""

    key: bytes | None = None

    @property
    def alg(self) -> str:
        return "hmac-sha256" if self.key else "sha256"

    @property
    def kid(self) -> str:
        """The key's id (not the key): names which key signed a record, so a wrong key is not read as tampering."""
        return hashlib.sha256(b"medgate-audit key id " + self.key).hexdigest()[:16] if self.key else ""

    def __call__(self, data: bytes) -> str:
        return self.hasher(data).hexdigest()

    def hasher(self, data: bytes = b"") -> hashlib._Hash | hmac.HMAC:
        return hmac.new(self.key, data, hashlib.sha256) if self.key else hashlib.sha256(data)

    def genesis(self, name: str) -> str:
        return self(GENESIS + name.encode())


@dataclass(frozen=True)
class Link:
    """Where the next line goes: its seq, the digest it carries as ``prev``, and why it starts a chain (if it does)."""

    seq: int
    prev: str
    start: str = ""  # "file", "torn", "unchained" or "" (continues)
    torn: bool = False  # the file does not end with a newline: one is written first


def chain_of(line: bytes) -> re.Match[bytes] | None:
    """The ``chain`` member of a line (exact bytes, newline included): ``seq``, ``alg``, ``kid``, ``start``, ``prev``,
    ``hash`` groups; None for a line that is not a chained record."""
    return _RECORD.search(line)


def own_hash_ok(line: bytes, match: re.Match[bytes], digest: Digest) -> bool:
    """Whether ``line`` matches its own ``hash`` under ``digest``."""
    return hmac.compare_digest(digest(line[: match.start("hash") - len(_HASH_FIELD)]), match["hash"].decode())


def torn_anchor(before: bytes, name: str) -> bytes:
    """What a restart after a torn line hashes in front of it: the line before (or the file's genesis value).

    It pins the records before the torn one: they cannot be cut away to make the torn line look like the first.
    """
    return before or GENESIS + name.encode()


def after(tail: bytes, name: str, digest: Digest, before: bytes = b"") -> Link:
    """The link for a line appended after ``tail`` (the file's last line, exact bytes; empty for an empty file).

    ``before`` is the line before ``tail`` (empty when there is none); only a torn ``tail`` needs it.
    """
    if not tail:
        return Link(1, digest.genesis(name), "file")
    if not tail.endswith(b"\n"):
        return Link(1, digest(torn_anchor(before, name) + tail + b"\n"), "torn", torn=True)
    match = _RECORD.search(tail)
    if match is None:
        return Link(1, digest(tail), "unchained")
    return Link(int(match["seq"]) + 1, digest(tail))


def seal(body: bytes, link: Link, digest: Digest) -> tuple[bytes, Link]:
    """``body`` (one JSON object, no newline) as a chained line, and the link for the line after it."""
    if not (body.startswith(b"{") and body.endswith(b"}")) or body == b"{}":
        raise ValueError("an audit record must be a non-empty JSON object")
    head = body[:-1] + b',"chain":{"seq":%d,"alg":"%s"' % (link.seq, digest.alg.encode())
    if digest.key:
        head += b',"kid":"%s"' % digest.kid.encode()
    if link.start:
        head += b',"start":"%s"' % link.start.encode()
    head += b',"prev":"%s"' % link.prev.encode()
    hasher = digest.hasher(head)  # the line's own hash, then (fed the rest) the next line's prev: the head once
    rest = _HASH_FIELD + hasher.hexdigest().encode() + b'"}}\n'
    hasher.update(rest)
    return head + rest, Link(link.seq + 1, hasher.hexdigest())


def last_lines(fd: int, size: int) -> tuple[bytes, bytes]:
    """The last two lines of the file open on ``fd`` (``size`` bytes), exact bytes; ``b""`` for a line not there."""
    end, chunk, buf = size, 8192, b""
    while end > 0:
        start = max(0, end - chunk)
        buf = os.pread(fd, end - start, start) + buf
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        cut2 = buf.rfind(b"\n", 0, cut) if cut >= 0 else -1
        if cut2 >= 0 or start == 0:
            return (buf[cut2 + 1 : cut + 1], buf[cut + 1 :]) if cut >= 0 else (b"", buf)
        end, chunk = start, chunk * 2
    return b"", buf


# Verification.


class CannotVerify(ValueError):
    """The file cannot be checked as asked (keyed without the key, another key): not evidence of tampering."""


_ROTATION = b'"csd-code":"110129"'  # Security Configuration: the only event that can announce a key


def announced_key(line: bytes) -> str:
    """The successor key id a rotation record announces (``events.audit_key_rotated``), or ``""``."""
    if _ROTATION not in line:
        return ""
    try:
        record: Any = json.loads(line)
        identification = record["EventIdentification"]
        if identification["EventID"]["csd-code"] != "110113" or identification["EventOutcomeDescription"] != "OK":
            return ""
        for obj in record.get("ParticipantObjectIdentification", ()):
            if (
                obj["ParticipantObjectIDTypeCode"]["csd-code"] == "audit-hmac-key-id"
                and obj.get("ParticipantObjectDescription", {}).get("Change") == "successor"
                and re.fullmatch(r"[0-9a-f]{16}", obj["ParticipantObjectID"])
            ):
                return str(obj["ParticipantObjectID"])
    except (ValueError, KeyError, TypeError):
        return ""
    return ""


class Keyring:
    """The HMAC keys a trail may be keyed with, by key id, and which one is in force as records are read in order
    (across day files: a rotation on one day holds for the next).

    The first keyed record read may be under any of the keys (what came before it is not being read); after it,
    another key's records are accepted only once a record under the key in force announced that key.
    """

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self.digests = {digest.kid: digest for digest in map(Digest, keys)}
        self.current = ""  # the key id of the last keyed record read
        self.successor = ""  # announced by a record under ``current``, not yet used
        self.retired: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.digests)

    def ids(self) -> str:
        return ", ".join(self.digests) or "none"

    def digest(self, kid: str) -> Digest | None:
        return self.digests.get(kid)


@dataclass
class Report:
    """One file: how many records verified, the first problem (line number and what), torn lines the writer recorded."""

    path: Path
    records: int = 0
    line: int = 0
    problem: str = ""
    recorded_torn: list[int] = field(default_factory=list)
    unkeyed: int = 0  # records before the key was set (anchored by the first keyed record after them)
    rotations: list[tuple[int, str, str]] = field(default_factory=list)  # (line, old key id, new key id)
    lingering: int = 0  # records under the old key after a rotation's announcement, before the new key's first

    @property
    def ok(self) -> bool:
        return not self.problem

    def summary(self) -> str:
        name = self.path.name
        if not self.ok:
            return f"{name}: line {self.line}: {self.problem}"
        notes = [f"torn record at line {n} (a write cut short), recorded by line {n + 1}" for n in self.recorded_torn]
        if self.unkeyed:
            notes.append(f"the first {self.unkeyed} records are unkeyed (written before the key was set)")
        notes += [f"key {old} hands over to key {new} at line {n}" for n, old, new in self.rotations]
        if self.lingering:
            notes.append(f"{self.lingering} records under the outgoing key after its successor was announced")
        return f"{name}: {self.records} records verified" + "".join(f"; {note}" for note in notes)


def _split(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    lines = [part + b"\n" for part in parts[:-1]]
    return [*lines, parts[-1]] if parts[-1] else lines


def verify_file(path: Path, key: bytes | Keyring | None = None) -> Report:
    """Check ``path``'s chain; the report names the first broken line. Never quotes a record.

    ``key`` is the trail's HMAC key, or a :class:`Keyring` (several keys, a rotation; pass the same one for the
    day files in order).
    """
    ring = key if isinstance(key, Keyring) else Keyring([key] if key else [])
    bare = Digest(None)
    lines = _split(path.read_bytes())
    matches = [_RECORD.search(line) for line in lines]
    report = Report(path)

    def fail(line: int, what: str) -> Report:
        report.line, report.problem = line, what
        return report

    seen_keyed = False
    for i, (line, match) in enumerate(zip(lines, matches, strict=True), start=1):
        nxt = matches[i] if i < len(matches) else None
        if not line.endswith(b"\n"):
            return fail(i, "torn: the last record is incomplete (a write cut short; the next write records it)")
        if match is None:
            if nxt is not None and nxt["start"] == b"torn":
                report.recorded_torn.append(i)  # the restart's prev (checked next) pins these bytes
                continue
            return fail(i, "not a chained record (edited, or written without a chain)")
        kid = (match["kid"] or b"").decode()
        if match["alg"] == b"hmac-sha256":
            if not ring:
                raise CannotVerify(f"{path.name} is keyed (hmac-sha256): give the key file")
            keyed = ring.digest(kid)
            if keyed is None:
                hint = f" (announced as the successor of key {ring.current}: give its key file too)"
                raise CannotVerify(
                    f"{path.name} line {i} was keyed with key id {kid}, not {ring.ids()}"
                    + (hint if kid == ring.successor else "")
                )
            digest, seen_keyed = keyed, True
        else:
            if seen_keyed:
                return fail(i, "unkeyed record after keyed ones (written without the key, or rewritten)")
            digest = bare
            report.unkeyed += bool(ring)
        if not own_hash_ok(line, match, digest):
            return fail(i, "edited: the record does not match its own hash")
        if kid and kid != ring.current:
            if kid in ring.retired:
                why = "a process still holding the old key, or forged with it"
                return fail(i, f"a record under key {kid} after its successor took over ({why})")
            if ring.current and kid != ring.successor:
                return fail(i, f"key {kid} takes over from key {ring.current} without an announcement under it")
            if ring.current:
                report.rotations.append((i, ring.current, kid))
                ring.retired.add(ring.current)
            ring.current, ring.successor = kid, ""
        elif kid and ring.successor:
            report.lingering += 1
        if kid and (successor := announced_key(line)):
            ring.successor = successor
        seq, start, prev = int(match["seq"]), (match["start"] or b"").decode(), match["prev"].decode()
        before = matches[i - 2] if i > 1 else None
        if start == "file":
            if i > 1:
                return fail(i, "a second start of the file's chain (records from another file or copy)")
            if prev != digest.genesis(path.name):
                return fail(
                    i, f"the chain starts for another file than {path.name} (renamed, or moved from another day)"
                )
        elif i == 1:
            return fail(i, "the file's chain does not start here: records before this line were deleted")
        elif start and before is not None:
            return fail(i, "a restart after an intact record (inserted)")
        elif start == "torn":
            if prev != digest(torn_anchor(lines[i - 3] if i > 2 else b"", path.name) + lines[i - 2]):
                return fail(i, "records were deleted or moved around the torn line before this one")
        elif prev != digest(lines[i - 2]):
            if start:
                return fail(i, "records were deleted or moved just before this line")
            return fail(*_why_unlinked(i, seq, before, matches))
        if seq != (1 if start else int(before["seq"]) + 1 if before is not None else 0):
            return fail(i, "sequence number out of step with the record before it")
        report.records += 1
    if ring and report.records and not seen_keyed:
        return fail(len(lines), "no keyed record although a key was given (rewritten without the key?)")
    if not ring:
        report.unkeyed = 0
    return report


def _why_unlinked(
    i: int, seq: int, before: re.Match[bytes] | None, matches: list[re.Match[bytes] | None]
) -> tuple[int, str]:
    """Line ``i`` (self-consistent) does not carry the digest of line ``i - 1``: edited, deleted or reordered."""
    if before is None:
        return i, "follows a record without a chain"
    expected = int(before["seq"]) + 1
    if seq == expected:
        return i - 1, f"edited: line {i} no longer links to it (its hash was recomputed)"
    for j in range(i, len(matches)):  # the record that belongs here, further down (within this chain)?
        later = matches[j]
        if later is None or later["start"]:
            break
        if int(later["seq"]) == expected:
            return i, f"out of order: the record that belongs here is at line {j + 1}"
    if seq > expected:
        return i, f"{seq - expected} record(s) deleted just before this line"
    return i, "out of order: this record belongs further up"


def audit_files(path: Path) -> list[Path]:
    """``path`` itself, or the ``audit-*.jsonl`` files of a folder in name (day) order."""
    return sorted(path.glob("audit-*.jsonl")) if path.is_dir() else [path]

"""The audit trail against its syslog mirror: what the collector received compared with the day files, line by line.

The chain (``chain.py``) proves a file consistent with itself; it cannot show its last records cut off
or the whole file removed. The collector's copy can: every chained line is sent as the MSG of an RFC
5424 message (``syslog.py``), and each carries its day (``EventDateTime``), its ``seq``, ``prev`` and
``hash``. A mirrored record that is missing from its day file, or different there, is tampering (or a
file restored from an old backup); a local record the mirror lacks is only a gap, since UDP is best
effort and a collector can be down.

The mirror file is what the collector wrote: one message a line (rsyslog's file output, syslog-ng's,
a SIEM's export), each perhaps behind the collector's own prefix (its receive time, the sender's
address, a traditional ``Mmm dd hh:mm:ss host tag:`` header). The audit line is found after the
``MEDGATE-AUDIT`` MSGID and its structured data (or after the UTF-8 BOM, or at its first member) and
must then be a whole chained record: JSON, the ``chain`` member last, its own hash right. Anything else
is set aside and counted, never compared. Only records of the audit sources (hosts) that wrote the
local trail are compared: one collector often receives several hosts' trails. Reports name day
files, lines, sequence numbers and hashes; never a record's content. Pure: no gRPC.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.audit.chain import Digest, Keyring, chain_of, own_hash_ok

_MSGID = re.compile(rb"(?:^|[ >])MEDGATE-AUDIT (?:-|(?:\[(?:[^\]\\]|\\.)*\])+)(?: |$)")
_BOM = b"\xef\xbb\xbf"
_FIRST_MEMBER = b'{"EventIdentification":'
_DATE = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T[0-9:.]+Z$")
SHOWN = 12  # problems listed per day file before "and N more"


def short(digest: str) -> str:
    """A hash as reports print it: its first 16 hex digits (enough to find the line with grep)."""
    return digest[:16]


@dataclass(frozen=True)
class Record:
    """A chained audit line (exact bytes, newline included) and what identifies it."""

    line: bytes
    day: str  # the day file it belongs in: audit-YYYYMMDD.jsonl
    source: str  # AuditSourceID: the host that wrote it
    seq: int
    start: str
    prev: str
    hash: str
    kid: str


def parse_record(line: bytes) -> Record | None:
    """``line`` as a chained record (strict: one JSON object, the chain last and well-formed), or None."""
    match = chain_of(line)
    if match is None or not line.startswith(b"{"):
        return None
    try:
        message: Any = json.loads(line)
        when = _DATE.match(message["EventIdentification"]["EventDateTime"])
        source = message["AuditSourceIdentification"]["AuditSourceID"]
    except (ValueError, KeyError, TypeError):
        return None
    if when is None or not isinstance(source, str) or list(message)[-1] != "chain":
        return None
    return Record(
        line=line,
        day=f"audit-{''.join(when.groups())}.jsonl",
        source=source,
        seq=int(match["seq"]),
        start=(match["start"] or b"").decode(),
        prev=match["prev"].decode(),
        hash=match["hash"].decode(),
        kid=(match["kid"] or b"").decode(),
    )


def payload(message: bytes) -> bytes | None:
    """The MSG of one collector line: after ``MEDGATE-AUDIT`` and its structured data, else after the BOM, else from
    the record's first member; None for a line that holds no audit message at all."""
    found = _MSGID.search(message)
    if found is not None:
        rest = message[found.end() :]
    elif (at := message.find(_BOM)) >= 0 or (at := message.find(_FIRST_MEMBER)) >= 0:
        rest = message[at:]
    else:
        return None
    return rest.removeprefix(_BOM)


@dataclass
class Mirror:
    """The audit records a collector's file holds, by day file; the lines set aside and why (counted)."""

    path: Path
    records: dict[str, dict[str, Record]] = field(default_factory=dict)  # day -> hash -> record
    other: int = 0  # lines without an audit message (other senders, collector notes)
    malformed: list[int] = field(default_factory=list)  # audit messages whose record is not a whole chained line
    forged: list[int] = field(default_factory=list)  # whole records that do not match their own hash
    unknown_key: Counter[str] = field(default_factory=Counter)  # keyed with a key not given: not compared
    duplicates: int = 0


def read_mirror(path: Path, keys: Keyring) -> Mirror:
    """Parse the collector's file ``path``; records are checked against their own hash (the key by its id)."""
    mirror = Mirror(path)
    bare = Digest(None)
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw.strip():
            continue
        body = payload(raw)
        if body is None:
            mirror.other += 1
            continue
        record = parse_record(body + b"\n")
        if record is None:
            mirror.malformed.append(number)
            continue
        digest = keys.digest(record.kid) if record.kid else bare
        if digest is None:
            mirror.unknown_key[record.kid] += 1
            continue
        match = chain_of(record.line)
        if match is None or not own_hash_ok(record.line, match, digest):
            mirror.forged.append(number)
            continue
        day = mirror.records.setdefault(record.day, {})
        if record.hash in day:
            mirror.duplicates += 1  # a TCP resend, or two collectors' files joined
        day[record.hash] = record
    return mirror


@dataclass
class Comparison:
    """What the mirror shows about the local files: tampering (exit 1) and gaps (warnings)."""

    tampering: list[str] = field(default_factory=list)
    gaps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compared: int = 0  # mirrored records found, unchanged, in their day file
    missing_days: list[str] = field(default_factory=list)  # day files only the mirror has records of
    changed_days: set[str] = field(default_factory=set)  # day files the mirror shows were cut or edited
    unmirrored: list[tuple[str, int]] = field(default_factory=list)  # day files none of whose records it has

    @property
    def ok(self) -> bool:
        return not self.tampering


def _ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` -> ``1-3, 7``."""
    parts: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
        if n is not None:
            start = prev = n
    return ", ".join(parts)


def _lines(path: Path) -> list[bytes]:
    parts = path.read_bytes().split(b"\n")
    return [part + b"\n" for part in parts[:-1]]  # a torn last line is the chain check's to report


def _links(line: bytes, digests: Iterable[Digest]) -> set[str]:
    """The ``prev`` values a record written after ``line`` could carry (its writer's digest: bare or a key)."""
    return {digest(line) for digest in digests}


def compare(files: list[Path], mirror: Mirror, keys: Keyring, *, whole_trail: bool) -> Comparison:
    """Compare the day ``files`` with the ``mirror``; ``whole_trail``: ``files`` are all of the folder's day files, so
    a day the mirror has and the folder lacks is a removed file (else only the days of ``files`` are compared)."""
    result = Comparison()
    digests = [Digest(None), *keys.digests.values()]
    local: dict[str, list[tuple[int, Record]]] = {}
    sources: set[str] = set()
    for path in files:
        records = [(n, r) for n, line in enumerate(_lines(path), start=1) if (r := parse_record(line)) is not None]
        local[path.name] = records
        sources.update(r.source for _, r in records)
    foreign: Counter[str] = Counter()
    mirrored: dict[str, dict[str, Record]] = {}
    for day, by_hash in mirror.records.items():
        for digest_, record in by_hash.items():
            if record.source in sources:
                mirrored.setdefault(day, {})[digest_] = record
            else:
                foreign[record.source] += 1
    days = sorted(set(local) | (set(mirrored) if whole_trail else set()))
    for day in days:
        _compare_day(day, local.get(day), mirrored.get(day, {}), digests, result)
    if len(result.unmirrored) == 1:
        day, count = result.unmirrored[0]
        result.gaps.append(f"{day}: none of its {count} records is in the mirror")
    elif result.unmirrored:  # a mirror of a week against a year of files: one line, not one a day
        names = [day for day, _ in result.unmirrored]
        result.gaps.append(
            f"{len(names)} day files ({names[0]} to {names[-1]}, {sum(n for _, n in result.unmirrored)} records) "
            "have none of their records in the mirror"
        )
    if foreign:
        hosts = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        result.notes.append(
            f"{sum(foreign.values())} mirrored record(s) of other audit sources ({hosts}) not compared"
            if sources
            else f"no local record names its audit source: the mirror's {sum(foreign.values())} record(s) "
            f"(sources {hosts}) were not compared"
        )
    return result


def _compare_day(
    day: str,
    records: list[tuple[int, Record]] | None,
    mirrored: dict[str, Record],
    digests: list[Digest],
    out: Comparison,
) -> None:
    if records is None:
        seqs = sorted({r.seq for r in mirrored.values()})
        first = min(mirrored.values(), key=lambda r: (r.start != "file", r.seq))
        out.tampering.append(
            f"{day}: missing locally; the mirror holds {len(mirrored)} of its records (seq {_ranges(seqs)}, "
            f"first hash {short(first.hash)}): the day file was removed or moved away"
        )
        out.missing_days.append(day)
        return
    by_hash = {r.hash: (n, r) for n, r in records}
    position = {n: i for i, (n, _) in enumerate(records)}
    by_prev = {r.prev: (n, r) for n, r in records}
    after: dict[str, int] = {}  # a prev value -> the local line it links to
    for n, r in records:
        for link in _links(r.line, digests):
            after[link] = n
    problems: list[str] = []
    differing: set[int] = set()
    for record in mirrored.values():
        if record.hash in by_hash:
            n, mine = by_hash[record.hash]
            if mine.line == record.line:
                out.compared += 1
            else:
                differing.add(n)
                problems.append(f"line {n} (seq {mine.seq}, hash {short(record.hash)}): differs from the mirror's copy")
    missing = [r for r in mirrored.values() if r.hash not in by_hash]
    # Runs: missing records that follow one another (the next one's prev is the digest of the one before).
    predecessor: dict[str, Record] = {}  # a prev value -> the missing record it is the digest of
    for record in missing:
        for link in _links(record.line, digests):
            predecessor[link] = record
    successor = {r.prev: r for r in missing}
    heads = [r for r in missing if predecessor.get(r.prev, r) is r]  # not the successor of another missing one
    last_line = records[-1][0] if records else 0
    for head in sorted(heads, key=lambda r: (r.seq, r.hash)):
        run, seen = [head], {head.hash}
        while nxt := next((successor[link] for link in _links(run[-1].line, digests) if link in successor), None):
            if nxt.hash in seen:
                break
            run.append(nxt)
            seen.add(nxt.hash)
        span = f"seq {run[0].seq}" + (f"-{run[-1].seq}" if len(run) > 1 else "")
        what = f"{len(run)} mirrored record(s) ({span}, first hash {short(head.hash)}) not in the file"
        if head.prev in after:
            n = after[head.prev]
            if n == last_line:
                problems.append(f"after line {n}, its last: {what}: its tail was cut")
            elif head.prev in by_prev and by_prev[head.prev][1].hash in mirrored:
                m = by_prev[head.prev][0]  # the mirror had both: the file was cut here and written on
                problems.append(f"after line {n}: {what}: cut away, and the file written on from line {m}")
            elif head.prev in by_prev and len(run) == 1:
                m, mine = by_prev[head.prev]
                differing.add(m)
                problems.append(
                    f"line {m} (seq {mine.seq}, hash {short(mine.hash)}): differs from the mirror's copy "
                    f"(hash {short(head.hash)}): edited and re-hashed"
                )
            elif head.prev in by_prev:
                m = by_prev[head.prev][0]
                instead: list[int] = []  # the lines written where the mirrored ones were
                for number, mine in records[position[m] :]:
                    if mine.hash in mirrored or number != m + len(instead):
                        break
                    instead.append(number)
                differing.update(instead)
                problems.append(f"from line {m}: {what}, line(s) {_ranges(instead)} in their place: rewritten")
            else:
                problems.append(f"after line {n}: {what}: deleted")
        elif head.start == "file" and head.prev in {d.genesis(day) for d in digests}:
            where = "the file has no record left" if not records else "its first records were deleted"
            problems.append(f"before line 1: {what}: {where}")
        else:
            problems.append(
                f"{what} (what it follows is in neither: deleted after a mirror gap, or sent by someone else)"
            )
    if problems:
        out.changed_days.add(day)
        out.tampering += [f"{day}: {p}" for p in problems[:SHOWN]]
        if len(problems) > SHOWN:
            out.tampering.append(f"{day}: ... and {len(problems) - SHOWN} more")
    absent = [n for n, r in records if r.hash not in mirrored and n not in differing]
    if absent and len(absent) == len(records):
        out.unmirrored.append((day, len(records)))
    elif absent:
        out.gaps.append(f"{day}: line(s) {_ranges(absent)} not in the mirror")

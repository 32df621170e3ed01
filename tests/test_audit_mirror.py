"""`medgate audit verify --mirror`: the day files against what a real syslog collector (UDP and TCP, in this process)
received; `verify` recording itself in the trail; HMAC key rotation announced in the chain."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients import cli
from services.audit import AuditFile, AuditKey, AuditLog
from services.audit.chain import Digest
from services.audit.mirror import payload
from tests.test_audit_chain import DAY, NAME, STUDY, access, key_file, lines_of, records, rewrite

NEXT_DAY = "audit-20261206.jsonl"


class Collector:
    """A syslog collector writing each message it receives as one line of a file, behind its own prefix, as rsyslog's
    file output does: ``<receive time> <sender> <the RFC 5424 message>`` (``traditional``: the old BSD header, the
    message's MSG only)."""

    def __init__(self, path: Path, *, traditional: bool = False) -> None:
        self.path = path
        self.traditional = traditional
        self.messages: list[bytes] = []

    def store(self, message: bytes, sender: str) -> None:
        self.messages.append(message)
        if self.traditional:  # "Dec  5 09:00:00 gw-1 medgate-test[123]: " + MSG (rsyslog's traditional format)
            header = re.match(rb"<\d+>1 \S+ (\S+) (\S+) (\S+) \S+ - ", message)
            assert header is not None
            host, app, pid = header.groups()
            line = b"Dec  5 09:00:00 " + host + b" " + app + b"[" + pid + b"]: " + message[header.end() :]
        else:
            line = f"{dt.datetime.now(dt.UTC).isoformat()} {sender} ".encode() + message
        with self.path.open("ab") as out:
            out.write(line + b"\n")

    def write(self, lines: list[bytes]) -> None:
        """Rewrite the collector's file (to model what it did not receive)."""
        self.path.write_bytes(b"".join(lines))


@pytest.fixture
def udp(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield f"udp://127.0.0.1:{sock.getsockname()[1]}", sock


def mirrored_log(
    directory: Path,
    target: str,
    sock: socket.socket,
    collector: Collector,
    count: int,
    *,
    when: dt.datetime = DAY,
    key: bytes | None = None,
) -> None:
    """``count`` events written with the UDP mirror on; the collector stores every datagram it gets."""
    log = AuditLog(directory, application="medgate-test", syslog=target, host="h", key=key)
    for i in range(count):
        log.write(access(f"r-{when:%d}-{i}", when))
    log.close()
    for _ in range(count):
        message, sender = sock.recvfrom(65535)
        collector.store(message, sender[0])


def reseal(record: bytes) -> bytes:
    """``record`` with its own hash recomputed (SHA-256): what anyone can do without the key."""
    head = record[: record.index(b',"hash":"')]
    return head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}}\n'


def verify(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(["audit", "verify", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def no_content(text: str) -> None:
    """What a report may never show: a record's content (the user, the study, the request ids)."""
    assert "dr-lee" not in text and STUDY not in text and "r-05-" not in text and "idp.example" not in text


@pytest.fixture
def trail(tmp_path: Path, udp: tuple[str, socket.socket]) -> tuple[Path, Collector]:
    """Six records on one day, every one mirrored over UDP."""
    collector = Collector(tmp_path / "collector.log")
    mirrored_log(tmp_path / "audit", *udp, collector, 6)
    return tmp_path / "audit", collector


def test_an_intact_trail_matches_its_mirror(trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]) -> None:
    directory, collector = trail
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 0, out
    assert "mirror collector.log: 6 audit record(s), 6 found unchanged in their day file" in out
    assert "OK: 6 records in 1 file(s), every chain intact" in out and "warning" not in out


def test_a_cut_tail_passes_the_chain_but_not_the_mirror(
    trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    path = directory / NAME
    rewrite(path, lines_of(path)[:4])  # the last two records cut away at a line boundary
    code, out, _ = verify(capsys, str(directory))
    assert code == 0  # what the chain alone cannot see
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 1, out
    assert re.search(
        rf"TAMPERED: {NAME}: after line 4, its last: 2 mirrored record\(s\) \(seq 5-6, first hash [0-9a-f]{{16}}\) "
        r"not in the file: its tail was cut",
        out,
    ), out
    assert "BROKEN: 1 mirror finding(s); 4 records verified before the breaks" in out
    no_content(out)


def test_a_tail_cut_then_written_on_is_caught(
    trail: tuple[Path, Collector], udp: tuple[str, socket.socket], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    path = directory / NAME
    rewrite(path, lines_of(path)[:3])
    mirrored_log(directory, *udp, collector, 2)  # the servers go on writing (and mirroring) after the cut
    code, out, _ = verify(capsys, str(directory))
    assert code == 0 and "5 records verified" in out
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 1, out
    assert re.search(
        rf"TAMPERED: {NAME}: after line 3: 3 mirrored record\(s\) \(seq 4-6, first hash [0-9a-f]{{16}}\) not in the "
        r"file: cut away, and the file written on from line 4",
        out,
    ), out
    assert "8 audit record(s), 5 found unchanged" in out and "not in the mirror" not in out


def test_a_removed_day_file_is_named(
    tmp_path: Path, udp: tuple[str, socket.socket], capsys: pytest.CaptureFixture[str]
) -> None:
    collector = Collector(tmp_path / "collector.log")
    mirrored_log(tmp_path / "audit", *udp, collector, 3)
    mirrored_log(tmp_path / "audit", *udp, collector, 2, when=DAY + dt.timedelta(days=1))
    (tmp_path / "audit" / NAME).unlink()
    code, out, _ = verify(capsys, str(tmp_path / "audit"))
    assert code == 0  # the remaining day verifies
    code, out, _ = verify(capsys, str(tmp_path / "audit"), "--mirror", str(collector.path))
    assert code == 1, out
    assert re.search(
        rf"TAMPERED: {NAME}: missing locally; the mirror holds 3 of its records \(seq 1-3, "
        r"first hash [0-9a-f]{16}\): the day file was removed",
        out,
    ), out
    assert f"{NEXT_DAY}: 2 records verified" in out and "2 found unchanged" in out
    no_content(out)


def test_an_edited_line_is_named_by_the_mirror(
    trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    path = directory / NAME
    lines = lines_of(path)
    lines[2] = lines[2].replace(b'"request_id":"r-05-2"', b'"request_id":"r-05-9"')
    rewrite(path, lines)
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 1
    assert f"{NAME}: line 3: edited" in out  # the chain
    assert re.search(rf"TAMPERED: {NAME}: line 3 \(seq 3, hash [0-9a-f]{{16}}\): differs from the mirror's copy", out)
    assert "not in the mirror" not in out  # the edited line is tampering, not a gap
    no_content(out)


def test_a_rewritten_chain_passes_the_chain_but_not_the_mirror(
    trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    path = directory / NAME
    lines = lines_of(path)
    lines[1] = lines[1].replace(b'"request_id":"r-05-1"', b'"request_id":"r-05-7"')
    del lines[3]
    # The forger recomputes every link (SHA-256, no key): the chain alone is consistent again.
    forged, link = [], hashlib.sha256(b"medgate-audit-chain/1 genesis " + NAME.encode()).hexdigest()
    for seq, line in enumerate(lines, start=1):
        head = re.sub(rb',"chain":\{.*\}\}\n$', b"", line)
        head += b',"chain":{"seq":%d,"alg":"sha256"' % seq + (b',"start":"file"' if seq == 1 else b"")
        head += b',"prev":"' + link.encode() + b'"'
        line = head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}}\n'
        forged.append(line)
        link = hashlib.sha256(line).hexdigest()
    rewrite(path, forged)
    code, out, _ = verify(capsys, str(directory))
    assert code == 0 and "5 records verified" in out
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 1, out
    assert re.search(
        rf"TAMPERED: {NAME}: from line 2: 5 mirrored record\(s\) \(seq 2-6, first hash [0-9a-f]{{16}}\) not in the "
        r"file, line\(s\) 2-5 in their place: rewritten",
        out,
    ), out
    assert "not in the mirror" not in out  # the lines written in their place are no gap
    no_content(out)


def test_mirror_gaps_are_warnings(trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]) -> None:
    directory, collector = trail
    kept = lines_of(collector.path)
    collector.write([kept[0], *kept[3:]])  # datagrams 2 and 3 never arrived
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 0, out
    assert f"warning: {NAME}: line(s) 2-3 not in the mirror (UDP is best effort" in out
    assert "4 found unchanged" in out and "TAMPERED" not in out


def test_days_the_mirror_does_not_cover_are_one_warning(
    trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    log = AuditLog(directory, application="medgate-test", host="h")  # earlier days, before the collector's file
    for days in (3, 2, 1):
        log.write(access(f"e-{days}", DAY - dt.timedelta(days=days)))
    log.close()
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 0, out
    assert (
        "warning: 3 day files (audit-20261202.jsonl to audit-20261204.jsonl, 3 records) have none of their records "
        "in the mirror" in out
    )


def test_a_tcp_collector_in_the_traditional_format(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    collector = Collector(tmp_path / "collector.log", traditional=True)
    received: list[bytes] = []
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(5)

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                while chunk := conn.recv(65536):
                    received.append(chunk)

        reader = threading.Thread(target=accept)
        reader.start()
        log = AuditLog(tmp_path / "audit", application="medgate-test", syslog=f"tcp://{server.getsockname()[0]}:"
                       f"{server.getsockname()[1]}", host="h")  # fmt: skip
        for i in range(4):
            log.write(access(f"t-{i}"))
        log.close()
        reader.join(5)
    stream = b"".join(received)
    while stream:  # RFC 6587 octet counting
        length, _, rest = stream.partition(b" ")
        collector.store(rest[: int(length)], "127.0.0.1")
        stream = rest[int(length) :]
    with collector.path.open("ab") as shared:  # other senders share the collector's file
        shared.write(b"Dec  5 09:00:01 gw-1 sshd[77]: Accepted publickey for ops from 10.0.0.9\n")
    path = tmp_path / "audit" / NAME
    rewrite(path, lines_of(path)[:3])
    code, out, _ = verify(capsys, str(tmp_path / "audit"), "--mirror", str(collector.path))
    assert code == 1 and f"TAMPERED: {NAME}: after line 3, its last: 1 mirrored record(s) (seq 4," in out


def test_the_parser_is_strict_about_the_record(
    trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    kept = lines_of(collector.path)
    forged = kept[5].replace(b'"request_id":"r-05-5"', b'"request_id":"r-05-8"')  # spoofed: its own hash is wrong
    at = kept[4].index(b"\xef\xbb\xbf{") + 3
    other_host = kept[4][:at] + reseal(kept[4][at:].replace(b'"AuditSourceID":"h"', b'"AuditSourceID":"rv-2"'))
    collector.write(
        [
            *kept[:5],
            kept[5][:-40] + b"\n",  # cut short by the collector
            forged,
            other_host,  # another host's trail on the same collector
            b"2026-12-05T09:00:00Z 10.0.0.3 <13>1 2026-12-05T09:00:00Z x y 1 MEDGATE-AUDIT - not json\n",
            b"2026-12-05T09:00:00Z 10.0.0.3 <13>1 2026-12-05T09:00:00Z x cron 1 - - (root) CMD (run-parts)\n",
        ]
    )
    code, out, _ = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 0, out  # nothing here shows the local file changed
    assert "warning: mirror: 2 not a whole chained record (line 6, 9): set aside" in out
    assert "warning: mirror: 1 not matching their own hash (line 7): forged or damaged in transit" in out
    assert "note: 1 mirrored record(s) of other audit sources (rv-2) not compared" in out
    assert f"warning: {NAME}: line(s) 6 not in the mirror" in out


def test_a_mirror_without_audit_records_is_a_usage_error(
    trail: tuple[Path, Collector], capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    collector.write([b"Dec  5 09:00:01 gw-1 sshd[77]: session opened\n"])
    code, _, err = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 2 and "no usable MEDGATE-AUDIT record" in err
    code, _, err = verify(capsys, str(directory), "--mirror", str(collector.path.with_name("absent.log")))
    assert code == 2 and "cannot be read" in err


RECORD = b'{"EventIdentification":{"EventDateTime":"2026-12-05T09:00:00.000Z"},"chain":{}}'


@pytest.mark.parametrize(
    "line",
    [
        b"<85>1 2026-12-05T09:00:00.000Z gw-1 medgate-gateway 812 MEDGATE-AUDIT - \xef\xbb\xbf" + RECORD,  # as sent
        b"2026-12-05T09:00:00.123+00:00 10.0.0.5 <85>1 2026-12-05T09:00:00.000Z gw-1 medgate-gateway 812 "
        b"MEDGATE-AUDIT - \xef\xbb\xbf" + RECORD,  # receive time and sender first
        b"2026-12-05T09:00:00+00:00 gw-1 medgate-gateway[812]: MEDGATE-AUDIT - " + RECORD,  # RSYSLOG_FileFormat, no BOM
        b'<85>1 2026-12-05T09:00:00Z gw-1 app 1 MEDGATE-AUDIT [origin ip="10.0.0.5"][x@1 a="\\]\\""] ' + RECORD,
        b"Dec  5 09:00:00 gw-1 medgate-gateway[812]: \xef\xbb\xbf" + RECORD,  # traditional, BOM kept
        b"Dec  5 09:00:00 gw-1 medgate-gateway[812]: " + RECORD,  # traditional, BOM dropped
    ],
)
def test_the_record_is_found_behind_the_usual_collector_prefixes(line: bytes) -> None:
    assert payload(line) == RECORD


def test_other_messages_are_not_records() -> None:
    assert payload(b"Dec  5 09:00:00 gw-1 sshd[77]: Accepted publickey for ops") is None
    assert payload(b"<13>1 2026-12-05T09:00:00Z x cron 1 - - (root) CMD (run-parts)") is None


# verify records itself.


def today(directory: Path) -> list[dict[str, Any]]:
    return records(directory / f"audit-{dt.datetime.now(dt.UTC):%Y%m%d}.jsonl")


def test_verify_is_itself_audited(
    trail: tuple[Path, Collector], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    own = directory.parent / "own-audit"
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(own))
    assert verify(capsys, str(directory), "--mirror", str(collector.path))[0] == 0
    path = directory / NAME
    rewrite(path, lines_of(path)[:5])
    assert verify(capsys, str(directory), "--mirror", str(collector.path))[0] == 1
    assert verify(capsys, str(directory / "absent"))[0] == 2
    key = key_file(directory.parent, content=b"k" * 40)
    keyed_writes(directory.parent / "keyed", b"k" * 40, 1, "k")
    assert verify(capsys, str(directory.parent / "keyed"))[0] == 2  # keyed, no key given
    intact, cut, nothing, unkeyable = today(own)
    assert unkeyable["EventIdentification"]["EventOutcomeDescription"] == "FAILED_PRECONDITION"
    (file,) = unkeyable["ParticipantObjectIdentification"]
    assert file["ParticipantObjectDescription"] == {"Result": "not-verified", "Records": 0, "Mirror": False}
    assert verify(capsys, str(directory.parent / "keyed"), "--key-file", str(key))[0] == 0
    for event in (intact, cut, nothing):
        identification = event["EventIdentification"]
        assert identification["EventID"]["csd-code"] == "110101"  # Audit Log Used
        assert identification["EventActionCode"] == "R"
        assert event["ActiveParticipant"][1]["UserID"] == "medgate-cli"
    assert intact["EventIdentification"]["EventOutcomeDescription"] == "OK"
    assert cut["EventIdentification"]["EventOutcomeDescription"] == "DATA_LOSS"
    assert cut["EventIdentification"]["EventOutcomeIndicator"] == 12
    assert nothing["EventIdentification"]["EventOutcomeDescription"] == "FAILED_PRECONDITION"
    (file,) = cut["ParticipantObjectIdentification"]
    assert file["ParticipantObjectID"] == NAME
    assert file["ParticipantObjectDescription"] == {"Result": "broken", "Records": 5, "Mirror": True}
    assert "dr-lee" not in (own / f"audit-{dt.datetime.now(dt.UTC):%Y%m%d}.jsonl").read_text()
    assert verify(capsys, str(own))[0] == 0  # the verifier's own trail verifies


def test_verify_still_runs_where_its_event_cannot_be_written(
    trail: tuple[Path, Collector], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    directory, collector = trail
    blocked = directory.parent / "a-file"
    blocked.write_text("")
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(blocked / "audit"))
    code, out, err = verify(capsys, str(directory), "--mirror", str(collector.path))
    assert code == 0 and "OK: 6 records" in out
    assert "note: this check is not in the audit trail" in err


def test_a_removed_day_file_is_named_in_the_event(
    tmp_path: Path, udp: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    collector = Collector(tmp_path / "collector.log")
    mirrored_log(tmp_path / "audit", *udp, collector, 2)
    mirrored_log(tmp_path / "audit", *udp, collector, 1, when=DAY + dt.timedelta(days=1))
    (tmp_path / "audit" / NAME).unlink()
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(tmp_path / "own"))
    assert verify(capsys, str(tmp_path / "audit"), "--mirror", str(collector.path))[0] == 1
    (event,) = today(tmp_path / "own")
    files = {
        o["ParticipantObjectID"]: o["ParticipantObjectDescription"] for o in event["ParticipantObjectIdentification"]
    }
    assert files == {
        NAME: {"Result": "missing", "Records": 0, "Mirror": True},
        NEXT_DAY: {"Result": "intact", "Records": 1, "Mirror": True},
    }


# Key rotation.


def keyed_writes(directory: Path, key: bytes, count: int, tag: str) -> None:
    log = AuditLog(directory, application="medgate-test", host="h", key=key)
    for i in range(count):
        log.write(access(f"{tag}-{i}", dt.datetime.now(dt.UTC)))
    log.close()


@pytest.fixture
def rotated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """A trail keyed with A, rotated to B by `medgate audit rotate-key`, then written with B."""
    old, new = key_file(tmp_path, "a.key", b"a" * 40), key_file(tmp_path, "b.key", b"b" * 40)
    directory = tmp_path / "audit"
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(directory))
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_HMAC_KEY_FILE", str(old))
    keyed_writes(directory, old.read_bytes(), 2, "a")
    assert cli.main(["audit", "rotate-key", str(new)]) == 0
    out = capsys.readouterr().out
    keyed_writes(directory, old.read_bytes(), 1, "late")  # a server not yet restarted
    keyed_writes(directory, new.read_bytes(), 2, "b")
    path = directory / f"audit-{dt.datetime.now(dt.UTC):%Y%m%d}.jsonl"
    return {"old": old, "new": new, "directory": directory, "path": path, "out": out}


def test_a_rotation_announces_the_new_key_id_under_the_old_key(
    rotated: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = Digest(b"a" * 40).kid, Digest(b"b" * 40).kid
    assert f"key {a} hands over to key {b}" in rotated["out"]
    written = records(rotated["path"])
    announcement = written[2]
    assert announcement["EventIdentification"]["EventID"]["csd-code"] == "110113"
    assert announcement["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110129"  # Security Configuration
    assert [o["ParticipantObjectID"] for o in announcement["ParticipantObjectIdentification"]] == [a, b]
    assert announcement["chain"]["kid"] == a
    assert [r["chain"]["kid"] for r in written] == [a, a, a, a, b, b]
    text = rotated["path"].read_bytes()
    assert b"a" * 40 not in text and b"b" * 40 not in text  # ids, never keys
    code, out, _ = verify(capsys, str(rotated["directory"]), "--key-file", str(rotated["old"]), "--key-file",
                          str(rotated["new"]))  # fmt: skip
    assert code == 0, out
    assert f"key {a} hands over to key {b} at line 5" in out
    assert "1 records under the outgoing key after its successor was announced" in out
    code, _, err = verify(capsys, str(rotated["directory"]), "--key-file", str(rotated["new"]))
    assert code == 2 and "was keyed with key id" in err  # the old key's records need the old key
    code, _, err = verify(capsys, str(rotated["directory"]), "--key-file", str(rotated["old"]))
    assert code == 2 and f"announced as the successor of key {a}: give its key file too" in err


def test_the_old_key_after_the_new_one_is_a_break(rotated: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    keyed_writes(rotated["directory"], rotated["old"].read_bytes(), 1, "stale")
    code, out, _ = verify(capsys, str(rotated["directory"]), "--key-file", str(rotated["old"]), "--key-file",
                          str(rotated["new"]))  # fmt: skip
    assert code == 1 and "line 7: a record under key" in out and "after its successor took over" in out


def test_a_key_switched_without_an_announcement_is_a_break(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old, new = key_file(tmp_path, "a.key", b"a" * 40), key_file(tmp_path, "b.key", b"b" * 40)
    keyed_writes(tmp_path / "audit", old.read_bytes(), 2, "a")
    keyed_writes(tmp_path / "audit", new.read_bytes(), 1, "b")
    code, out, _ = verify(capsys, str(tmp_path / "audit"), "--key-file", str(old), "--key-file", str(new))
    assert code == 1 and "line 3: key" in out and "without an announcement" in out


def test_rotate_key_refuses_what_it_cannot_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(tmp_path / "audit"))
    new = key_file(tmp_path, "b.key", b"b" * 40)
    assert cli.main(["audit", "rotate-key", str(new)]) == 2
    assert "no key in force" in capsys.readouterr().err
    assert cli.main(["audit", "rotate-key", str(new), "--key-file", str(new)]) == 2
    assert "holds the key in force" in capsys.readouterr().err
    loose = key_file(tmp_path, "c.key", b"c" * 40)
    os.chmod(loose, 0o644)
    assert cli.main(["audit", "rotate-key", str(loose), "--key-file", str(new)]) == 2
    assert "readable by others" in capsys.readouterr().err
    assert not (tmp_path / "audit").exists()


@pytest.mark.parametrize(
    "make",
    [
        lambda: AuditFile("Doe^Jane-audit.jsonl", "intact"),
        lambda: AuditFile("audit-20261205.jsonl", "the study of Doe^Jane"),
        lambda: AuditKey("k" * 40, "successor"),
        lambda: AuditKey("0123456789abcdef", "leaked"),
    ],
)
def test_the_new_objects_refuse_anything_but_their_identifiers(make: Any) -> None:
    with pytest.raises(ValueError, match="does not match its grammar"):
        make()

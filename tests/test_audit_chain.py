"""The audit trail's hash chain on real files: what `medgate audit verify` says about a clean, an edited, a cut and a
crashed log, and one chain from writers in two processes."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import re
from pathlib import Path
from typing import Any

import pytest

from clients import cli
from services.audit import Action, AuditEvent, AuditLog, AuditWriteError, EventID, Study, requestor
from services.audit import log as audit_log
from services.audit.chain import last_lines, verify_file
from services.settings import load_settings

STUDY = "1.2.826.0.1.3680043.8.498.1"
DAY = dt.datetime(2026, 12, 5, 9, 0, tzinfo=dt.UTC)
NAME = "audit-20261205.jsonl"


def access(request_id: str, when: dt.datetime = DAY) -> AuditEvent:
    return AuditEvent(
        event_id=EventID.INSTANCES_ACCESSED,
        action=Action.READ,
        status="OK",
        participants=(requestor(user_id="dr-lee", issuer="https://idp.example/realms/h", roles=("reviewer",)),),
        objects=(Study(STUDY),),
        rpc="/medgate.v1.Review/StreamCases",
        request_id=request_id,
        time=when,
    )


def write_log(directory: Path, count: int, *, key: bytes | None = None) -> Path:
    log = AuditLog(directory, application="medgate-test", host="h", key=key)
    for i in range(count):
        log.write(access(f"r-{i}"))
    log.close()
    return directory / NAME


def verify(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> tuple[int, str]:
    code = cli.main(["audit", "verify", str(path), *extra])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rewrite(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_a_clean_log_verifies_across_a_restart(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, 5)
    write_log(tmp_path, 3)  # a new process continues the chain from the last line on disk
    chained = [record["chain"] for record in records(path)]
    assert [c["seq"] for c in chained] == list(range(1, 9))
    assert chained[0]["start"] == "file" and all("start" not in c for c in chained[1:])
    raw = lines_of(path)
    assert all(chained[i]["prev"] == hashlib.sha256(raw[i - 1]).hexdigest() for i in range(1, 8))
    code, out = verify(capsys, tmp_path)
    assert code == 0 and f"{NAME}: 8 records verified" in out and "OK: 8 records in 1 file(s)" in out


def test_an_edited_record_is_named_by_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, 6)
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"request_id":"r-3"', b'"request_id":"r-9"')
    rewrite(path, lines)
    code, out = verify(capsys, path)
    assert code == 1 and f"{NAME}: line 4: edited" in out
    assert "r-9" not in out and "dr-lee" not in out and STUDY not in out  # the line number, never the content


def test_an_edit_whose_hash_was_recomputed_is_caught_by_the_next_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_log(tmp_path, 6)
    lines = lines_of(path)
    head = lines[2].replace(b'"request_id":"r-2"', b'"request_id":"r-7"')
    head = head[: head.index(b',"hash":"')]
    lines[2] = head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}}\n'
    rewrite(path, lines)
    assert verify_file(path).line == 3  # the forger re-hashed line 3 itself, but line 4 still names the original
    code, out = verify(capsys, path)
    assert code == 1 and "line 3: edited: line 4 no longer links to it" in out


def test_a_deleted_record_is_named_by_the_line_after_the_gap(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_log(tmp_path, 6)
    lines = lines_of(path)
    del lines[2]
    rewrite(path, lines)
    code, out = verify(capsys, path)
    assert code == 1 and "line 3: 1 record(s) deleted just before this line" in out


def test_a_deleted_first_record_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, 3)
    rewrite(path, lines_of(path)[1:])
    code, out = verify(capsys, path)
    assert code == 1 and "line 1: the file's chain does not start here" in out


def test_swapped_records_are_out_of_order(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, 6)
    lines = lines_of(path)
    lines[3], lines[4] = lines[4], lines[3]
    rewrite(path, lines)
    code, out = verify(capsys, path)
    assert code == 1 and "line 4: out of order: the record that belongs here is at line 5" in out


def test_a_day_file_renamed_as_another_day_is_caught(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, 2)
    other = path.rename(tmp_path / "audit-20261206.jsonl")
    code, out = verify(capsys, other)
    assert code == 1 and "line 1: the chain starts for another file than audit-20261206.jsonl" in out


def test_a_torn_last_line_is_reported_then_recorded_by_the_next_write(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_log(tmp_path, 4)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 40])  # a crash mid-write: the last record lost its end and newline
    code, out = verify(capsys, path)
    assert code == 1 and "line 4: torn" in out
    write_log(tmp_path, 2)  # the next process starts the chain again after the torn bytes, and says so
    lines = lines_of(path)
    assert len(lines) == 7 and lines[3].endswith(b"\n")  # the torn record keeps its own line
    restart = json.loads(lines[4])
    assert restart["chain"]["start"] == "torn" and restart["chain"]["seq"] == 1
    assert restart["chain"]["prev"] == hashlib.sha256(lines[2] + lines[3]).hexdigest()  # the torn line, and before
    assert restart["EventIdentification"]["EventID"]["csd-code"] == "110113"  # Security Alert
    assert restart["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110134"  # Audit Recording Started
    assert restart["EventIdentification"]["EventOutcomeDescription"] == "DATA_LOSS"
    code, out = verify(capsys, path)
    assert code == 0 and "6 records verified; torn record at line 4 (a write cut short), recorded by line 5" in out
    rewrite(path, [*lines[:3], *lines[4:]])  # the torn line removed afterwards: the restart no longer links
    code, out = verify(capsys, path)
    assert code == 1 and "line 4:" in out


def test_records_before_a_torn_one_cannot_be_cut_away(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_log(tmp_path, 4)
    path.write_bytes(path.read_bytes()[:-40])
    write_log(tmp_path, 1)
    rewrite(path, lines_of(path)[3:])  # the torn line made to look like the file's first
    code, out = verify(capsys, path)
    assert code == 1 and "line 2: records were deleted or moved around the torn line" in out


def test_a_short_write_is_a_torn_line_the_next_write_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = AuditLog(tmp_path, application="medgate-test", host="h")
    log.write(access("r-0"))
    real_write = os.write
    monkeypatch.setattr(audit_log.os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))  # disk full
    with pytest.raises(AuditWriteError, match="short write"):
        log.write(access("r-1"))
    monkeypatch.setattr(audit_log.os, "write", real_write)
    log.write(access("r-2"))
    log.close()
    restart, last = (json.loads(line) for line in lines_of(tmp_path / NAME)[2:])  # line 2 is the torn half
    assert restart["chain"]["start"] == "torn" and last["medgate"]["request_id"] == "r-2"
    code, out = verify(capsys, tmp_path)
    assert code == 0 and "3 records verified; torn record at line 2" in out


def test_lines_written_before_chaining_are_not_vouched_for(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / NAME).write_text('{"earlier": true}\n')
    write_log(tmp_path, 2)
    assert [r["chain"].get("start") for r in records(tmp_path / NAME)[1:]] == ["unchained", None]
    code, out = verify(capsys, tmp_path)
    assert code == 1 and "line 1: not a chained record" in out


def test_an_edit_of_a_record_before_a_torn_one_is_still_caught(tmp_path: Path) -> None:
    path = write_log(tmp_path, 4)
    data = path.read_bytes()
    path.write_bytes(data[:-40])
    write_log(tmp_path, 1)
    lines = lines_of(path)
    lines[2] = lines[2].replace(b'"request_id":"r-2"', b'"request_id":"r-8"')
    rewrite(path, lines)
    assert (verify_file(path).line, verify_file(path).problem.split(":")[0]) == (3, "edited")


def _writer(directory: str, tag: str, count: int, start: Any) -> None:
    log = AuditLog(Path(directory), application=f"medgate-{tag}", host=tag)
    start.wait(30)  # both imported and ready: they write at the same time
    try:
        for i in range(count):
            future = log.submit(access(f"{tag}-{i}"))  # a few in flight: group commits as the servers do
            if i % 4 == 3:
                future.result()
        log.write(access(f"{tag}-last"))
    finally:
        log.close()


def test_writers_in_two_processes_keep_one_chain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(2)
    count = 300
    workers = [context.Process(target=_writer, args=(str(tmp_path), tag, count, start)) for tag in ("gw", "rv")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
        assert worker.exitcode == 0
    written = records(tmp_path / NAME)
    ids = [record["medgate"]["request_id"] for record in written]
    assert len(ids) == 2 * (count + 1) and len(set(ids)) == len(ids)
    first_rv = next(i for i, rid in enumerate(ids) if rid.startswith("rv"))
    assert any(rid.startswith("gw") for rid in ids[first_rv:])  # they really did interleave
    assert [record["chain"]["seq"] for record in written] == list(range(1, len(ids) + 1))
    code, out = verify(capsys, tmp_path)
    assert code == 0 and f"{len(ids)} records verified" in out


def test_two_logs_in_one_process_alternate_on_one_chain(tmp_path: Path) -> None:
    first = AuditLog(tmp_path, application="medgate-gateway", host="h")
    second = AuditLog(tmp_path, application="medgate-review", host="h")
    for i in range(4):
        first.write(access(f"g-{i}"))
        second.write(access(f"r-{i}"))
    first.close()
    second.close()
    report = verify_file(tmp_path / NAME)
    assert report.ok and report.records == 8


# The HMAC key.


def key_file(tmp_path: Path, name: str = "audit.key", content: bytes = os.urandom(32).hex().encode()) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def test_a_keyed_chain_needs_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = key_file(tmp_path, content=b"k" * 40)
    path = write_log(tmp_path / "audit", 4, key=key.read_bytes())
    assert records(path)[0]["chain"]["alg"] == "hmac-sha256"
    code, out = verify(capsys, path, "--key-file", str(key))
    assert code == 0 and "4 records verified" in out
    code, out = verify(capsys, path)
    assert code == 2 and "keyed (hmac-sha256): give the key file" in out
    other = key_file(tmp_path, "other.key", b"o" * 40)
    code, out = verify(capsys, path, "--key-file", str(other))
    assert code == 2 and "was keyed with key id" in out  # another key is not mistaken for tampering


def test_without_the_key_a_rewritten_chain_does_not_pass(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = key_file(tmp_path, content=b"k" * 40)
    path = write_log(tmp_path / "audit", 3, key=key.read_bytes())
    edited = path.read_bytes().replace(b'"request_id":"r-1"', b'"request_id":"r-5"')
    path.write_bytes(edited)
    # The forger recomputes every link with SHA-256 (the key is what they lack), keeping the keyed markers...
    forged, link = [], hashlib.sha256(b"medgate-audit-chain/1 genesis " + NAME.encode()).hexdigest()
    for line in lines_of(path):
        head = re.sub(rb',"prev":"[0-9a-f]{64}","hash":"[0-9a-f]{64}"\}\}\n$', b"", line)
        head += b',"prev":"' + link.encode() + b'"'
        line = head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}}\n'
        forged.append(line)
        link = hashlib.sha256(line).hexdigest()
    rewrite(path, forged)
    code, out = verify(capsys, path, "--key-file", str(key))
    assert code == 1 and "line 1: edited" in out
    # ... or downgrades to bare SHA-256 records.
    rewrite(path, [re.sub(rb'"alg":"hmac-sha256","kid":"[0-9a-f]{16}"', b'"alg":"sha256"', x) for x in forged])
    code, out = verify(capsys, path, "--key-file", str(key))
    assert code == 1


def test_a_key_set_during_the_day_anchors_the_unkeyed_records_before_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = key_file(tmp_path, content=b"k" * 40)
    write_log(tmp_path / "audit", 2)
    path = write_log(tmp_path / "audit", 2, key=key.read_bytes())
    code, out = verify(capsys, path, "--key-file", str(key))
    assert code == 0 and "4 records verified; the first 2 records are unkeyed" in out
    lines = lines_of(path)
    lines[0] = lines[0].replace(b'"request_id":"r-0"', b'"request_id":"r-6"')
    head = lines[0][: lines[0].index(b',"hash":"')]
    lines[0] = head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}}\n'
    link = hashlib.sha256(lines[0]).hexdigest().encode()
    head = re.sub(rb'"prev":"[0-9a-f]{64}"', b'"prev":"' + link + b'"', lines[1][: lines[1].index(b',"hash":"')])
    lines[1] = head + b',"hash":"' + hashlib.sha256(head).hexdigest().encode() + b'"}}\n'
    rewrite(path, lines)  # the unkeyed part re-chained by a forger: the first keyed record still names the original
    code, out = verify(capsys, path, "--key-file", str(key))
    assert code == 1 and "line 2: edited: line 3 no longer links to it" in out


def test_the_key_file_setting_keys_the_servers_log_and_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key = key_file(tmp_path)
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(tmp_path / "audit"))
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_HMAC_KEY_FILE", str(key))
    log = AuditLog.from_settings(load_settings().security, application="medgate-test")
    log.write(access("k-1"))
    log.close()
    assert records(tmp_path / "audit" / NAME)[0]["chain"]["alg"] == "hmac-sha256"
    code, out = verify(capsys, tmp_path / "audit")  # the settings' key, no flag
    assert code == 0 and "1 records verified" in out
    key.chmod(0o644)
    with pytest.raises(AuditWriteError, match="readable by others"):
        AuditLog.from_settings(load_settings().security, application="medgate-test")  # fail closed: no start
    key.chmod(0o600)
    key.write_bytes(b"short")
    with pytest.raises(AuditWriteError, match="at least 32"):
        AuditLog.from_settings(load_settings().security, application="medgate-test")


def test_nothing_to_verify_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = verify(capsys, tmp_path / "missing")
    assert code == 2 and "no audit files" in out


def test_days_are_separate_chains(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = AuditLog(tmp_path, application="t", host="h")
    log.write(access("a", DAY))
    log.write(access("b", DAY + dt.timedelta(days=1)))
    log.write(access("c", DAY))
    log.close()
    assert [r["chain"]["seq"] for r in records(tmp_path / NAME)] == [1, 2]
    code, out = verify(capsys, tmp_path)
    assert code == 0 and "OK: 3 records in 2 file(s)" in out


def test_records_keep_their_ps315_shape_with_the_chain_last(tmp_path: Path) -> None:
    path = write_log(tmp_path, 1)
    record = records(path)[0]
    assert list(record)[-1] == "chain" and set(record["chain"]) == {"seq", "alg", "start", "prev", "hash"}
    plain = AuditLog(tmp_path / "x", application="medgate-test", host="h")
    assert {k: v for k, v in record.items() if k != "chain"} == json.loads(plain.body(access("r-0")))
    plain.close()


@pytest.mark.parametrize("sizes", [[5], [30000], [10, 20000], [9000, 9000, 3], [100, 8191, 8192, 8193]])
@pytest.mark.parametrize("torn", [False, True])
def test_the_last_two_lines_are_read_back_exactly(tmp_path: Path, sizes: list[int], torn: bool) -> None:
    lines = [b"x" * (size - 1) + b"\n" for size in sizes]
    if torn:
        lines.append(b"y" * 12000)
    path = tmp_path / "f"
    path.write_bytes(b"".join(lines))
    fd = os.open(path, os.O_RDONLY)
    try:
        got = last_lines(fd, path.stat().st_size)
    finally:
        os.close(fd)
    assert got == ((lines[-2] if len(lines) > 1 else b""), lines[-1])

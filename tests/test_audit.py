"""The audit trail's pure parts: PS3.15-shaped events that cannot hold patient data; the fsynced append-only writer."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import fcntl
import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from clients import cli
from services.audit import (
    Action,
    Application,
    AuditEvent,
    AuditLog,
    AuditWriteError,
    EventID,
    Flow,
    HumanLoop,
    Outcome,
    Query,
    SecurityResource,
    Study,
    application_activity,
    export_event,
    requestor,
)
from services.audit import log as audit_log
from services.audit.events import STATUS_NAMES, iso_ms, outcome_for, peer_address
from services.audit.export import os_user
from services.audit.syslog import parse_target
from services.review.flows import load_flows
from services.review.store import ReviewStore
from tests.fixtures import PATIENT_BIRTH_DATE, PATIENT_ID, PATIENT_NAME
from tests.test_review_service import write_flows

STUDY = "1.2.826.0.1.3680043.8.498.1"
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.7"
SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.2"


def access(when: dt.datetime | None = None, *, status: str = "OK", request_id: str = "r-1") -> AuditEvent:
    event = AuditEvent(
        event_id=EventID.INSTANCES_ACCESSED,
        action=Action.READ,
        status=status,
        participants=(
            requestor(user_id="dr-lee", issuer="https://idp.example/realms/h", name="Dr Lee", roles=("reviewer",)),
        ),
        objects=(Study(STUDY, instances=((SOP_CLASS, SOP_INSTANCE),)), HumanLoop("case-1"), Flow("lesion-detection")),
        rpc="/medgate.v1.Review/StreamCases",
        request_id=request_id,
    )
    return event if when is None else dataclasses.replace(event, time=when)


@pytest.fixture
def audit(tmp_path: Path) -> Iterator[AuditLog]:
    log = AuditLog(tmp_path / "audit", application="medgate-test", host="test-host")
    yield log
    log.close()


def lines(directory: Path) -> list[dict[str, Any]]:
    return [
        json.loads(line) for path in sorted(directory.glob("audit-*.jsonl")) for line in path.read_text().splitlines()
    ]


def test_an_event_reads_as_a_ps315_audit_message(audit: AuditLog) -> None:
    when = dt.datetime(2026, 11, 30, 8, 15, 2, 123456, tzinfo=dt.UTC)
    audit.write(access(when))
    (message,) = lines(audit.directory)
    identification = message["EventIdentification"]
    assert identification["EventID"] == {
        "csd-code": "110103",
        "codeSystemName": "DCM",
        "originalText": "DICOM Instances Accessed",
    }
    assert identification["EventActionCode"] == "R" and identification["EventDateTime"] == "2026-11-30T08:15:02.123Z"
    assert identification["EventOutcomeIndicator"] == 0 and identification["EventOutcomeDescription"] == "OK"
    (who,) = message["ActiveParticipant"]
    assert who["UserID"] == "dr-lee" and who["AlternativeUserID"] == "https://idp.example/realms/h"
    assert who["UserName"] == "Dr Lee" and who["UserIsRequestor"] is True
    assert who["RoleIDCode"] == [{"csd-code": "reviewer", "codeSystemName": "medgate-role", "originalText": "reviewer"}]
    assert message["AuditSourceIdentification"]["AuditSourceID"] == "test-host"
    study, loop, flow = message["ParticipantObjectIdentification"]
    assert study["ParticipantObjectID"] == STUDY and study["ParticipantObjectIDTypeCode"]["csd-code"] == "110180"
    assert (study["ParticipantObjectTypeCode"], study["ParticipantObjectTypeCodeRole"]) == (2, 3)
    assert study["ParticipantObjectDescription"] == {
        "SOPClass": [{"UID": SOP_CLASS, "NumberOfInstances": 1, "Instance": [{"UID": SOP_INSTANCE}]}]
    }
    assert loop["ParticipantObjectID"] == "case-1" and loop["ParticipantObjectTypeCodeRole"] == 20
    assert flow["ParticipantObjectID"] == "lesion-detection" and flow["ParticipantObjectTypeCodeRole"] == 21
    assert message["medgate"] == {"rpc": "/medgate.v1.Review/StreamCases", "request_id": "r-1"}


def test_outcome_indicator_follows_the_grpc_code() -> None:
    assert outcome_for("OK") is Outcome.SUCCESS
    assert outcome_for("INVALID_ARGUMENT") is outcome_for("NOT_FOUND") is Outcome.MINOR_FAILURE
    assert outcome_for("UNAUTHENTICATED") is outcome_for("PERMISSION_DENIED") is Outcome.SERIOUS_FAILURE
    assert outcome_for("UNAVAILABLE") is Outcome.SERIOUS_FAILURE
    assert outcome_for("INTERNAL") is Outcome.MAJOR_FAILURE
    assert {outcome_for(name) for name in STATUS_NAMES} == set(Outcome)
    with pytest.raises(ValueError):
        outcome_for("the image of Doe^Jane could not be decoded")


def test_times_are_utc_to_the_millisecond() -> None:
    paris = dt.timezone(dt.timedelta(hours=1))
    assert iso_ms(dt.datetime(2026, 1, 1, 0, 30, 0, 999999, tzinfo=paris)) == "2025-12-31T23:30:00.999Z"
    with pytest.raises(ValueError):
        dataclasses.replace(access(), time=dt.datetime(2026, 1, 1))  # naive: which zone?


def test_peer_addresses_lose_their_port() -> None:
    assert peer_address("ipv4:10.0.0.7:51234") == "10.0.0.7"
    assert peer_address("ipv6:[::1]:5000") == "::1"
    assert peer_address("unix:/run/medgate.sock") == "unix"


# Patient data by construction: objects take identifiers with a grammar, and nothing else.

CANARIES = [PATIENT_NAME, PATIENT_ID, "Jane Doe", "doe^jane"]


@pytest.mark.parametrize("value", CANARIES)
def test_objects_refuse_anything_but_their_identifiers(value: str) -> None:
    for make in (
        lambda: Study(value),
        lambda: Study(STUDY, instances=((SOP_CLASS, value),)),
        lambda: HumanLoop(value),
        lambda: Flow(value),
        lambda: Query(value),
        lambda: SecurityResource(value),
    ):
        with pytest.raises(ValueError) as refused:
            make()
        assert value not in str(refused.value)  # the refusal does not quote it either


def test_a_date_is_no_uid() -> None:
    with pytest.raises(ValueError):
        Study(PATIENT_BIRTH_DATE)
    with pytest.raises(ValueError):
        Study(STUDY, instances=((SOP_CLASS, PATIENT_BIRTH_DATE),))


def test_objects_have_no_free_text_field() -> None:
    fields = {
        obj: {f.name for f in dataclasses.fields(obj)} for obj in (Study, HumanLoop, Flow, Query, SecurityResource)
    }
    assert fields == {
        Study: {"study_uid", "instances"},
        HumanLoop: {"name"},
        Flow: {"name"},
        Query: {"rpc"},
        SecurityResource: {"rpc"},
    }
    assert {f.name for f in dataclasses.fields(AuditEvent)} == {
        "event_id", "action", "status", "participants", "objects", "event_types", "time", "rpc", "request_id",
    }  # fmt: skip


def test_an_event_refuses_messages_as_outcomes_and_foreign_objects() -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(access(), status=f"INVALID_ARGUMENT: {PATIENT_NAME}")
    with pytest.raises(ValueError):
        dataclasses.replace(access(), request_id=PATIENT_NAME)
    with pytest.raises(ValueError):
        dataclasses.replace(access(), objects=(PATIENT_NAME,))  # type: ignore[arg-type]


def test_no_participant_object_is_a_person() -> None:
    message = access().as_json(audit_log.AuditSource(site="s", host="h"))
    assert all(obj["ParticipantObjectTypeCode"] == 2 for obj in message["ParticipantObjectIdentification"])
    allowed = {
        "EventIdentification", "ActiveParticipant", "AuditSourceIdentification", "ParticipantObjectIdentification",
        "medgate",
    }  # fmt: skip
    assert set(message) <= allowed


# The writer.


def test_each_event_is_one_write_then_fsync_on_an_append_only_descriptor(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, int, bytes]] = []
    real_write, real_fsync = os.write, os.fsync

    def write(fd: int, data: bytes) -> int:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
        calls.append(("write", fd, bytes(data)))
        return real_write(fd, data)

    def fsync(fd: int) -> None:
        calls.append(("fsync", fd, b""))
        real_fsync(fd)

    monkeypatch.setattr(audit_log.os, "write", write)
    monkeypatch.setattr(audit_log.os, "fsync", fsync)
    for i in range(3):
        audit.write(access(request_id=f"r-{i}"))
        assert calls[-1][0] == "fsync"  # on disk before write() returned
    writes = [c for c in calls if c[0] == "write"]
    assert len(writes) == 3 and all(data.endswith(b"\n") and data.count(b"\n") == 1 for _, _, data in writes)
    fd = writes[0][1]
    assert [c[0] for c in calls if c[1] == fd] == ["write", "fsync"] * 3
    assert [m["medgate"]["request_id"] for m in lines(audit.directory)] == ["r-0", "r-1", "r-2"]


async def test_concurrent_events_are_group_committed_whole_lines(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    real_write = os.write

    def write(fd: int, data: bytes) -> int:
        writes.append(bytes(data))
        return real_write(fd, data)

    monkeypatch.setattr(audit_log.os, "write", write)
    await asyncio.gather(*(audit.record(access(request_id=f"c-{i}")) for i in range(50)))
    assert sorted(m["medgate"]["request_id"] for m in lines(audit.directory)) == sorted(f"c-{i}" for i in range(50))
    assert len(writes) <= 50 and all(data.endswith(b"\n") for data in writes)


def test_files_are_0600_in_a_0700_directory_whatever_the_umask(tmp_path: Path) -> None:
    directory = tmp_path / "deep" / "audit"
    old = os.umask(0)
    try:
        log = AuditLog(directory, application="t")
        log.write(access())
        log.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    (path,) = directory.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_loose_modes_left_by_someone_else_are_tightened(tmp_path: Path) -> None:
    directory = tmp_path / "audit"
    directory.mkdir(mode=0o755)
    os.chmod(directory, 0o755)
    when = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)
    existing = directory / "audit-20260301.jsonl"
    existing.write_text('{"earlier": true}\n')
    os.chmod(existing, 0o644)
    log = AuditLog(directory, application="t")
    log.write(access(when))
    log.close()
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700 and stat.S_IMODE(existing.stat().st_mode) == 0o600
    first, second = existing.read_text().splitlines()
    assert json.loads(first) == {"earlier": True} and json.loads(second)["EventIdentification"]  # appended, kept


def test_one_file_per_utc_day(audit: AuditLog) -> None:
    before = dt.datetime(2026, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC)
    after = dt.datetime(2027, 1, 1, 0, 0, 0, tzinfo=dt.UTC)
    new_york = dt.timezone(dt.timedelta(hours=-5))
    audit.write(access(before, request_id="a"))
    audit.write(access(after, request_id="b"))
    audit.write(access(dt.datetime(2026, 12, 31, 20, 0, tzinfo=new_york), request_id="c"))  # 01:00 UTC on Jan 1
    assert sorted(p.name for p in audit.directory.iterdir()) == ["audit-20261231.jsonl", "audit-20270101.jsonl"]
    day1 = [json.loads(x)["medgate"]["request_id"] for x in (audit.directory / "audit-20261231.jsonl").open()]
    day2 = [json.loads(x)["medgate"]["request_id"] for x in (audit.directory / "audit-20270101.jsonl").open()]
    assert (day1, day2) == (["a"], ["b", "c"])


def test_two_writers_append_to_the_same_day(tmp_path: Path) -> None:
    first = AuditLog(tmp_path, application="medgate-gateway")
    second = AuditLog(tmp_path, application="medgate-review")
    for i in range(5):
        first.write(access(request_id=f"g-{i}"))
        second.write(access(request_id=f"r-{i}"))
    first.close()
    second.close()
    assert len(lines(tmp_path)) == 10


async def test_a_write_that_fails_raises_and_is_logged_loudly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    log = AuditLog(blocked / "audit", application="t")
    with caplog.at_level(logging.CRITICAL, logger="medgate.audit"), pytest.raises(AuditWriteError):
        await log.record(access())
    assert "AUDIT WRITE FAILED" in caplog.text
    log.close()
    with pytest.raises(AuditWriteError):
        log.write(access())  # closed: refused, never silently dropped


def test_application_start_stop_and_export_events(audit: AuditLog) -> None:
    app = Application(name="medgate-cli", host="h", pid=42)
    audit.write(application_activity(app, start=True))
    audit.write(export_event(app, os_user="alice", flow="lesion-detection", loops=("case-1", PATIENT_NAME)))
    audit.write(application_activity(app, start=False))
    start, export, stop = lines(audit.directory)
    assert start["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110120"
    assert stop["EventIdentification"]["EventTypeCode"][0]["csd-code"] == "110121"
    assert export["EventIdentification"]["EventID"]["csd-code"] == "110106"
    assert export["ActiveParticipant"][0]["UserID"] == "alice"
    assert [o["ParticipantObjectID"] for o in export["ParticipantObjectIdentification"]] == [
        "lesion-detection",
        "case-1",
    ]
    assert PATIENT_NAME not in (audit.directory / next(iter(os.listdir(audit.directory)))).read_text()


# The syslog mirror.


def test_targets_parse() -> None:
    assert parse_target("collector:514") == ("udp", "collector", 514)
    assert parse_target("tcp://10.0.0.2:6514") == ("tcp", "10.0.0.2", 6514)
    assert parse_target("udp://[::1]:514") == ("udp", "::1", 514)
    for bad in ("collector", "http://x:1", "x:0", "x:port"):
        with pytest.raises(ValueError):
            parse_target(bad)


def test_syslog_over_udp_mirrors_the_line_as_rfc5424(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as collector:
        collector.bind(("127.0.0.1", 0))
        collector.settimeout(5)
        port = collector.getsockname()[1]
        log = AuditLog(tmp_path, application="medgate-gateway", syslog=f"127.0.0.1:{port}", host="gw-1")
        log.write(access(dt.datetime(2026, 11, 30, 8, 0, 0, 5000, tzinfo=dt.UTC)))
        log.write(access(status="PERMISSION_DENIED"))
        ok, _ = collector.recvfrom(65535)
        failed, _ = collector.recvfrom(65535)
        log.close()
    header, _, payload = ok.partition(b"\xef\xbb\xbf")
    assert header == f"<85>1 2026-11-30T08:00:00.005Z gw-1 medgate-gateway {os.getpid()} MEDGATE-AUDIT - ".encode()
    assert json.loads(payload) == lines(tmp_path)[0]
    assert failed.startswith(b"<84>1 ")  # authpriv.warning for a failure


def test_syslog_over_tcp_uses_octet_counting(tmp_path: Path) -> None:
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
        log = AuditLog(tmp_path, application="t", syslog=f"tcp://127.0.0.1:{server.getsockname()[1]}")
        log.write(access(request_id="t-1"))
        log.write(access(request_id="t-2"))
        log.close()
        reader.join(5)
    stream = b"".join(received)
    frames = []
    while stream:
        length, _, rest = stream.partition(b" ")
        frames.append(rest[: int(length)])
        stream = rest[int(length) :]
    assert [json.loads(f.partition(b"\xef\xbb\xbf")[2])["medgate"]["request_id"] for f in frames] == ["t-1", "t-2"]


def test_a_collector_that_is_down_never_costs_an_event(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    log = AuditLog(tmp_path, application="t", syslog=f"tcp://127.0.0.1:{port}")
    with caplog.at_level(logging.ERROR, logger="medgate.audit"):
        for i in range(3):
            log.write(access(request_id=f"d-{i}"))
    log.close()
    assert len(lines(tmp_path)) == 3
    assert caplog.text.count("audit syslog mirror") == 1  # once per outage, not once per event


# The export command.


def completed_store(tmp_path: Path) -> None:
    flows = load_flows(write_flows(tmp_path))
    with ReviewStore(tmp_path / "review.sqlite3") as store:
        for name in ("case-1", "case-2"):
            store.start_loop(flows["single"], name, {"patient": PATIENT_NAME}, name, images={"image.png": tiny_png()})
            (delivery,) = store.lease("dr-lee", ["single"])
            store.submit(f"d-{name}", "dr-lee", {"label": "normal"}, delivery_id=delivery.delivery_id)


def export_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, audit_dir: Path) -> None:
    monkeypatch.setenv("MEDGATE_REVIEW_STORE_PATH", str(tmp_path / "review.sqlite3"))
    monkeypatch.setenv("MEDGATE_REVIEW_FLOWS_FILE", str(tmp_path / "flows.toml"))
    monkeypatch.setenv("MEDGATE_SECURITY_AUDIT_DIR", str(audit_dir))


def test_export_manifest_records_who_exported_which_flow_and_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    completed_store(tmp_path)
    export_settings(monkeypatch, tmp_path, tmp_path / "audit")
    assert cli.main(["review", "export-manifest", "--flow", "single", "--out", str(tmp_path / "out")]) == 0
    assert Path(capsys.readouterr().out.strip()).is_file()
    (event,) = lines(tmp_path / "audit")
    assert event["EventIdentification"]["EventID"]["csd-code"] == "110106"
    assert event["EventIdentification"]["EventActionCode"] == "R"
    assert event["EventIdentification"]["EventOutcomeDescription"] == "OK"
    assert event["ActiveParticipant"][0]["UserID"] == os_user()
    assert event["ActiveParticipant"][1]["UserID"] == "medgate-cli"
    exported = [o["ParticipantObjectID"] for o in event["ParticipantObjectIdentification"]]
    assert exported == ["single", "case-1", "case-2"]
    assert PATIENT_NAME not in (tmp_path / "audit").joinpath(os.listdir(tmp_path / "audit")[0]).read_text()


def test_an_export_that_cannot_be_audited_exports_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    completed_store(tmp_path)
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    export_settings(monkeypatch, tmp_path, blocked / "audit")
    with pytest.raises(AuditWriteError):
        cli.main(["review", "export-manifest", "--flow", "single", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def tiny_png() -> bytes:
    ok, encoded = cv2.imencode(".png", np.zeros((4, 4), np.uint8))
    assert ok
    return encoded.tobytes()


def test_a_removed_day_file_is_started_again_not_written_into_the_void(
    audit: AuditLog, caplog: pytest.LogCaptureFixture
) -> None:
    audit.write(access(request_id="before"))
    (path,) = audit.directory.iterdir()
    path.unlink()
    with caplog.at_level(logging.CRITICAL, logger="medgate.audit"):
        audit.write(access(request_id="after"))
    assert "AUDIT FILE REMOVED" in caplog.text
    assert [m["medgate"]["request_id"] for m in lines(audit.directory)] == ["after"]

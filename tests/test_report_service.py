"""medgate.v1.Report on the real gateway and Triton: unary and stream, bad input, health, reflection, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.cli import main as cli_main
from medgate.v1 import report_pb2 as pb
from medgate.v1 import report_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.security.identity import Role
from tests.conftest import Clients

NORMAL = "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear."
EFFUSION = "The heart is enlarged. There are small bilateral pleural effusions. No pneumothorax."
# A marker that must never reach a log line or an error message.
PATIENT = "Jane Roe born 1970-01-02 MRN 8811"


async def test_impression_answers_with_score_evidence_and_model(report_stub: pb_grpc.ReportStub) -> None:
    answer = await report_stub.Impression(pb.ImpressionRequest(findings=NORMAL, request_id="r1"))
    assert answer.request_id == "r1"
    assert "acute" in answer.impression.lower() and answer.score > 0.8
    assert answer.coverage == pytest.approx(1.0) and answer.top_similarity > 0.9
    assert len(answer.evidence) == 3 and all(e.report_id % 5 != 0 for e in answer.evidence)
    assert answer.evidence[0].similarity >= answer.evidence[-1].similarity and answer.evidence[0].findings
    assert (answer.model.name, answer.model.version) == ("impression", "1")
    assert answer.timings.total_ms >= answer.timings.triton_ms > 0

    sick = await report_stub.Impression(pb.ImpressionRequest(findings=EFFUSION, max_evidence=10))
    assert "effusion" in sick.impression.lower() and len(sick.evidence) == 10


@pytest.mark.parametrize(
    ("findings", "max_evidence", "code", "says"),
    [
        ("", 0, grpc.StatusCode.INVALID_ARGUMENT, "findings is empty"),
        (" \n\t ", 0, grpc.StatusCode.INVALID_ARGUMENT, "findings is empty"),
        (f"{PATIENT}. " * 400, 0, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_findings_chars (8000)"),
        (NORMAL, 11, grpc.StatusCode.RESOURCE_EXHAUSTED, "report.max_evidence (10)"),
        (NORMAL, -1, grpc.StatusCode.INVALID_ARGUMENT, "max_evidence must not be negative"),
    ],
)
async def test_bad_input_gets_the_right_code_without_the_text(
    report_stub: pb_grpc.ReportStub,
    channel: grpc.aio.Channel,
    caplog: pytest.LogCaptureFixture,
    findings: str,
    max_evidence: int,
    code: grpc.StatusCode,
    says: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await report_stub.Impression(pb.ImpressionRequest(findings=findings, max_evidence=max_evidence))
    assert refused.value.code() == code
    assert says in (refused.value.details() or "")
    assert "Jane" not in (refused.value.details() or "") and "Jane" not in caplog.text
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "medgate.v1.Report"):
        status = (await health.Check(health_pb2.HealthCheckRequest(service=service))).status
        assert status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    "findings",
    ["qzxv wplk jjjrt vbnmq", "Der Herzschatten ist normal groß, keine Infiltrate.", "💥" * 50, "12345", "."],
)
async def test_garbage_or_other_languages_get_an_answer_with_a_low_score(
    report_stub: pb_grpc.ReportStub, findings: str
) -> None:
    answer = await report_stub.Impression(pb.ImpressionRequest(findings=findings))
    assert answer.impression and answer.score < 0.1


async def test_stream_answers_every_report_and_survives_bad_ones(report_stub: pb_grpc.ReportStub) -> None:
    items = {
        "normal": NORMAL,
        "effusion": EFFUSION,
        "empty": "",
        "long": "x" * 8001,
        "garbage": "qzxv wplk jjjrt vbnmq",
        **{f"again-{i}": NORMAL for i in range(5)},
    }

    async def send() -> AsyncIterator[pb.ImpressionRequest]:
        for key, findings in items.items():
            yield pb.ImpressionRequest(findings=findings, request_id=key)

    answers = {a.request_id: a async for a in report_stub.ImpressionStream(send())}
    assert set(answers) == set(items)
    assert answers["empty"].error.code_name == "INVALID_ARGUMENT"
    assert answers["long"].error.code_name == "RESOURCE_EXHAUSTED"
    assert answers["long"].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    ok = {k: a.response for k, a in answers.items() if a.HasField("response")}
    assert set(ok) == set(items) - {"empty", "long"}
    assert ok["normal"].score > 0.8 and ok["garbage"].score < 0.1
    assert "effusion" in ok["effusion"].impression.lower()
    assert {ok[f"again-{i}"].impression for i in range(5)} == {ok["normal"].impression}


async def test_report_service_is_in_reflection_and_health(channel: grpc.aio.Channel) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="medgate.v1.Report.ImpressionStream"),
    ]

    async def send() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        for request in requests:
            yield request

    listed, method = [answer async for answer in stub.ServerReflectionInfo(send())]
    assert "medgate.v1.Report" in {s.name for s in listed.list_services_response.service}
    assert method.HasField("file_descriptor_response")
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service="medgate.v1.Report/impression"))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


async def test_cli_one_report(gateway: GatewayServer, clients: Clients, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{gateway.port}"
    flags = clients.flags(Role.INFERENCE)
    code = await asyncio.to_thread(
        cli_main, ["impression", NORMAL, "--target", target, *flags, "--json", "--evidence", "2"]
    )
    assert code == 0
    answer = json.loads(capsys.readouterr().out)
    assert "acute" in answer["impression"].lower() and answer["score"] > 0.8 and len(answer["evidence"]) == 2
    assert answer["model"]["name"] == "impression"

    code = await asyncio.to_thread(cli_main, ["impression", "", "--target", target, *flags])
    assert code == 2 and "INVALID_ARGUMENT" in capsys.readouterr().err


async def test_cli_jsonl_through_the_stream(gateway: GatewayServer, clients: Clients, tmp_path: Path) -> None:
    source = tmp_path / "reports.jsonl"
    lines = [
        {"id": "a", "findings": NORMAL},
        {"id": "b", "findings": ""},
        "not json",
        {"id": 7, "findings": EFFUSION},
    ]
    source.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    target = f"127.0.0.1:{gateway.port}"
    argv = ["impression", "--file", str(source), "--out", str(out), "--target", target, *clients.flags(Role.INFERENCE)]
    code = await asyncio.to_thread(cli_main, argv)
    assert code == 1  # two lines failed; the others were answered
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert [r["id"] for r in records] == ["a", "b", None, 7]
    assert records[0]["score"] > 0.8 and "effusion" in records[3]["impression"].lower()
    assert records[1]["error"]["code"] == "INVALID_ARGUMENT" and records[2]["error"]["code"] == "INVALID_ARGUMENT"

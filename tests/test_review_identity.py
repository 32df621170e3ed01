"""The reviewer is who the token says: leases, decisions and output.json follow the verified identity.

Real review servers on loopback: one without tokens (development: the request's reviewer_id), one with
tokens (a JWKS file the test writes and tokens it mints). Plus the pure pieces: the servicer's rule for
the request's reviewer_id, the store's refusal of another reviewer's delivery, the schema migration.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from clients.reviewer import decision_id
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.flows import FlowDefinition, TaskType
from services.review.output import IDENTITY_PROVIDER_TYPE, output_document
from services.review.servicer import Reviewer, reviewer_of
from services.review.store import SCHEMA_VERSION, NotYourLease, ReviewStore
from services.review.store.schema import SCHEMA
from services.rpc.call import begin
from services.security.credentials import SigningKey, jwks_json, mint_token, new_signing_key
from services.security.identity import Identity, Role
from services.settings import Settings, load_settings
from tests.test_review_service import start_request, write_flows

ISSUER = "https://idp.hospital.invalid/realms/medgate"
AUDIENCE = "medgate"
ANSWER = pb.ReviewAnswer(label="lesion")


def _identity(subject: str) -> Identity:
    return Identity(subject=subject, issuer=ISSUER, roles=frozenset({Role.REVIEWER.value}))


# --- the servicer's rule ---------------------------------------------------------------------------------------


@pytest.fixture
def call_record() -> Iterator[None]:
    """A call record in this task, as the interceptors would begin it (restored afterwards)."""
    from services.rpc import call as call_module

    token = call_module._CURRENT.set(None)
    begin("/medgate.v1.Review/SubmitReview")
    yield
    call_module._CURRENT.reset(token)


def test_with_a_token_the_reviewer_is_the_token(call_record: None) -> None:
    from services.rpc.call import current_call

    record = current_call()
    assert record is not None
    record.identity = _identity("dr-a")
    expected = Reviewer(f"{ISSUER}#dr-a", ISSUER, "dr-a")
    assert reviewer_of("") == expected
    assert reviewer_of("dr-a") == expected  # the subject, as a client that knows it may send it
    assert reviewer_of(f"{ISSUER}#dr-a") == expected  # or ReviewCase.reviewer_id
    with pytest.raises(NotYourLease, match="token's subject"):
        reviewer_of("dr-b")  # refused, never silently replaced by the token's subject


def test_without_a_token_the_request_names_the_reviewer(call_record: None) -> None:
    assert reviewer_of("dr-dev") == Reviewer("dr-dev")
    with pytest.raises(Exception, match="reviewer_id is required"):
        reviewer_of("")


# --- the store ------------------------------------------------------------------------------------------------

FLOW = FlowDefinition("chest", TaskType.CLASSIFICATION, ("normal", "lesion"), task_count=1)


def test_a_decision_keeps_the_tokens_issuer_and_subject_for_identity_data(tmp_path: Path) -> None:
    with ReviewStore(tmp_path / "review.sqlite3") as store:
        store.start_loop(FLOW, "case-1", {}, "h1")
        key = f"{ISSUER}#dr-a"
        (delivery,) = store.lease(key, ["chest"])
        with pytest.raises(NotYourLease):
            store.submit("d0", f"{ISSUER}#dr-b", {"label": "lesion"}, delivery_id=delivery.delivery_id)
        with pytest.raises(NotYourLease):
            store.release(delivery.delivery_id, f"{ISSUER}#dr-b")
        decision = store.submit(
            "d1", key, {"label": "lesion"}, delivery_id=delivery.delivery_id, issuer=ISSUER, subject="dr-a"
        )
        (recorded,) = store.decisions("case-1")
        assert recorded == decision and (recorded.issuer, recorded.subject) == (ISSUER, "dr-a")
        (answer,) = output_document(store.describe("case-1"), [recorded])["humanAnswers"]
    assert answer["workerId"] == "dr-a"
    assert answer["workerMetadata"] == {
        "identityData": {"identityProviderType": IDENTITY_PROVIDER_TYPE, "issuer": ISSUER, "sub": "dr-a"}
    }


def test_a_version_1_store_is_migrated_and_keeps_its_decisions(tmp_path: Path) -> None:
    db = tmp_path / "review.sqlite3"
    with ReviewStore(db) as store:  # a loop and a decision, then the file is turned back into version 1
        store.start_loop(FLOW, "case-1", {}, "h1")
        (delivery,) = store.lease("dr-old", ["chest"])
        store.submit("d1", "dr-old", {"label": "normal"}, delivery_id=delivery.delivery_id)
        store.start_loop(FLOW, "case-2", {}, "h2")
    old = tmp_path / "v1.sqlite3"
    with sqlite3.connect(old) as conn:
        conn.executescript(f"{SCHEMA}; PRAGMA user_version=1;")
        conn.execute(f"ATTACH DATABASE '{db}' AS new")
        for table in ("loops", "images", "deliveries"):  # version 1's columns (later versions added some)
            names = ", ".join(row[1] for row in conn.execute(f"PRAGMA main.table_info({table})"))
            conn.execute(f"INSERT INTO {table} SELECT {names} FROM new.{table}")
        columns = "id, loop_seq, reviewer, delivery_id, answer_json, payload_digest, accepted_at, submitted_at"
        conn.execute(f"INSERT INTO decisions SELECT {columns} FROM new.decisions")
    with ReviewStore(old) as store:
        assert store._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        (before,) = store.decisions("case-1")
        assert (before.reviewer_id, before.issuer, before.subject, before.worker_id) == ("dr-old", None, None, "dr-old")
        assert "workerMetadata" not in output_document(store.describe("case-1"), [before])["humanAnswers"][0]
        (delivery,) = store.lease(f"{ISSUER}#dr-a", ["chest"])
        store.submit(
            "d2", f"{ISSUER}#dr-a", {"label": "lesion"}, delivery_id=delivery.delivery_id, issuer=ISSUER, subject="dr-a"
        )
        assert store.decisions("case-2")[0].subject == "dr-a"


# --- a real server without tokens ------------------------------------------------------------------------------


async def _first_case(stub: pb_grpc.ReviewStub, reviewer: str = "", **kwargs: object) -> pb.ReviewCase:
    stream = stub.StreamCases(
        pb.StreamCasesRequest(reviewer_id=reviewer, flow_definitions=["single"], max_in_flight=1), **kwargs
    )
    try:
        async for case in stream:
            return case
        raise AssertionError("the stream ended without a case")
    finally:
        stream.cancel()


async def _refused(call: object) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call  # type: ignore[misc]
    return refused.value.code()


def _no_server_path(loop: pb.HumanLoop) -> None:
    assert not Path(loop.output_path).is_absolute(), loop.output_path
    assert loop.output_path.startswith(f"{loop.flow_definition}/"), loop.output_path


@pytest.fixture
async def plain(tmp_path: Path) -> AsyncIterator[tuple[pb_grpc.ReviewStub, Path, str]]:
    from services.review.server import ReviewServer

    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": write_flows(tmp_path), "port": 0},
        security={"auth": False, "tls": False, "audit_dir": tmp_path / "audit"},
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    try:
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield pb_grpc.ReviewStub(channel), tmp_path, target
    finally:
        await server.stop()


async def test_without_tokens_another_reviewers_case_cannot_be_decided_or_released(
    plain: tuple[pb_grpc.ReviewStub, Path, str],
) -> None:
    stub, root, _ = plain
    await stub.StartHumanLoop(start_request("case-p"))
    case = await _first_case(stub, "dr-a")
    assert case.reviewer_id == "dr-a"
    theirs = pb.SubmitReviewRequest(decision_id="x", delivery_id=case.delivery_id, reviewer_id="dr-b", answer=ANSWER)
    assert await _refused(stub.SubmitReview(theirs)) == grpc.StatusCode.PERMISSION_DENIED
    release = pb.ReleaseCaseRequest(delivery_id=case.delivery_id, reviewer_id="dr-b")
    assert await _refused(stub.ReleaseCase(release)) == grpc.StatusCode.PERMISSION_DENIED
    unknown = pb.ReleaseCaseRequest(delivery_id="no-such-delivery", reviewer_id="dr-a")
    assert await _refused(stub.ReleaseCase(unknown)) == grpc.StatusCode.NOT_FOUND
    mine = pb.SubmitReviewRequest(decision_id="y", delivery_id=case.delivery_id, reviewer_id="dr-a", answer=ANSWER)
    done = (await stub.SubmitReview(mine)).human_loop
    assert done.status == pb.HUMAN_LOOP_STATUS_COMPLETED
    _no_server_path(done)
    _no_server_path(await stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="case-p")))
    for loop in (await stub.ListHumanLoops(pb.ListHumanLoopsRequest())).human_loops:
        _no_server_path(loop)
    for flow in (await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest())).flow_definitions:
        assert flow.output_path == "out"  # the folder's name; the server's path to it stays on the server
    answer = json.loads((root / "out" / done.output_path).read_text())["humanAnswers"][0]
    assert answer["workerId"] == "dr-a" and "workerMetadata" not in answer


# --- a real server with tokens ----------------------------------------------------------------------------------


class Tokens:
    def __init__(self, key: SigningKey) -> None:
        self.key = key

    def metadata(self, subject: str, role: Role = Role.REVIEWER) -> tuple[tuple[str, str], ...]:
        token = mint_token(self.key, issuer=ISSUER, audience=AUDIENCE, subject=subject, roles=[role.value])
        return (("authorization", f"Bearer {token}"),)


def token_settings(tmp_path: Path) -> tuple[Settings, SigningKey]:
    """A review service in ``tmp_path`` that takes tokens (no TLS) signed by a new key: its settings and the key."""
    key = new_signing_key()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(jwks_json(key))
    settings = load_settings(
        review={"store_path": tmp_path / "review.sqlite3", "flows_file": write_flows(tmp_path), "port": 0},
        security={
            "auth": True,
            "tls": False,
            "jwks_file": jwks,
            "issuer": ISSUER,
            "audience": AUDIENCE,
            "audit_dir": tmp_path / "audit",
        },
    )
    return settings, key


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[tuple[pb_grpc.ReviewStub, Tokens, Path, str]]:
    from services.review.server import ReviewServer

    settings, key = token_settings(tmp_path)
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=0)
    try:
        target = f"127.0.0.1:{server.port}"
        async with grpc.aio.insecure_channel(target) as channel:
            yield pb_grpc.ReviewStub(channel), Tokens(key), tmp_path, target
    finally:
        await server.stop()


async def test_with_tokens_the_reviewer_is_the_token_and_output_json_says_so(
    secured: tuple[pb_grpc.ReviewStub, Tokens, Path, str],
) -> None:
    stub, tokens, root, _ = secured
    dr_a, dr_b, admin = tokens.metadata("dr-a"), tokens.metadata("dr-b"), tokens.metadata("ops", Role.ADMIN)
    await stub.StartHumanLoop(start_request("case-t"), metadata=tokens.metadata("gw", Role.ROUTER))
    # Naming someone else in the request is refused, not replaced by the token's subject.
    assert await _refused(_first_case(stub, "dr-b", metadata=dr_a)) == grpc.StatusCode.PERMISSION_DENIED
    case = await _first_case(stub, metadata=dr_a)  # no reviewer_id: the token says who
    assert case.reviewer_id == f"{ISSUER}#dr-a"
    theirs = pb.SubmitReviewRequest(decision_id="b-1", delivery_id=case.delivery_id, answer=ANSWER)
    assert await _refused(stub.SubmitReview(theirs, metadata=dr_b)) == grpc.StatusCode.PERMISSION_DENIED
    release = pb.ReleaseCaseRequest(delivery_id=case.delivery_id)
    assert await _refused(stub.ReleaseCase(release, metadata=dr_b)) == grpc.StatusCode.PERMISSION_DENIED
    # dr-b cannot pass as dr-a through the request field either.
    spoofed = pb.SubmitReviewRequest(decision_id="b-2", delivery_id=case.delivery_id, reviewer_id="dr-a", answer=ANSWER)
    assert await _refused(stub.SubmitReview(spoofed, metadata=dr_b)) == grpc.StatusCode.PERMISSION_DENIED
    mine = pb.SubmitReviewRequest(
        decision_id=decision_id(case.reviewer_id, case.human_loop_name), delivery_id=case.delivery_id, answer=ANSWER
    )
    done = (await stub.SubmitReview(mine, metadata=dr_a)).human_loop
    assert done.status == pb.HUMAN_LOOP_STATUS_COMPLETED
    _no_server_path(done)
    _no_server_path(await stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name="case-t"), metadata=admin))
    answer = json.loads((root / "out" / done.output_path).read_text())["humanAnswers"][0]
    assert answer["workerId"] == "dr-a"
    assert answer["workerMetadata"] == {
        "identityData": {"identityProviderType": "OIDC", "issuer": ISSUER, "sub": "dr-a"}
    }
    assert answer["answerContent"] == {"label": "lesion", "initialValueModified": False}


async def test_the_reviewer_client_without_tokens_needs_a_reviewer_id(
    plain: tuple[pb_grpc.ReviewStub, Path, str],
) -> None:
    stub, _, target = plain
    await stub.StartHumanLoop(start_request("case-c"))

    async def reviewer(*extra: str) -> tuple[int, str, str]:
        command = [sys.executable, "-m", "clients.cli", "reviewer", "--flow", "single", "--target", target, *extra]
        process = await asyncio.create_subprocess_exec(*command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(process.communicate(), timeout=60)
        return process.returncode or 0, out.decode(), err.decode()

    code, _, err = await reviewer("--auto", "accept", "--limit", "1")
    assert (
        code == 2 and "INVALID_ARGUMENT" in err and "reviewer_id" in err
    )  # no token and no id: says so, no retry loop
    code, out, err = await reviewer("--reviewer-id", "dr-cli", "--auto", "label:lesion", "--limit", "1")
    assert code == 0, err
    assert "reviewing as dr-cli" in out and "case case-c" in out
    assert "output single/" in out  # the A2I key, not a path on the server


async def test_the_reviewer_client_with_a_token_needs_no_reviewer_id(
    secured: tuple[pb_grpc.ReviewStub, Tokens, Path, str],
) -> None:
    stub, tokens, root, target = secured
    await stub.StartHumanLoop(start_request("case-k"), metadata=tokens.metadata("gw", Role.ROUTER))
    token = tokens.metadata("dr-k")[0][1].removeprefix("Bearer ")
    command = [sys.executable, "-m", "clients.cli", "reviewer", "--flow", "single", "--target", target]
    command += ["--insecure", "--auto", "accept", "--limit", "1"]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "MEDGATE_TOKEN": token},
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode == 0, err.decode()
    assert f"reviewing as {ISSUER}#dr-k" in out.decode()
    key = next(line for line in out.decode().splitlines() if "output " in line).rsplit("output ", 1)[1]
    answer = json.loads((root / "out" / key).read_text())["humanAnswers"][0]
    assert answer["workerId"] == "dr-k" and answer["workerMetadata"]["identityData"]["sub"] == "dr-k"

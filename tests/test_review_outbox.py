"""Nothing routed to review is lost when the review service is away: the outbox keeps it and sends it later.

Both servers run as ``make run`` serves them (TLS, tokens): the gateway reaches the review service over TLS
with the router token, and a case the review service refuses because of the gateway's own credentials waits
in the outbox until they are fixed.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.routing import ReviewRouter, input_hash
from services.gateway.server import GatewayServer
from services.imaging.limits import IngestLimits
from services.imaging.prepare import prepare
from services.review.flows import load_flows
from services.review.outbox import IMAGE_INPUT, IMAGE_MODEL, MAGIC, SUFFIX, Kept, Outbox, OutboxFull, pack, unpack
from services.review.server import ReviewServer
from services.review.store import NotFound
from services.security.credentials import DevCredentials
from services.security.identity import Role
from services.settings import Settings, load_settings
from tests.conftest import Clients, free_port, security_values
from tests.fixtures import phantom, png_bytes, pydicom_data_file

# Every classification goes to review (a 100% sample): routing does not depend on the model.
FLOWS = """
[[flows]]
name = "always"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 60
output_dir = "out"
activation_conditions = '''
{"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}}
'''
"""


def test_outbox_keeps_replaces_and_sets_aside(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "outbox", max_bytes=100)
    outbox.put("case-a", b"first")
    outbox.put("case-b", b"second")
    outbox.put("case-a", b"again")  # the same loop name replaces its older copy
    entries = outbox.pending()
    assert sorted(e.name for e in entries) == ["case-a", "case-b"]
    assert {e.name: outbox.read(e) for e in entries} == {"case-a": b"again", "case-b": b"second"}
    assert not [p for p in (tmp_path / "outbox").iterdir() if p.name.startswith(".incoming")]
    with pytest.raises(OutboxFull):
        outbox.put("case-c", b"x" * 95)
    with pytest.raises(ValueError):
        outbox.put("../escape", b"x")
    a, b = sorted(entries, key=lambda e: e.name)
    outbox.done(a)
    outbox.done(a)  # another worker got there first: fine
    outbox.refuse(b)
    assert outbox.pending() == [] and outbox.read(a) is None
    assert (tmp_path / "outbox" / "refused" / b.path.name).read_bytes() == b"second"


def test_an_entry_is_complete_or_compact_and_a_broken_compact_one_is_refused_by_unpack() -> None:
    complete = b"\x0a\x06case-a\x12\x06always"  # a serialized StartHumanLoopRequest starts with its name's tag
    assert pack(Kept(complete)) == complete and unpack(complete) == Kept(complete)
    compact = Kept(complete, IMAGE_MODEL, (2, 3), bytes(range(6)))
    payload = pack(compact)
    assert payload.startswith(MAGIC) and unpack(payload) == compact
    assert unpack(pack(Kept(complete, IMAGE_INPUT, (1024, 1024), b"png"))).data == b"png"
    for broken in (
        payload[: len(MAGIC) + 3],
        payload[: len(MAGIC) + 12],
        MAGIC + payload[len(MAGIC) :].replace(b"model", b"other"),
    ):
        with pytest.raises(ValueError):
            unpack(broken)
    with pytest.raises(ValueError):
        pack(Kept(complete, "other", (1,), b"x"))


def stack_settings(tmp_path: Path, credentials: DevCredentials, **security: Any) -> Settings:
    flows = tmp_path / "flows.toml"
    flows.write_text(FLOWS)
    review_port = free_port()  # nothing listens here yet
    return load_settings(
        gateway={"port": 0, "metrics_port": -1},
        security=security_values(credentials.directory, audit_dir=tmp_path / "audit", **security),
        review={
            "url": f"127.0.0.1:{review_port}",
            "port": review_port,
            "web_port": 0,  # the reviewer page on a free port, never the default 8080
            "flows_file": flows,
            "store_path": tmp_path / "review.sqlite3",
            "outbox_dir": tmp_path / "outbox",
            "outbox_retry_interval_s": 0.2,
            "route_timeout_s": 1.0,
            "housekeeping_interval_s": 0.2,
        },
    )


async def wait_for_loop(review: ReviewServer, name: str, deadline: float) -> None:
    while True:
        try:
            review.store.describe(name)
            return
        except NotFound:
            assert time.monotonic() < deadline, "the kept case never reached the review service"
            await asyncio.sleep(0.1)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_case_routed_while_review_is_down_reaches_it_when_it_is_back(
    triton_url: str, tmp_path: Path, dev_credentials: DevCredentials, clients: Clients
) -> None:
    settings = stack_settings(tmp_path, dev_credentials)
    gateway = GatewayServer(settings, triton_url)
    await gateway.start(port=0)
    review: ReviewServer | None = None
    try:
        async with clients.channel(f"127.0.0.1:{gateway.port}", Role.INFERENCE) as channel:
            stub = pb_grpc.InferenceStub(channel)
            request = pb.ClassifyRequest(image=pb.ImageInput(data=png_bytes(phantom(12).image)))
            answer = await stub.Classify(request)
            (routing,) = answer.review
            assert routing.queued and not routing.routed and routing.flow_definition == "always"
            kept = list((tmp_path / "outbox").glob("*.pending"))
            assert [p.name for p in kept] == [f"{routing.human_loop_name}.pending"]

            # The review service comes up; the gateway's retries hand it the case.
            review = ReviewServer(settings.review, settings.security)
            await review.start()
            deadline = time.monotonic() + 15
            await wait_for_loop(review, routing.human_loop_name, deadline)
            loop = review.store.describe(routing.human_loop_name)
            assert loop.status == "InProgress" and review.store.images(loop.name)["image.png"][:4] == b"\x89PNG"
            while list((tmp_path / "outbox").glob("*.pending")):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)

            again = await stub.Classify(request)
            assert again.review[0].routed and again.review[0].human_loop_name == routing.human_loop_name
            assert not again.review[0].queued
    finally:
        await gateway.stop()
        if review is not None:
            await review.stop()
    assert not (tmp_path / "outbox" / "refused").exists()  # nothing was refused


@pytest.mark.asyncio(loop_scope="session")
async def test_a_case_refused_for_the_gateways_token_waits_until_the_token_is_fixed(
    triton_url: str, tmp_path: Path, dev_credentials: DevCredentials, clients: Clients
) -> None:
    """A router token without the router role (PERMISSION_DENIED) is the gateway's own configuration: the case
    is kept, not refused for good, and goes once the token file holds a router token (re-read without restart)."""
    token_file = tmp_path / "router.token"
    shutil.copyfile(dev_credentials.token_path(Role.REVIEWER), token_file)  # valid, but the wrong role
    settings = stack_settings(tmp_path, dev_credentials, router_token_file=token_file)
    review = ReviewServer(settings.review, settings.security)
    await review.start()
    gateway = GatewayServer(settings, triton_url)
    await gateway.start(port=0)
    try:
        async with clients.channel(f"127.0.0.1:{gateway.port}", Role.INFERENCE) as channel:
            request = pb.ClassifyRequest(image=pb.ImageInput(data=png_bytes(phantom(13).image)))
            (routing,) = (await pb_grpc.InferenceStub(channel).Classify(request)).review
            assert routing.queued and not routing.routed
            assert routing.reasons[-1] == "queued"  # the answer leaves with the case in the outbox; the send follows
            await asyncio.sleep(0.5)  # the send and a few retries are refused: still kept, nothing given up
            assert [p.name for p in (tmp_path / "outbox").glob("*.pending")] == [f"{routing.human_loop_name}.pending"]
            assert not (tmp_path / "outbox" / "refused").exists()

            shutil.copyfile(dev_credentials.token_path(Role.ROUTER), token_file)
            await wait_for_loop(review, routing.human_loop_name, time.monotonic() + 15)
    finally:
        await gateway.stop()
        await review.stop()


def _stored_png(image: np.ndarray) -> bytes:
    """The review image as gateways before the compact form kept it: an uncompressed (stored) PNG."""
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 0])
    assert ok
    return encoded.tobytes()


@pytest.mark.asyncio(loop_scope="session")
async def test_an_upgraded_gateway_delivers_every_kind_of_entry_from_a_full_outbox(
    tmp_path: Path, dev_credentials: DevCredentials
) -> None:
    """The real router and review service over TLS with tokens, no Triton (the scores are given). Kept while the
    review service is away: entries as earlier gateways wrote them (the complete request, its image a stored PNG),
    compact ones (the caller's small PNG; a large PNG's model image, raw), and complete ones written after a
    failed delivery (grey DICOM, with their 16-bit image). A gateway started on that outbox, full to its limit,
    delivers every case with its review image pixel for pixel, and sets aside an entry it cannot read."""
    settings = stack_settings(tmp_path, dev_credentials)
    flows = load_flows(settings.review.flows_file)
    scores = pb.ClassifyResponse(scores=[pb.ClassScore(label="normal", score=0.6)])
    noisy = np.random.default_rng(5).integers(0, 256, (1400, 1400), dtype=np.uint8)
    inputs = {
        "small png": png_bytes(phantom(40).image),  # 0.3 MB: kept as it came
        "large png": png_bytes(noisy),  # over 1 MiB: the model image is kept instead
        "RG1_UNCI.dcm": pydicom_data_file("RG1_UNCI.dcm").read_bytes(),
        "CT_small.dcm": pydicom_data_file("CT_small.dcm").read_bytes(),
        "old png": png_bytes(phantom(41).image),
        "old RG1_UNCI.dcm": pydicom_data_file("RG1_UNCI.dcm").read_bytes()[:-2] + b"\x01\x00",
    }
    prepared = {key: prepare(data, limits=IngestLimits()) for key, data in inputs.items()}
    names: dict[str, str] = {}

    def router(outbox: Outbox) -> ReviewRouter:
        return ReviewRouter(
            flows,
            settings.review.target,
            ThreadPoolExecutor(2),
            timeout_s=1.0,
            outbox=outbox,
            retry_interval_s=0.2,
            security=settings.security,
        )

    # The gateway before the upgrade, with the review service away.
    before = router(Outbox(settings.review.outbox_dir, max_bytes=1 << 30))
    try:
        for key in ("old png", "old RG1_UNCI.dcm"):  # what the earlier code wrote: request and stored PNG
            digest = input_hash(pb.ImageInput(data=inputs[key]))
            request = before._request(
                flows["always"],
                ("RandomSamplingPercentage",),
                digest,
                prepared[key],
                classification=scores,
                detection=None,
                segmentation=None,
                masks=None,
                request_id=key,
            )
            request.image_png = _stored_png(prepared[key].model_image)
            before.outbox.put(request.name, request.SerializeToString())
            names[key] = request.name
        for key in ("small png", "large png", "RG1_UNCI.dcm", "CT_small.dcm"):
            image = pb.ImageInput(data=inputs[key])
            (routing,) = await before.route(image=image, prepared=prepared[key], classification=scores)
            assert routing.queued and routing.reasons[-1] == "queued", routing.reasons
            names[key] = routing.human_loop_name
    finally:
        await before.close()  # its deliveries were refused by nobody listening: everything stays
    outbox = settings.review.outbox_dir
    forms = {key: unpack((outbox / f"{name}{SUFFIX}").read_bytes()).image for key, name in names.items()}
    assert forms == {
        "old png": "",
        "old RG1_UNCI.dcm": "",
        "small png": "input",
        "large png": "model",
        "RG1_UNCI.dcm": "",  # complete once its delivery failed: the 16-bit image goes with it
        "CT_small.dcm": "",
    }
    (outbox / f"broken{SUFFIX}").write_bytes(MAGIC + b"\x00\x00\x00\x09")  # cut short: never written so

    review = ReviewServer(settings.review, settings.security)
    await review.start()
    held = sum(p.stat().st_size for p in outbox.glob(f"*{SUFFIX}"))
    after = router(Outbox(outbox, max_bytes=held))  # the upgraded gateway, on an outbox at its limit
    try:
        after.start_retrying()
        deadline = time.monotonic() + 30
        for name in names.values():
            await wait_for_loop(review, name, deadline)
        while list(outbox.glob(f"*{SUFFIX}")):
            assert time.monotonic() < deadline, sorted(p.name for p in outbox.glob(f"*{SUFFIX}"))
            await asyncio.sleep(0.1)
        for key, name in names.items():
            images = review.store.images(name)
            shown = cv2.imdecode(np.frombuffer(images["image.png"], np.uint8), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(shown, prepared[key].model_image), key
            assert ("modality.png" in images) == (key in ("RG1_UNCI.dcm", "CT_small.dcm")), key
    finally:
        await after.close()
        await review.stop()
    assert [p.name for p in (outbox / "refused").iterdir()] == [f"broken{SUFFIX}"]

"""Route unsure answers to human review: evaluate each flow's activation conditions, start its loop over gRPC.

The loop name is derived from (flow, input hash), so sending the same image twice never opens a
second loop.

Routing stays off the caller's path: the answer waits only for the input's hash (about 4 ms for a 7 MB
DICOM), the flows' conditions and a durable hand-off, not for the PNG encoding (20 ms) or the review
service. The hand-off is the on-disk outbox (``services/review/outbox.py``): the case's StartHumanLoop
request without its review image, beside the smaller of what that image is made from (the caller's own
encoded file, 0.3 MB for a 1024x1024 PNG radiograph, or else the 8-bit model image's raw 1 MiB; no PNG is
built on the caller's time) and, for an answer written as DICOM, the source's header only (never its
pixels), is written, fsynced and renamed into place before the answer leaves, so neither a gateway killed
nor a machine going down a moment later loses it. The fsyncs cost about what is written (1.3 ms for
0.3 MB, 2.5-3 ms for 1 MiB here), so the smaller source is the cheaper promise. The routing entry says so
honestly: ``queued``, with the loop name. A background task then sends the case (with the image compressed,
on its own thread) and takes it out of the outbox when the service has it; a review service that cannot be
reached leaves it there, and the outbox's retry task (:func:`outbox_request`: the review images rebuilt
from what was kept, or an entry complete already, as every gateway before the compact form wrote them) sends
it again until the service takes it. An image this router already knows to be in review answers
``routed`` ("already in review") without a hand-off. Only when the outbox cannot keep a case (full, or its
disk fails) is it sent while the caller waits, as before.

The channel to the review service follows ``security``: with TLS on, the review server's certificate
must chain to ``security.client_ca_file`` (the CA of medgate's nodes: the embedded default signs the
gateway's and the review service's certificate with the one development CA, and a hospital's ATNA
node certificates come from one CA too), and under mutual TLS the gateway presents its own node
certificate (``cert_file``/``key_file``). With tokens on it sends ``security.router_token_file`` (role
``router``), re-read when the file changes. With TLS off the channel is plaintext, and the token goes
only to a loopback address.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from google.protobuf import json_format

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import review_pb2 as rpb
from medgate.v1 import review_pb2_grpc as rpb_grpc
from services.durable import write_durable
from services.gateway.convert import input_kind
from services.gateway.review_dicom import case_dicom_source
from services.gateway.review_image import ModalityImage, modality_image
from services.imaging.arrays import WireArray, encode_array
from services.imaging.limits import IngestLimits
from services.imaging.prepare import PreparedImage, prepare
from services.metrics import REVIEW_OUTBOX_PENDING, REVIEW_ROUTED
from services.review.flows import FlowDefinition, TaskType, summarize
from services.review.outbox import IMAGE_INPUT, IMAGE_MODEL, SUFFIX, Kept, Outbox, OutboxFull, Pending, pack, unpack
from services.review.servicer import IMAGE_NAME
from services.review.store import auto_loop_name
from services.rpc.tls import check_plaintext_allowed, is_loopback
from services.settings import SecuritySettings

log = logging.getLogger("medgate.gateway.routing")

# The service may take these later; anything else it will refuse however often it is asked. A refused token
# or role is the gateway's own credentials (an expired router token, a missing role): once an operator fixes
# them the queued cases go, so they wait in the outbox rather than being refused for good.
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
}


@dataclass(frozen=True)
class InputDigest:
    """An input's hash and its size in bytes (``image.data``, or the serialized array), read in one pass."""

    hexdigest: str
    size: int


def input_digest(image: pb.ImageInput) -> InputDigest:
    """What identifies an input for idempotent loop names and deterministic sampling: its bytes.

    The size comes with it because upb copies a bytes field on every read (about 1 ms for 7 MB here): the
    hand-off then knows the caller's file size without reading it again on the caller's time.
    """
    digest = hashlib.sha256()
    data = image.array.SerializeToString(deterministic=True) if image.WhichOneof("source") == "array" else image.data
    digest.update(data)
    if image.HasField("frame"):
        digest.update(f"frame={image.frame}".encode())
    return InputDigest(digest.hexdigest(), len(data))


def input_hash(image: pb.ImageInput) -> str:
    return input_digest(image).hexdigest


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


# Loop names this router knows to be in review: an image sent again is answered "routed" without a hand-off.
_KNOWN_LOOPS = 10_000
# What a case's message carries beyond the bytes counted when its DICOM source is added: the review images added
# when it is sent (letterboxed to 1024x1024: the 8-bit one 1 MiB at most, the 16-bit one 2 MiB, stored) and the
# DICOM context's UIDs.
_MESSAGE_MARGIN_BYTES = 3 * 1024 * 1024 + 64 * 1024
# Rebuilding a kept input's review image: it passed the gateway's ingest limits when it was handed off, and the
# outbox is the gateway's own folder, so these only keep a limit lowered since then from stranding the case.
_REBUILD_LIMITS = IngestLimits(
    max_input_bytes=1 << 40,
    max_inflated_bytes=1 << 40,
    max_pixels=1 << 40,
    max_frames=1 << 20,
    max_dimension_pixels=1 << 20,
    max_decoded_bytes=1 << 40,
)
_LOOP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # what the outbox takes as a file name


@dataclass
class _Case:
    """One matched flow of one answer, on its way to the review service."""

    flow: FlowDefinition
    routing: pb.ReviewRouting
    request: rpb.StartHumanLoopRequest | None = None
    problem: str = ""  # why the outbox could not keep it


class _TokenFile(grpc.AuthMetadataPlugin):
    """``authorization: Bearer <token>`` from a file, re-read when it changes (a renewed token needs no restart)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    def token(self) -> str:
        with self._lock:
            try:
                stat = os.stat(self.path)
                stamp = (stat.st_mtime_ns, stat.st_size)
                if stamp != self._stamp:
                    self._token = self.path.read_text().strip()
                    self._stamp = stamp
            except OSError as exc:
                if self._stamp is not None or not self._token:
                    log.error("router token %s cannot be read (%s)", self.path, exc.strerror)
                self._stamp, self._token = None, ""
            return self._token

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        token = self.token()
        callback((("authorization", f"Bearer {token}"),) if token else (), None)


def _target_host(target: str) -> str:
    address = target.split("///", 1)[-1]
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def review_channel_credentials(security: SecuritySettings | None, target: str) -> grpc.ChannelCredentials | None:
    """How the gateway reaches the review service at ``target``; None for plaintext without a token."""
    if security is None:
        return None
    token = grpc.metadata_call_credentials(_TokenFile(Path(security.router_token_file)), name="router-token")
    if not security.tls:
        if security.auth and is_loopback(_target_host(target)):
            local = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
            return grpc.composite_channel_credentials(local, token)
        check_plaintext_allowed(_target_host(target), security)  # cases carry images: plaintext only where allowed
        return None
    try:
        roots = Path(security.client_ca_file).read_bytes()
        key, chain = (
            (Path(security.key_file).read_bytes(), Path(security.cert_file).read_bytes())
            if security.require_client_cert
            else (None, None)
        )
    except OSError as exc:
        raise RuntimeError(
            f"review routing: TLS is on but {exc.filename} cannot be read (the CA that signed the review "
            "service's certificate is security.client_ca_file; `medgate credentials` makes the development one)"
        ) from None
    transport = grpc.ssl_channel_credentials(root_certificates=roots, private_key=key, certificate_chain=chain)
    return grpc.composite_channel_credentials(transport, token) if security.auth else transport


class ReviewRouter:
    """Starts human loops on the review service for results that a flow's conditions select."""

    def __init__(
        self,
        flows: dict[str, FlowDefinition],
        target: str,
        executor: Executor,
        *,
        timeout_s: float,
        outbox: Outbox,
        retry_interval_s: float = 2.0,
        max_message_bytes: int = 64 << 20,
        security: SecuritySettings | None = None,
        dicom_source_max_bytes: int = 64 << 20,
    ) -> None:
        """``security`` None: a plaintext channel without a token (tests and tools on loopback).

        ``dicom_source_max_bytes``: a DICOM source up to this size travels with its case (for the verified
        DICOM result when the loop completes); a larger one is reviewed without it.
        """
        self.flows = flows
        self.target = target
        self.executor = executor
        self.timeout_s = timeout_s
        self.outbox = outbox
        self.retry_interval_s = retry_interval_s
        self.max_message_bytes = max_message_bytes
        self.dicom_source_max_bytes = dicom_source_max_bytes
        # Built now, so a CA file that cannot be read stops start-up instead of failing the first routed case.
        self._credentials = review_channel_credentials(security, target)
        self._channel: grpc.aio.Channel | None = None
        self._retrying: asyncio.Task[None] | None = None
        self._in_review: OrderedDict[str, None] = OrderedDict()
        self._delivering: set[str] = set()  # hand-offs being sent now: the retry round leaves them alone
        self._held, self._held_at = 0, float("-inf")  # the outbox's bytes as last counted, and when
        # The deliveries' disk and PNG work, on one thread at a lower CPU priority: on a busy machine it yields
        # to the requests' own work (decoding, Triton) instead of slowing the next answer.
        self._background = ThreadPoolExecutor(1, thread_name_prefix="medgate-review-handoff", initializer=_nice)
        self._deliveries: set[asyncio.Task[None]] = set()

    def start_retrying(self) -> None:
        """Send what the outbox holds (from this run or an earlier one) until the service takes it."""
        if self._retrying is None:
            self._retrying = asyncio.create_task(self._retry_forever(), name="review-outbox")

    async def _retry_forever(self) -> None:
        while True:
            try:
                await self.flush_outbox()
            except asyncio.CancelledError:
                raise
            except Exception:  # a disk or programming error must not end the retries
                log.exception("review outbox: a retry round failed")
            await asyncio.sleep(self.retry_interval_s)

    async def flush_outbox(self) -> int:
        """One round over the outbox; returns how many cases the service took."""
        loop = asyncio.get_running_loop()
        entries = await loop.run_in_executor(self.executor, self.outbox.pending)
        REVIEW_OUTBOX_PENDING.set(len(entries))
        taken = 0
        for entry in entries:
            if entry.name in self._delivering:
                continue
            payload = await loop.run_in_executor(self.executor, self.outbox.read, entry)
            if payload is None:
                continue  # another worker sent it
            try:
                # A compact entry's review images are rebuilt (decoding, PNG) on the low-priority thread.
                request = await loop.run_in_executor(self._background, outbox_request, payload)
            except Exception as exc:  # never written so by a gateway: for an operator, not retried forever
                log.error(
                    "review outbox: %s cannot be read back (%s); kept in %s",
                    entry.name,
                    type(exc).__name__,
                    self.outbox.refused_dir,
                )
                await loop.run_in_executor(self.executor, self.outbox.refuse, entry)
                continue
            try:
                await self.stub.StartHumanLoop(request, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _RETRYABLE:
                    return taken  # still away: try again next round
                if exc.code() is not grpc.StatusCode.ALREADY_EXISTS:
                    log.error(
                        "review outbox: %s refused for good (%s); kept in %s",
                        entry.name,
                        exc.code().name,
                        self.outbox.refused_dir,
                    )
                    await loop.run_in_executor(self.executor, self.outbox.refuse, entry)
                    continue
            await loop.run_in_executor(self.executor, self.outbox.done, entry)
            REVIEW_ROUTED.labels(flow=request.flow_definition).inc()
            self._remember(entry.name)
            log.info("review outbox: %s delivered", entry.name)
            taken += 1
        REVIEW_OUTBOX_PENDING.set(len(entries) - taken)
        return taken

    @property
    def stub(self) -> rpb_grpc.ReviewStub:
        if self._channel is None:
            options = [("grpc.max_send_message_length", self.max_message_bytes)]
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=options)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials, options=options)
        return rpb_grpc.ReviewStub(self._channel)

    def _remember(self, name: str) -> None:
        self._in_review[name] = None
        self._in_review.move_to_end(name)
        while len(self._in_review) > _KNOWN_LOOPS:
            self._in_review.popitem(last=False)

    async def close(self) -> None:
        if self._deliveries:  # hand-offs in flight: give them the time of one call; what is left stays in the outbox
            await asyncio.wait(set(self._deliveries), timeout=self.timeout_s)
            for task in set(self._deliveries):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*self._deliveries, return_exceptions=True)
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
            self._retrying = None
        self._background.shutdown(wait=False, cancel_futures=True)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    def digest(self, image: pb.ImageInput) -> asyncio.Future[InputDigest]:
        """The input's hash, started now on the executor; hand it to :meth:`route`.

        Up to 64 MiB of input, about 4 ms for a 7 MB radiograph: started once the input is decoded, it runs
        beside the model call instead of after it (beside decoding it slowed decoding as much on 2 cores).
        """
        return asyncio.get_running_loop().run_in_executor(self.executor, input_digest, image)

    async def route(
        self,
        *,
        image: pb.ImageInput,
        prepared: PreparedImage,
        classification: pb.ClassifyResponse | None = None,
        detection: pb.DetectResponse | None = None,
        segmentation: pb.SegmentResponse | None = None,
        masks: np.ndarray | None = None,
        request_id: str = "",
        digest: Awaitable[InputDigest] | None = None,
        dicom_results: Sequence[pb.DicomObject] = (),
    ) -> list[pb.ReviewRouting]:
        """One routing entry per flow whose conditions matched: ``queued`` (handed off: in the outbox, on its way),
        ``routed`` (already in review), or neither with the reason. One hop to the executor; the rest after.

        ``digest``: :meth:`digest` of ``image``, started earlier (else it is computed here). ``dicom_results``:
        the answer's SEG and SR (a DICOM input with ``output.dicom_results``): then each case keeps the source
        and their identifiers (:mod:`services.gateway.review_dicom`) for its verified DICOM result.
        """
        loop = asyncio.get_running_loop()
        known = await digest if digest is not None else None

        def hand_off() -> list[_Case]:
            facts = known or input_digest(image)
            digest = facts.hexdigest
            cases: list[_Case] = []
            for flow in self.flows.values():
                if flow.task_type is TaskType.CLASSIFICATION and classification is not None:
                    summary = summarize(digest, class_scores=[s.score for s in classification.scores])
                elif flow.task_type is TaskType.DETECTION and detection is not None:
                    summary = summarize(digest, box_scores=[d.score for d in detection.detections])
                elif flow.task_type is TaskType.SEGMENTATION and segmentation is not None:
                    summary = summarize(digest, prompt_scores={p.prompt: p.score for p in segmentation.prompts})
                else:
                    continue
                activation = flow.activation(summary)
                if not activation.matched:
                    continue
                name = auto_loop_name(flow.name, digest)
                routing = pb.ReviewRouting(
                    human_loop_name=name, flow_definition=flow.name, reasons=list(activation.reasons)
                )
                cases.append(_Case(flow, routing))
                if name in self._in_review:
                    routing.routed = True  # this image is in review already: that loop covers it
                    routing.reasons.append("already in review")
            fresh = [case for case in cases if not case.routing.routed]
            if not fresh:
                return cases
            source = _review_source(image, facts.size, prepared)
            packed = None
            if masks is not None and any(case.flow.task_type is TaskType.SEGMENTATION for case in fresh):
                packed = encode_array(masks, packbits=True)
            dicom = case_dicom_source(image, prepared, dicom_results, classification, detection, segmentation)
            for case in fresh:
                case.request = self._request(
                    case.flow,
                    tuple(case.routing.reasons),
                    digest,
                    prepared,
                    classification=classification,
                    detection=detection,
                    segmentation=segmentation,
                    masks=packed,
                    request_id=request_id,
                )
                if dicom is not None:
                    # The case must still fit one message to the review service, or it would never get there.
                    room = self.max_message_bytes - case.request.ByteSize() - _MESSAGE_MARGIN_BYTES
                    if len(dicom.data) <= min(self.dicom_source_max_bytes, room):
                        case.request.dicom.CopyFrom(dicom)
                    else:
                        case.routing.reasons.append(
                            "DICOM source over review.dicom_source_max_bytes or the message limit: no verified result"
                        )
                try:
                    self._keep(case.request, source)
                    case.routing.queued = True
                    case.routing.reasons.append("queued")
                except (OutboxFull, OSError, ValueError) as exc:
                    case.problem = type(exc).__name__
            return cases

        cases = await loop.run_in_executor(self.executor, hand_off)
        for case in cases:
            if case.request is None:
                continue
            if case.routing.queued:
                self._deliver_later(case.request, prepared)
            else:
                # The outbox cannot keep it: send it now, on the caller's time, rather than lose it.
                log.error("review outbox cannot keep %s (%s); sending it now", case.request.name, case.problem)
                png, modality = await loop.run_in_executor(self.executor, _review_images, prepared)
                await self._start(_with_image(case.request, png, modality), case.routing, case.problem)
        return [case.routing for case in cases]

    def _keep(self, request: rpb.StartHumanLoopRequest, source: Kept | None = None) -> None:
        """Into the outbox, atomically (a temporary file renamed) and durably (file and folder fsynced): the
        outbox's own write, with its size counted at most once a second (not a folder listing per case).

        ``source``: what the review images are rebuilt from (:func:`_review_source`; the compact form); None
        for a complete request. An answer that says ``queued`` is a promise: the case must survive the machine
        going down right after, not only the gateway process, so the fsyncs (1.3 ms for a 0.3 MB PNG input,
        2.5-3 ms for a 1 MiB model image here) are paid before the answer leaves; the PNG and the send after.
        """
        serialized = request.SerializeToString()
        payload = serialized if source is None else pack(dataclasses.replace(source, request=serialized))
        now = time.monotonic()
        if now - self._held_at > 1.0:  # the outbox's size, counted at most once a second plus what we added
            self._held, self._held_at = self.outbox.held_bytes(), now
        if self._held + len(payload) > self.outbox.max_bytes:
            raise OutboxFull(f"review outbox {self.outbox.directory} holds its limit of {self.outbox.max_bytes} bytes")
        if not _LOOP_NAME.match(request.name):
            raise ValueError(f"outbox name {request.name!r} is not a plain loop name")
        write_durable(self.outbox.directory / f"{request.name}{SUFFIX}", payload, temporary_prefix=".incoming-")
        self._held += len(payload)

    def _deliver_later(self, request: rpb.StartHumanLoopRequest, prepared: PreparedImage) -> None:
        self._delivering.add(request.name)
        task = asyncio.create_task(self._deliver(request, prepared), name=f"review hand-off {request.name}")
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, request: rpb.StartHumanLoopRequest, prepared: PreparedImage) -> None:
        """After the answer: the handed-off case to the review service, with its image compressed and (grey DICOM)
        its 16-bit modality image; out of the outbox once the service has it. A service that cannot be reached
        leaves it to the outbox's retries, with the outbox entry replaced by the complete request."""
        loop = asyncio.get_running_loop()
        entry = Pending(request.name, self.outbox.directory / f"{request.name}{SUFFIX}")
        try:
            png, modality = await loop.run_in_executor(self._background, _review_images, prepared)
            complete = _with_image(request, png, modality)
            try:
                await self.stub.StartHumanLoop(complete, timeout=self.timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in _RETRYABLE:
                    log.warning("review service %s: %s kept in the outbox, will be sent again", code.name, request.name)
                    if modality is not None:  # the retries send the 16-bit image too; else they send what was kept
                        with contextlib.suppress(OutboxFull, OSError, ValueError):
                            await loop.run_in_executor(self._background, self._keep, complete)
                    return
                if code is not grpc.StatusCode.ALREADY_EXISTS:
                    log.warning("review service refused human loop %s: %s", request.name, code.name)
                    await loop.run_in_executor(self.executor, self.outbox.refuse, entry)
                    return
            await loop.run_in_executor(self.executor, self.outbox.done, entry)
            REVIEW_ROUTED.labels(flow=request.flow_definition).inc()
            self._remember(request.name)
        except asyncio.CancelledError:
            raise
        except Exception:  # the case is in the outbox: the retry task sends it
            log.exception("review hand-off of %s failed; the outbox keeps it", request.name)
        finally:
            self._delivering.discard(request.name)

    def _request(
        self,
        flow: FlowDefinition,
        reasons: tuple[str, ...],
        digest: str,
        prepared: PreparedImage,
        *,
        classification: pb.ClassifyResponse | None,
        detection: pb.DetectResponse | None,
        segmentation: pb.SegmentResponse | None,
        masks: WireArray | None,
        request_id: str,
    ) -> rpb.StartHumanLoopRequest:
        """The StartHumanLoop request of one case without its review images (pure: no I/O)."""
        name = auto_loop_name(flow.name, digest)
        t = prepared.transform
        content: dict[str, Any] = {
            "inputHash": digest,
            "requestId": request_id,
            "taskObject": IMAGE_NAME,
            "humanLoopActivationReasons": list(reasons),
            "transform": {
                "originalWidth": t.original_width,
                "originalHeight": t.original_height,
                "scale": t.scale,
                "scaleX": t.scale_x,
                "scaleY": t.scale_y,
                "padLeft": t.pad_left,
                "padTop": t.pad_top,
                "modelSize": t.size,
            },
        }
        masks_packbits = b""
        if flow.task_type is TaskType.CLASSIFICATION and classification is not None:
            content["classification"] = {
                "scores": [_as_dict(s) for s in classification.scores],
                "model": _as_dict(classification.model),
            }
        if flow.task_type is TaskType.DETECTION and detection is not None:
            content["detection"] = {
                "detections": [_as_dict(d) for d in detection.detections],
                "model": _as_dict(detection.model),
            }
        if flow.task_type is TaskType.SEGMENTATION and segmentation is not None:
            content["segmentation"] = {"prompts": [_as_dict(p) for p in segmentation.prompts]}
            if masks is not None:
                content["masksShape"] = list(masks.shape)
                masks_packbits = masks.data
        return rpb.StartHumanLoopRequest(
            name=name,
            flow_definition=flow.name,
            input_content_json=json.dumps(content, sort_keys=True),
            masks_packbits=masks_packbits,
        )

    async def _start(self, request: rpb.StartHumanLoopRequest, routing: pb.ReviewRouting, problem: str) -> None:
        """Send a case the outbox could not keep while the caller waits; the entry says what became of it."""
        try:
            await self.stub.StartHumanLoop(request, timeout=self.timeout_s)
            routing.routed = True
            REVIEW_ROUTED.labels(flow=request.flow_definition).inc()
            self._remember(request.name)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.ALREADY_EXISTS:
                # This image is in review already (another request id, say): that loop covers it.
                routing.routed = True
                routing.reasons.append("already in review")
                self._remember(request.name)
            else:
                log.error("review service %s and the outbox cannot keep %s (%s)", code.name, request.name, problem)
                routing.reasons.append(f"review service: {code.name}; outbox: {problem}")


def _nice() -> None:
    """Lower this thread's CPU priority (Linux sets nice values per thread); nothing where that is not allowed."""
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


def _review_images(prepared: PreparedImage) -> tuple[bytes, ModalityImage | None]:
    """The compressed 8-bit review image and, for a grey DICOM input, the 16-bit modality image (after the answer)."""
    return _png(prepared.model_image), modality_image(prepared)


def _with_image(
    request: rpb.StartHumanLoopRequest, png: bytes, modality: ModalityImage | None = None
) -> rpb.StartHumanLoopRequest:
    copy = rpb.StartHumanLoopRequest()
    copy.CopyFrom(request)
    copy.image_png = png
    if modality is not None:
        copy.modality_png = modality.png
        content = json.loads(copy.input_content_json or "{}")
        content["modalityImage"] = modality.meta
        copy.input_content_json = json.dumps(content, sort_keys=True)
    return copy


def _review_source(image: pb.ImageInput, size: int, prepared: PreparedImage) -> Kept:
    """What the outbox keeps to rebuild the review images from: the caller's encoded file (with its kind, frame
    and window) when it is smaller than the model image's pixels, else those pixels raw. Both are bytes that
    exist already: nothing is encoded on the caller's time, and the smaller one is the cheaper fsync.
    ``size``: ``image.data``'s length (:class:`InputDigest`)."""
    pixels = prepared.model_image
    if image.WhichOneof("source") == "data" and size < pixels.nbytes:
        return Kept(b"", IMAGE_INPUT, pixels.shape, image.SerializeToString())
    return Kept(b"", IMAGE_MODEL, pixels.shape, np.ascontiguousarray(pixels, np.uint8).tobytes())


def outbox_request(payload: bytes) -> rpb.StartHumanLoopRequest:
    """The complete StartHumanLoop request an outbox entry stands for (off the caller's path: decoding and PNG).

    A compact entry's review images are rebuilt: from the kept input exactly as the gateway prepared it
    (the 16-bit image too, for a grey DICOM), or from the kept model image. A complete entry (what every
    gateway wrote before the compact form, and what a delivery that failed for now writes) is sent as it is.
    Raises for an entry that cannot be read back.
    """
    kept = unpack(payload)
    request = rpb.StartHumanLoopRequest.FromString(kept.request)
    if kept.image == IMAGE_MODEL:
        pixels = np.frombuffer(kept.data, np.uint8).reshape(kept.shape)
        return _with_image(request, _png(pixels))
    if kept.image == IMAGE_INPUT:
        prepared = _prepare_again(pb.ImageInput.FromString(kept.data))
        if prepared.model_image.shape != kept.shape:
            raise ValueError(f"rebuilt model image is {prepared.model_image.shape}, the case's was {kept.shape}")
        png, modality = _review_images(prepared)
        return _with_image(request, png, modality)
    return request


def _prepare_again(image: pb.ImageInput) -> PreparedImage:
    """``image`` decoded and letterboxed as the gateway's servicer did it when the case was handed off."""
    window = (image.window.center, image.window.width) if image.HasField("window") else None
    frame = image.frame if image.HasField("frame") else None
    return prepare(image.data, kind=input_kind(image.kind), frame=frame, window=window, limits=_REBUILD_LIMITS)


def _png(image: np.ndarray) -> bytes:
    # Huffman only: 16 ms instead of 22 for a 1024x1024 radiograph here, and 15% smaller than level 1's default.
    options = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_HUFFMAN_ONLY]
    ok, encoded = cv2.imencode(".png", image, options)
    if not ok:
        raise RuntimeError("PNG encoding of the review image failed")
    return bytes(encoded.tobytes())

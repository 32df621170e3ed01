"""Route unsure answers to human review: evaluate each flow's activation conditions, start its loop over gRPC.

The loop name is derived from (flow, input hash), so sending the same image twice never opens a
second loop. A review service that cannot be reached does not fail the inference answer and does
not lose the case: the request goes to the on-disk outbox (``services/review/outbox.py``), the
routing entry says ``queued``, and a background task sends it again until the service takes it.

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
import hashlib
import json
import logging
import os
import threading
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import cv2
import grpc
import numpy as np
from google.protobuf import json_format

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import review_pb2 as rpb
from medgate.v1 import review_pb2_grpc as rpb_grpc
from services.imaging.arrays import WireArray, encode_array
from services.imaging.prepare import PreparedImage
from services.metrics import REVIEW_OUTBOX_PENDING, REVIEW_ROUTED
from services.review.flows import FlowDefinition, TaskType, summarize
from services.review.outbox import Outbox, OutboxFull
from services.review.servicer import IMAGE_NAME
from services.review.store import auto_loop_name
from services.rpc.tls import is_loopback
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


def input_hash(image: pb.ImageInput) -> str:
    """What identifies an input for idempotent loop names and deterministic sampling: its bytes."""
    digest = hashlib.sha256()
    if image.WhichOneof("source") == "array":
        digest.update(image.array.SerializeToString(deterministic=True))
    else:
        digest.update(image.data)
    if image.HasField("frame"):
        digest.update(f"frame={image.frame}".encode())
    return digest.hexdigest()


def _as_dict(message: Any) -> dict[str, Any]:
    return json_format.MessageToDict(message)


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
    ) -> None:
        """``security`` None: a plaintext channel without a token (tests and tools on loopback)."""
        self.flows = flows
        self.target = target
        self.executor = executor
        self.timeout_s = timeout_s
        self.outbox = outbox
        self.retry_interval_s = retry_interval_s
        self.max_message_bytes = max_message_bytes
        # Built now, so a CA file that cannot be read stops start-up instead of failing the first routed case.
        self._credentials = review_channel_credentials(security, target)
        self._channel: grpc.aio.Channel | None = None
        self._retrying: asyncio.Task[None] | None = None

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
            payload = await loop.run_in_executor(self.executor, self.outbox.read, entry)
            if payload is None:
                continue  # another worker sent it
            request = rpb.StartHumanLoopRequest.FromString(payload)
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

    async def close(self) -> None:
        if self._retrying is not None:
            self._retrying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrying
            self._retrying = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

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
    ) -> list[pb.ReviewRouting]:
        """One routing entry per flow whose conditions matched (routed, or not with the reason)."""
        loop = asyncio.get_running_loop()
        digest = await loop.run_in_executor(self.executor, input_hash, image)  # up to 64 MiB of input
        matched: list[tuple[FlowDefinition, tuple[str, ...]]] = []
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
            if activation.matched:
                matched.append((flow, activation.reasons))
        if not matched:
            return []
        png = await loop.run_in_executor(self.executor, _png, prepared.model_image)
        packed = None
        if masks is not None and any(flow.task_type is TaskType.SEGMENTATION for flow, _ in matched):
            packed = await loop.run_in_executor(self.executor, lambda: encode_array(masks, packbits=True))
        routings = await asyncio.gather(
            *(
                self._start(
                    flow,
                    reasons,
                    digest,
                    png,
                    prepared,
                    classification=classification,
                    detection=detection,
                    segmentation=segmentation,
                    masks=packed,
                    request_id=request_id,
                )
                for flow, reasons in matched
            )
        )
        return list(routings)

    async def _start(
        self,
        flow: FlowDefinition,
        reasons: tuple[str, ...],
        digest: str,
        png: bytes,
        prepared: PreparedImage,
        *,
        classification: pb.ClassifyResponse | None,
        detection: pb.DetectResponse | None,
        segmentation: pb.SegmentResponse | None,
        masks: WireArray | None,
        request_id: str,
    ) -> pb.ReviewRouting:
        name = auto_loop_name(flow.name, digest)
        routing = pb.ReviewRouting(human_loop_name=name, flow_definition=flow.name, reasons=list(reasons))
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
        request = rpb.StartHumanLoopRequest(
            name=name,
            flow_definition=flow.name,
            input_content_json=json.dumps(content, sort_keys=True),
            image_png=png,
            masks_packbits=masks_packbits,
        )
        try:
            await self.stub.StartHumanLoop(request, timeout=self.timeout_s)
            routing.routed = True
            REVIEW_ROUTED.labels(flow=flow.name).inc()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code is grpc.StatusCode.ALREADY_EXISTS:
                # This image is in review already (another request id, say): that loop covers it.
                routing.routed = True
                routing.reasons.append("already in review")
            elif code in _RETRYABLE:
                await self._keep(request, routing, code)
            else:
                log.warning("review service refused human loop %s: %s", name, code.name)
                routing.reasons.append(f"review service refused it: {code.name}")
        return routing

    async def _keep(self, request: rpb.StartHumanLoopRequest, routing: pb.ReviewRouting, code: grpc.StatusCode) -> None:
        payload = request.SerializeToString()
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.outbox.put, request.name, payload)
        except (OutboxFull, OSError) as exc:
            log.error("review service %s and the outbox cannot keep %s: %s", code.name, request.name, exc)
            routing.reasons.append(f"review service: {code.name}; outbox: {type(exc).__name__}")
            return
        log.warning("review service %s: %s kept in the outbox, will be sent again", code.name, request.name)
        routing.queued = True
        routing.reasons.append(f"review service: {code.name}; queued")


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of the review image failed")
    return bytes(encoded.tobytes())

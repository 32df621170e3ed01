"""Route unsure answers to human review: evaluate each flow's activation conditions, start its loop over gRPC.

The loop name is derived from (flow, input hash), so sending the same image twice never opens a
second loop. A review service that cannot be reached does not fail the inference answer: the
routing entry says so (routed=false with the reason) and the error is logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from concurrent.futures import Executor
from typing import Any

import cv2
import grpc
import numpy as np
from google.protobuf import json_format

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import review_pb2 as rpb
from medgate.v1 import review_pb2_grpc as rpb_grpc
from services.imaging.arrays import encode_array
from services.imaging.prepare import PreparedImage
from services.metrics import REVIEW_ROUTED
from services.review.flows import FlowDefinition, TaskType, summarize
from services.review.servicer import IMAGE_NAME
from services.review.store import auto_loop_name

log = logging.getLogger("medgate.gateway.routing")


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


class ReviewRouter:
    """Starts human loops on the review service for results that a flow's conditions select."""

    def __init__(self, flows: dict[str, FlowDefinition], target: str, executor: Executor, *, timeout_s: float) -> None:
        self.flows = flows
        self.target = target
        self.executor = executor
        self.timeout_s = timeout_s
        self._channel: grpc.aio.Channel | None = None

    @property
    def stub(self) -> rpb_grpc.ReviewStub:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(
                self.target, options=[("grpc.max_send_message_length", 64 << 20)]
            )
        return rpb_grpc.ReviewStub(self._channel)

    async def close(self) -> None:
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
        digest = input_hash(image)
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
        png = await asyncio.get_running_loop().run_in_executor(self.executor, _png, prepared.model_image)
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
                    masks=masks,
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
        masks: np.ndarray | None,
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
                wire = encode_array(masks, packbits=True)
                content["masksShape"] = list(wire.shape)
                masks_packbits = wire.data
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
            log.warning("could not start human loop %s on %s: %s", name, self.target, exc.code().name)
            routing.reasons.append(f"review service: {exc.code().name}")
        return routing


def _png(image: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding of the review image failed")
    return bytes(encoded.tobytes())

"""The Inference servicer: translate protobuf to the pure pipeline and Triton calls, and back. No pixel work here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.errors import (
    BadRequest,
    RequestTooLarge,
    answer_item,
    stream_boundary,
    unary_boundary,
)
from services.gateway.routing import ReviewRouter
from services.gateway.streams import answer_concurrently
from services.imaging.arrays import decode_array, encode_array
from services.imaging.ingest import InputKind
from services.imaging.prepare import PreparedImage, prepare
from services.imaging.preprocess import Letterbox
from services.metrics import observe_stages
from services.settings import Settings
from services.triton.client import TritonModels

log = logging.getLogger("medgate.gateway")

ResponseT = TypeVar("ResponseT", pb.ClassifyResponse, pb.DetectResponse, pb.SegmentResponse)
PROMPT_SEPARATOR = "&"
STREAM_IN_FLIGHT = 4


@dataclass
class Clock:
    """Per-request stage timings in milliseconds."""

    started: float
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    triton_ms: float = 0.0
    encode_ms: float = 0.0
    models: set[str] = field(default_factory=set)  # the Triton models this request used

    def observe(self, rpc: str, prepared: PreparedImage) -> None:
        """Record this request's stages in the Prometheus histograms."""
        total = time.perf_counter() - self.started
        stages = {
            "decode": self.decode_ms / 1000.0,
            "preprocess": self.preprocess_ms / 1000.0,
            "triton": self.triton_ms / 1000.0,
            "encode": self.encode_ms / 1000.0,
            "total": total,
        }
        observe_stages(rpc, "+".join(sorted(self.models)) or "none", prepared.decoded.kind.value, stages)

    def to_proto(self) -> pb.StageTimings:
        return pb.StageTimings(
            decode_ms=self.decode_ms,
            preprocess_ms=self.preprocess_ms,
            triton_ms=self.triton_ms,
            encode_ms=self.encode_ms,
            total_ms=(time.perf_counter() - self.started) * 1000.0,
        )


@dataclass(frozen=True)
class Tasks:
    classify: bool
    detect: bool
    segment: bool


def _box_tuple(box: pb.Box) -> tuple[float, float, float, float]:
    return (box.x0, box.y0, box.x1, box.y1)


def _box_proto(values: np.ndarray) -> pb.Box:
    x0, y0, x1, y1 = (float(v) for v in values)
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def transform_proto(transform: Letterbox) -> pb.Transform:
    return pb.Transform(
        original_width=transform.original_width,
        original_height=transform.original_height,
        scale=transform.scale,
        pad_left=transform.pad_left,
        pad_top=transform.pad_top,
        resized_width=transform.resized_width,
        resized_height=transform.resized_height,
        model_size=transform.size,
    )


def image_info_proto(prepared: PreparedImage) -> pb.ImageInfo:
    decoded = prepared.decoded
    info = pb.ImageInfo(
        kind=pb.InputKind.Value(f"INPUT_KIND_{decoded.kind.name}"),  # the two enums share their names
        width=decoded.width,
        height=decoded.height,
        frames=decoded.frames,
        frame=decoded.frame,
        photometric_interpretation=decoded.photometric or "",
        transfer_syntax=decoded.transfer_syntax or "",
        modality=str(decoded.metadata.get("Modality", "") or ""),
    )
    if decoded.window_used is not None:
        info.window.CopyFrom(pb.Window(center=decoded.window_used.center, width=decoded.window_used.width))
    uids = decoded.uids or {}
    info.sop_instance_uid = uids.get("SOPInstanceUID", "")
    info.series_instance_uid = uids.get("SeriesInstanceUID", "")
    info.study_instance_uid = uids.get("StudyInstanceUID", "")
    return info


def ndarray_proto(array: np.ndarray, encoding: pb.ArrayEncoding) -> pb.NDArray:
    wire = encode_array(array, packbits=encoding == pb.ARRAY_ENCODING_PACKBITS)
    return pb.NDArray(data=wire.data, shape=list(wire.shape), dtype=wire.dtype, encoding=encoding)


def _mask_box(mask: np.ndarray, transform: Letterbox) -> pb.Box:
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return pb.Box()
    model_box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], dtype=np.float64)
    return _box_proto(transform.boxes_to_original(model_box)[0])


class InferenceServicer(pb_grpc.InferenceServicer):
    """medgate.v1.Inference on one Triton; CPU work on ``executor``, model calls through ``models``."""

    def __init__(
        self, settings: Settings, models: TritonModels, executor: Executor, router: ReviewRouter | None = None
    ) -> None:
        self.settings = settings
        self.models = models
        self.executor = executor
        self.router = router

    # --- request parsing -----------------------------------------------------------------------

    def _deadline(self, context: grpc.aio.ServicerContext) -> float:
        budget = self.settings.gateway.default_deadline_s
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, remaining)
        return time.monotonic() + budget

    def _prompts(self, text: str) -> list[str]:
        if not text.strip():
            return []
        prompts = [p.strip() for p in text.split(PROMPT_SEPARATOR)]
        limits = self.settings.gateway
        if len(prompts) > limits.max_prompts:
            raise RequestTooLarge(f"{len(prompts)} prompts exceed the limit of {limits.max_prompts}")
        for index, prompt in enumerate(prompts, start=1):
            if not prompt:
                raise BadRequest(f"prompt {index} of {len(prompts)} is empty (prompts are separated by '&')")
            if len(prompt) > limits.max_prompt_chars:
                raise RequestTooLarge(f"prompt {index} is longer than {limits.max_prompt_chars} characters")
        return prompts

    def _boxes(self, boxes: list[pb.Box], transform: Letterbox) -> np.ndarray:
        limit = self.settings.gateway.max_boxes
        if len(boxes) > limit:
            raise RequestTooLarge(f"{len(boxes)} box prompts exceed the limit of {limit}")
        width, height = transform.original_width, transform.original_height
        for index, box in enumerate(boxes, start=1):
            x0, y0, x1, y1 = _box_tuple(box)
            if not all(np.isfinite([x0, y0, x1, y1])):
                raise BadRequest(f"box {index} has a non-finite coordinate")
            if x1 <= x0 or y1 <= y0:
                raise BadRequest(f"box {index} is empty or inverted (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g})")
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise BadRequest(
                    f"box {index} (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}) is outside the {width}x{height} image"
                )
        original = np.array([_box_tuple(b) for b in boxes], dtype=np.float64).reshape(-1, 4)
        return transform.boxes_to_model(original).astype(np.float32)

    async def _prepare(self, image: pb.ImageInput, clock: Clock) -> PreparedImage:
        source = image.WhichOneof("source")
        window: tuple[float, float] | None = None
        if image.HasField("window"):
            if not image.window.width > 0:
                raise BadRequest(f"window width must be positive, got {image.window.width:g}")
            window = (image.window.center, image.window.width)
        frame = image.frame if image.HasField("frame") else None
        array: np.ndarray | None = None
        data: bytes | None = None
        if source == "array":
            try:
                array = decode_array(
                    image.array.data,
                    tuple(image.array.shape),
                    image.array.dtype,
                    packbits=image.array.encoding == pb.ARRAY_ENCODING_PACKBITS,
                )
            except ValueError as exc:
                raise BadRequest(f"image.array: {exc}") from None
        elif source == "data" and image.data:
            data = image.data
        else:
            raise BadRequest("no image: set image.data (DICOM, PNG, JPEG, NIfTI bytes) or image.array")
        kind = InputKind[pb.InputKind.Name(image.kind).removeprefix("INPUT_KIND_")]
        loop = asyncio.get_running_loop()
        prepared = await loop.run_in_executor(
            self.executor,
            lambda: prepare(data, array=array, kind=kind, frame=frame, window=window, limits=self.settings.ingest),
        )
        clock.decode_ms += prepared.decode_ms
        clock.preprocess_ms += prepared.preprocess_ms
        return prepared

    # --- the tasks -----------------------------------------------------------------------------

    async def _classify(self, prepared: PreparedImage, deadline: float, clock: Clock) -> pb.ClassifyResponse:
        started = time.perf_counter()
        probabilities = await self.models.classify(prepared.model_image, deadline=deadline)
        clock.triton_ms += (time.perf_counter() - started) * 1000.0
        info = self.models.models["classifier"]
        clock.models.add(info.name)
        labels = info.labels or [f"class_{i}" for i in range(len(probabilities))]
        order = np.argsort(-probabilities, kind="stable")
        scores = [pb.ClassScore(label=labels[i], score=float(probabilities[i])) for i in order]
        return pb.ClassifyResponse(
            scores=scores,
            top_label=scores[0].label if scores else "",
            top_score=scores[0].score if scores else 0.0,
            model=pb.ModelRef(name=info.name, version=info.version),
        )

    async def _detect(
        self, prepared: PreparedImage, deadline: float, clock: Clock, *, min_score: float, max_detections: int
    ) -> pb.DetectResponse:
        started = time.perf_counter()
        boxes, scores, labels = await self.models.detect(prepared.model_image, deadline=deadline)
        clock.triton_ms += (time.perf_counter() - started) * 1000.0
        info = self.models.models["detector"]
        clock.models.add(info.name)
        keep = scores >= min_score
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if max_detections > 0:
            boxes, scores, labels = boxes[:max_detections], scores[:max_detections], labels[:max_detections]
        original = prepared.transform.boxes_to_original(boxes) if len(boxes) else np.zeros((0, 4))
        names = info.labels
        detections = [
            pb.Detection(
                box=_box_proto(original[i]),
                model_box=_box_proto(boxes[i]),
                label=names[int(labels[i])] if 0 <= int(labels[i]) < len(names) else f"class_{int(labels[i])}",
                score=float(scores[i]),
            )
            for i in range(len(scores))
        ]
        return pb.DetectResponse(detections=detections, model=pb.ModelRef(name=info.name, version=info.version))

    async def _segment(
        self,
        prepared: PreparedImage,
        deadline: float,
        clock: Clock,
        *,
        prompts: list[str],
        boxes: np.ndarray,
        original_boxes: list[pb.Box],
        output: pb.OutputOptions,
    ) -> tuple[pb.SegmentResponse, np.ndarray]:
        """The response and the model-space masks [N, 1024, 1024] (kept for review routing)."""
        if not prompts and len(boxes) == 0:
            raise BadRequest("segmentation needs at least one text prompt or box prompt")
        started = time.perf_counter()
        text_call = (
            self.models.segment_text(prepared.model_image, prompts, deadline=deadline) if prompts else None
        )
        box_call = self.models.segment_boxes(prepared.model_image, boxes, deadline=deadline) if len(boxes) else None
        async with asyncio.TaskGroup() as group:
            text_task = group.create_task(text_call) if text_call else None
            box_task = group.create_task(box_call) if box_call else None
        clock.triton_ms += (time.perf_counter() - started) * 1000.0

        encode_started = time.perf_counter()
        masks: list[np.ndarray] = []
        prompt_results: list[pb.PromptResult] = []
        models: list[pb.ModelRef] = []
        transform = prepared.transform
        if text_task is not None:
            text_masks, text_scores, categories = text_task.result()
            info = self.models.models["segmenter_text"]
            clock.models.add(info.name)
            models.append(pb.ModelRef(name=info.name, version=info.version))
            for i, prompt in enumerate(prompts):
                masks.append(text_masks[i])
                prompt_results.append(
                    pb.PromptResult(
                        prompt=prompt,
                        category=categories[i],
                        score=float(text_scores[i]),
                        area_pixels=int(np.count_nonzero(text_masks[i])),
                        mask_box=_mask_box(text_masks[i], transform),
                        model=info.name,
                    )
                )
        if box_task is not None:
            box_masks, box_scores = box_task.result()
            info = self.models.models["segmenter_box"]
            clock.models.add(info.name)
            models.append(pb.ModelRef(name=info.name, version=info.version))
            for i in range(len(boxes)):
                masks.append(box_masks[i])
                prompt_results.append(
                    pb.PromptResult(
                        prompt="box",
                        category="other",
                        score=float(box_scores[i]),
                        box=original_boxes[i],
                        area_pixels=int(np.count_nonzero(box_masks[i])),
                        mask_box=_mask_box(box_masks[i], transform),
                        model=info.name,
                    )
                )
        stacked = np.stack(masks).astype(np.uint8, copy=False)
        response = pb.SegmentResponse(
            text_features=[p.category for p in prompt_results], prompts=prompt_results, models=models
        )
        if output.mask_space in (pb.MASK_SPACE_MODEL, pb.MASK_SPACE_BOTH):
            response.image_features.CopyFrom(ndarray_proto(stacked, output.mask_encoding))
        if output.mask_space in (pb.MASK_SPACE_ORIGINAL, pb.MASK_SPACE_BOTH):
            response.original_masks.CopyFrom(ndarray_proto(transform.mask_to_original(stacked), output.mask_encoding))
        clock.encode_ms += (time.perf_counter() - encode_started) * 1000.0
        return response, stacked

    async def _analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> pb.AnalyzeResponse:
        clock = Clock(started=time.perf_counter())
        deadline = self._deadline(context)
        prompts = self._prompts(request.prompts)
        requested = set(request.tasks) - {pb.TASK_UNSPECIFIED}
        wants_segment = bool(prompts or request.boxes)
        tasks = (
            Tasks(
                classify=pb.TASK_CLASSIFY in requested,
                detect=pb.TASK_DETECT in requested,
                segment=pb.TASK_SEGMENT in requested,
            )
            if requested
            else Tasks(classify=True, detect=True, segment=wants_segment)
        )
        prepared = await self._prepare(request.image, clock)
        boxes = self._boxes(list(request.boxes), prepared.transform)
        calls: dict[str, asyncio.Future[object] | asyncio.Task[object]] = {}
        async with asyncio.TaskGroup() as group:
            if tasks.classify:
                calls["classification"] = group.create_task(self._classify(prepared, deadline, clock))
            if tasks.detect:
                calls["detection"] = group.create_task(
                    self._detect(
                        prepared,
                        deadline,
                        clock,
                        min_score=request.min_score,
                        max_detections=request.max_detections,
                    )
                )
            if tasks.segment:
                calls["segmentation"] = group.create_task(
                    self._segment(
                        prepared,
                        deadline,
                        clock,
                        prompts=prompts,
                        boxes=boxes,
                        original_boxes=list(request.boxes),
                        output=request.output,
                    )
                )
        response = pb.AnalyzeResponse(
            transform=transform_proto(prepared.transform),
            image=image_info_proto(prepared),
            request_id=request.request_id,
        )
        masks: np.ndarray | None = None
        for field_name, call in calls.items():
            result = call.result()
            if field_name == "segmentation":
                result, masks = result  # type: ignore[misc]
            getattr(response, field_name).CopyFrom(result)
        if self.router is not None:
            response.review.extend(
                await self.router.route(
                    image=request.image,
                    prepared=prepared,
                    classification=response.classification if tasks.classify else None,
                    detection=response.detection if tasks.detect else None,
                    segmentation=response.segmentation if tasks.segment else None,
                    masks=masks,
                    request_id=request.request_id,
                )
            )
        response.timings.CopyFrom(clock.to_proto())
        clock.observe("Analyze", prepared)
        return response

    # --- RPCs ----------------------------------------------------------------------------------

    @staticmethod
    def _finish(response: ResponseT, prepared: PreparedImage, clock: Clock, rpc: str) -> ResponseT:
        """What every single-task answer carries: the transform, what was read, and the stage timings."""
        response.transform.CopyFrom(transform_proto(prepared.transform))
        response.image.CopyFrom(image_info_proto(prepared))
        response.timings.CopyFrom(clock.to_proto())
        clock.observe(rpc, prepared)
        return response

    @unary_boundary
    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        clock = Clock(started=time.perf_counter())
        deadline = self._deadline(context)
        prepared = await self._prepare(request.image, clock)
        response = await self._classify(prepared, deadline, clock)
        if self.router is not None:
            response.review.extend(
                await self.router.route(image=request.image, prepared=prepared, classification=response)
            )
        return self._finish(response, prepared, clock, "Classify")

    @unary_boundary
    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        clock = Clock(started=time.perf_counter())
        deadline = self._deadline(context)
        prepared = await self._prepare(request.image, clock)
        response = await self._detect(
            prepared, deadline, clock, min_score=request.min_score, max_detections=request.max_detections
        )
        if self.router is not None:
            response.review.extend(await self.router.route(image=request.image, prepared=prepared, detection=response))
        return self._finish(response, prepared, clock, "Detect")

    @unary_boundary
    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        clock = Clock(started=time.perf_counter())
        deadline = self._deadline(context)
        prompts = self._prompts(request.prompts)
        if not prompts and not request.boxes:
            raise BadRequest("segmentation needs at least one text prompt or box prompt")
        prepared = await self._prepare(request.image, clock)
        boxes = self._boxes(list(request.boxes), prepared.transform)
        response, masks = await self._segment(
            prepared,
            deadline,
            clock,
            prompts=prompts,
            boxes=boxes,
            original_boxes=list(request.boxes),
            output=request.output,
        )
        if self.router is not None:
            response.review.extend(
                await self.router.route(image=request.image, prepared=prepared, segmentation=response, masks=masks)
            )
        return self._finish(response, prepared, clock, "Segment")

    @unary_boundary
    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> pb.AnalyzeResponse:
        return await self._analyze(request, context)

    @stream_boundary
    async def AnalyzeStream(
        self, request_iterator: AsyncIterator[pb.AnalyzeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnalyzeStreamResponse]:
        """Up to STREAM_IN_FLIGHT items at once; answers as they finish; a failed item does not end the stream."""

        async def one(item: pb.AnalyzeRequest) -> pb.AnalyzeStreamResponse:
            answer = pb.AnalyzeStreamResponse(request_id=item.request_id)
            return await answer_item(answer, self._analyze(item, context), "AnalyzeStream")

        async for answer in answer_concurrently(request_iterator, one, in_flight=STREAM_IN_FLIGHT):
            yield answer

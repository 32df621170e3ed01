"""The Inference servicer: translate protobuf to the pure pipeline and Triton calls, and back.

Cross-cutting work (request ids, access log, status codes, deadlines, field validation) is done by
the interceptors in :mod:`services.rpc`; pixel work runs on ``executor``. What is left here is what
only this service knows: which limits a request must fit, and how the answers are put together.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.dicom.results import build_dicom_results
from services.gateway.clock import Clock
from services.gateway.convert import (
    ai_results,
    box_proto,
    box_tuple,
    dicom_object_proto,
    image_info_proto,
    input_kind,
    ndarray_proto,
    prompt_result,
    request_array,
    transform_proto,
)
from services.gateway.cost import BoxWindows, CostPrices, RequestCost, check_budget, estimate
from services.gateway.routing import ReviewRouter
from services.gateway.shadow import Shadow
from services.imaging.ingest import InputKind
from services.imaging.ingest.reference import ReferencePolicy, fetch_wadors, read_file
from services.imaging.masks import EncodedMasks, encode_masks
from services.imaging.prepare import PreparedImage, prepare
from services.imaging.preprocess import Letterbox
from services.rpc.call import request_deadline
from services.rpc.errors import BadRequest, RequestTooLarge
from services.rpc.streams import answer_each
from services.settings import Settings
from services.triton.client import TritonModels

ResponseT = TypeVar("ResponseT", pb.ClassifyResponse, pb.DetectResponse, pb.SegmentResponse)
ClassifyOrMore = pb.ClassifyRequest | pb.DetectRequest | pb.SegmentRequest | pb.AnalyzeRequest
PROMPT_SEPARATOR = "&"
# Triton priority levels of the box model (its config.pbtxt): a request priced over light_request_cost_ms is
# queued behind the light ones. A model without priority levels takes every request at its default level.
LIGHT_PRIORITY, HEAVY_PRIORITY = 1, 2
# The caller's bearer token, passed on to a DICOMweb server named by ImageInput.reference (set per call; the tasks
# an AnalyzeStream starts inherit it).
_CALLER_TOKEN: contextvars.ContextVar[str] = contextvars.ContextVar("medgate_caller_token", default="")
_BEARER = "bearer "
_NO_PARAMETERS: Mapping[str, str] = {}


def _bind_caller(context: grpc.aio.ServicerContext) -> None:
    """Remember the caller's bearer token for this call's by-reference fetches."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str) and value[: len(_BEARER)].lower() == _BEARER:
            _CALLER_TOKEN.set(value[len(_BEARER) :].strip())
            return


@dataclass(frozen=True)
class Tasks:
    classify: bool
    detect: bool
    segment: bool


def _detection_limits(min_score: float, max_detections: int) -> None:
    if not 0.0 <= min_score <= 1.0:
        raise BadRequest(f"min_score must be between 0 and 1, got {min_score:g}")
    if max_detections < 0:
        raise BadRequest(f"max_detections must be 0 (no limit) or more, got {max_detections}")


class InferenceServicer(pb_grpc.InferenceServicer):
    """medgate.v1.Inference on one Triton; CPU work on ``executor``, model calls through ``models``."""

    def __init__(
        self, settings: Settings, models: TritonModels, executor: Executor, router: ReviewRouter | None = None
    ) -> None:
        self.settings = settings
        self.models = models
        self.executor = executor
        self.router = router
        # A share of classify/detect answers is also computed by the role's candidate version (versions.shadow_*).
        self.shadow = Shadow(models, settings.versions)
        limits = settings.gateway
        self.prices = CostPrices(
            encoder_pass_ms=limits.cost_encoder_pass_ms,
            image_pass_ms=limits.cost_image_pass_ms,
            megapixel_ms=limits.cost_megapixel_ms,
            max_request_cost_ms=limits.max_request_cost_ms,
        )
        self._windows: tuple[Mapping[str, str], BoxWindows] | None = None
        self.references = ReferencePolicy.from_settings(
            limits.reference_roots,
            limits.reference_base_urls,
            max_bytes=settings.ingest.max_input_bytes,
            timeout_s=limits.reference_timeout_s,
        )

    # --- request parsing -----------------------------------------------------------------------

    def _deadline(self) -> float:
        return request_deadline(self.settings.gateway.default_deadline_s)

    def _prompts(self, text: str) -> list[str]:
        """The ``&``-separated prompts; errors name a prompt by its position, never by its text."""
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
            x0, y0, x1, y1 = box_tuple(box)
            if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
                raise BadRequest(f"box {index} has a non-finite coordinate")
            if x1 <= x0 or y1 <= y0:
                raise BadRequest(f"box {index} is empty or inverted (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g})")
            if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
                raise BadRequest(
                    f"box {index} (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}) is outside the {width}x{height} image"
                )
        original = np.array([box_tuple(b) for b in boxes], dtype=np.float64).reshape(-1, 4)
        return transform.boxes_to_model(original).astype(np.float32)

    def _cost(
        self, prepared: PreparedImage, *, image_passes: int, prompts: int = 0, boxes: np.ndarray | None = None
    ) -> RequestCost:
        """The request's estimated cost, refused (CostTooHigh: RESOURCE_EXHAUSTED) over the budget; before any model."""
        info = prepared.decoded.info
        cost = estimate(
            self.prices,
            pixels=info.rows * info.columns * max(1, info.frames),
            image_passes=image_passes,
            prompts=prompts,
            boxes=boxes,
            windows=self._box_windows(),
        )
        check_budget(cost, self.prices)
        return cost

    def _box_windows(self) -> BoxWindows:
        """The box model's window parameters, parsed once per model configuration (not once per request)."""
        box_model = self.models.models.get("segmenter_box")
        parameters = box_model.parameters if box_model is not None else _NO_PARAMETERS
        cached = self._windows
        if cached is None or cached[0] is not parameters:
            cached = self._windows = (parameters, BoxWindows.from_parameters(parameters))
        return cached[1]

    def _priority(self, cost: RequestCost) -> int:
        return HEAVY_PRIORITY if cost.ms > self.settings.gateway.light_request_cost_ms else LIGHT_PRIORITY

    async def _prepare(self, image: pb.ImageInput, clock: Clock) -> PreparedImage:
        source = image.WhichOneof("source")
        window: tuple[float, float] | None = None
        if image.HasField("window"):
            if not image.window.width > 0:
                raise BadRequest(f"image.window.width must be positive, got {image.window.width:g}")
            window = (image.window.center, image.window.width)
        frame = image.frame if image.HasField("frame") else None
        array: np.ndarray | None = None
        data: bytes | None = None
        if source == "array":
            array = request_array(image.array)
        elif source == "data":
            data = image.data  # upb copies a bytes field on every read (0.7 ms for 7 MB here): read it once
            if not data:
                raise BadRequest("no image: image.data is empty")
        elif source == "reference":
            data = await self._dereference(image)
        else:
            raise BadRequest("no image: set image.data (DICOM, PNG, JPEG, NIfTI bytes), image.array or image.reference")
        kind = input_kind(image.kind)
        limits = self.settings.ingest
        prepared = await asyncio.get_running_loop().run_in_executor(
            self.executor,
            lambda: prepare(data, array=array, kind=kind, frame=frame, window=window, limits=limits),
        )
        # The request's checks, the wait for a CPU thread and the decoding itself are the decode lap.
        clock.decode_ms += max(0.0, clock.lap() - prepared.preprocess_ms)
        clock.preprocess_ms += prepared.preprocess_ms
        return prepared

    async def _dereference(self, image: pb.ImageInput) -> bytes:
        """The bytes ``image.reference`` names, read off the event loop; they then stand in ``image.data``, so the
        DICOM results, the review hand-off and its digest see the image as if it had been sent."""
        reference = image.reference
        target = reference.WhichOneof("target")
        if target == "file_path":
            data = await asyncio.to_thread(read_file, reference.file_path, self.references)
        elif target == "wadors_url":
            token, deadline = _CALLER_TOKEN.get(), self._deadline()
            data = await asyncio.to_thread(
                fetch_wadors, reference.wadors_url, self.references, token=token, deadline=deadline
            )
        else:
            raise BadRequest("image.reference names nothing: set file_path or wadors_url")
        image.data = data
        return data

    @staticmethod
    def _check_dicom_results(request: ClassifyOrMore, prepared: PreparedImage) -> bool:
        """Whether the caller asked for DICOM results; only a DICOM input can have them (checked before Triton)."""
        if not request.output.dicom_results:
            return False
        kind = prepared.decoded.kind
        if kind is not InputKind.DICOM:
            raise BadRequest(f"output.dicom_results needs a DICOM input; this input is {kind.name}")
        return True

    async def _dicom_results(
        self,
        image: pb.ImageInput,
        prepared: PreparedImage,
        clock: Clock,
        *,
        classification: pb.ClassifyResponse | None = None,
        detection: pb.DetectResponse | None = None,
        segmentation: pb.SegmentResponse | None = None,
        masks: np.ndarray | None = None,
    ) -> list[pb.DicomObject]:
        """SEG and SR of the answer, built on the executor from the request's own bytes (the source header)."""
        transform, frame, limits = prepared.transform, prepared.decoded.info.frame, self.settings.ingest

        def build() -> list[pb.DicomObject]:
            original = transform.mask_to_original(masks) if masks is not None and segmentation is not None else None
            results = ai_results(
                classification=classification, detection=detection, segmentation=segmentation, masks=original
            )
            objects = build_dicom_results(image.data, frame=frame, results=results, limits=limits)
            return [dicom_object_proto(o) for o in objects]

        built = await asyncio.get_running_loop().run_in_executor(self.executor, build)
        clock.dicom_ms += clock.lap()
        return built

    async def _route(self, clock: Clock, **answer: Any) -> list[pb.ReviewRouting]:
        """The answer's review entries (the router hands unsure ones off and answers at once), timed as ``route``."""
        assert self.router is not None
        try:
            return await self.router.route(**answer)
        finally:
            clock.route_ms += clock.lap()

    # --- the tasks -----------------------------------------------------------------------------

    async def _classify(self, prepared: PreparedImage, deadline: float, clock: Clock) -> pb.ClassifyResponse:
        info = self.models.served("classifier")  # the version this answer names is the one asked
        probabilities = await self.models.classify(prepared.model_image, deadline=deadline, version=info.version)
        self.shadow.offer_classification(prepared.model_image, info.name, info.version, probabilities)
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
        info = self.models.served("detector")
        boxes, scores, labels = await self.models.detect(prepared.model_image, deadline=deadline, version=info.version)
        self.shadow.offer_detection(prepared.model_image, info.name, info.version, boxes, scores)
        clock.models.add(info.name)
        keep = scores >= min_score
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if max_detections > 0:
            boxes, scores, labels = boxes[:max_detections], scores[:max_detections], labels[:max_detections]
        original = prepared.transform.boxes_to_original(boxes) if len(boxes) else np.zeros((0, 4))
        names = info.labels
        detections = [
            pb.Detection(
                box=box_proto(original[i]),
                model_box=box_proto(boxes[i]),
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
        request: pb.SegmentRequest | pb.AnalyzeRequest,
        *,
        prompts: list[str],
        boxes: np.ndarray,
        priority: int = LIGHT_PRIORITY,
    ) -> tuple[pb.SegmentResponse, np.ndarray]:
        """The response and the model-space masks [N, 1024, 1024] (kept for review routing).

        ``prompts`` and ``boxes`` (in model space) are the request's, already checked against the limits.
        """
        output = request.output
        if not prompts and len(boxes) == 0:
            raise BadRequest("segmentation needs at least one text prompt or box prompt")
        text_call = self.models.segment_text(prepared.model_image, prompts, deadline=deadline) if prompts else None
        box_call = (
            self.models.segment_boxes(prepared.model_image, boxes, deadline=deadline, priority=priority)
            if len(boxes)
            else None
        )
        async with asyncio.TaskGroup() as group:
            text_task = group.create_task(text_call) if text_call else None
            box_task = group.create_task(box_call) if box_call else None

        encode_started = time.perf_counter()
        masks: list[np.ndarray] = []
        categories: list[str] = []
        scores: list[float] = []
        models: list[pb.ModelRef] = []
        if text_task is not None:
            text_masks, text_scores, text_categories = text_task.result()
            masks.extend(text_masks[: len(prompts)])
            categories.extend(text_categories[: len(prompts)])
            scores.extend(float(s) for s in text_scores[: len(prompts)])
            text_info = self.models.served("segmenter_text")
            clock.models.add(text_info.name)
            models.append(pb.ModelRef(name=text_info.name, version=text_info.version))
        if box_task is not None:
            box_masks, box_scores = box_task.result()
            masks.extend(box_masks[: len(boxes)])
            categories.extend("other" for _ in range(len(boxes)))
            scores.extend(float(s) for s in box_scores[: len(boxes)])
            box_info = self.models.served("segmenter_box")
            clock.models.add(box_info.name)
            models.append(pb.ModelRef(name=box_info.name, version=box_info.version))
        space = output.mask_space
        encoded: EncodedMasks = await asyncio.get_running_loop().run_in_executor(
            self.executor,
            lambda: encode_masks(
                masks,
                prepared.transform,
                model_space=space in (pb.MASK_SPACE_MODEL, pb.MASK_SPACE_BOTH),
                original_space=space in (pb.MASK_SPACE_ORIGINAL, pb.MASK_SPACE_BOTH),
                packbits=output.mask_encoding == pb.ARRAY_ENCODING_PACKBITS,
            ),
        )
        results = [
            prompt_result(
                prompt=prompts[i],
                category=categories[i],
                score=scores[i],
                summary=encoded.summaries[i],
                model=models[0].name,
            )
            for i in range(len(prompts))
        ] + [
            prompt_result(
                prompt="box",
                category="other",
                score=scores[len(prompts) + j],
                summary=encoded.summaries[len(prompts) + j],
                model=models[-1].name,
                box=request.boxes[j],
            )
            for j in range(len(boxes))
        ]
        response = pb.SegmentResponse(text_features=[p.category for p in results], prompts=results, models=models)
        if encoded.model_space is not None:
            response.image_features.CopyFrom(ndarray_proto(encoded.model_space))
        if encoded.original_space is not None:
            response.original_masks.CopyFrom(ndarray_proto(encoded.original_space))
        clock.encode_ms += (time.perf_counter() - encode_started) * 1000.0
        return response, encoded.stacked

    def _tasks(self, request: pb.AnalyzeRequest, wants_segment: bool) -> Tasks:
        requested = set(request.tasks) - {pb.TASK_UNSPECIFIED}
        if not requested:
            return Tasks(classify=True, detect=True, segment=wants_segment)
        return Tasks(
            classify=pb.TASK_CLASSIFY in requested,
            detect=pb.TASK_DETECT in requested,
            segment=pb.TASK_SEGMENT in requested,
        )

    async def _analyze(self, request: pb.AnalyzeRequest) -> pb.AnalyzeResponse:
        clock = Clock(started=time.perf_counter())
        deadline = self._deadline()
        prompts = self._prompts(request.prompts)
        tasks = self._tasks(request, wants_segment=bool(prompts or request.boxes))
        if tasks.detect:
            _detection_limits(request.min_score, request.max_detections)
        prepared = await self._prepare(request.image, clock)
        digest = self.router.digest(request.image) if self.router is not None else None
        wants_dicom = self._check_dicom_results(request, prepared)
        boxes = self._boxes(list(request.boxes), prepared.transform)
        cost = self._cost(
            prepared,
            image_passes=int(tasks.classify) + int(tasks.detect) + int(tasks.segment and bool(prompts)),
            prompts=len(prompts) if tasks.segment else 0,
            boxes=boxes if tasks.segment else None,
        )
        encoded_ms = clock.encode_ms
        async with asyncio.TaskGroup() as group:
            classify = group.create_task(self._classify(prepared, deadline, clock)) if tasks.classify else None
            detect = (
                group.create_task(
                    self._detect(
                        prepared, deadline, clock, min_score=request.min_score, max_detections=request.max_detections
                    )
                )
                if tasks.detect
                else None
            )
            segment = (
                group.create_task(
                    self._segment(
                        prepared, deadline, clock, request, prompts=prompts, boxes=boxes, priority=self._priority(cost)
                    )
                )
                if tasks.segment
                else None
            )
        response = pb.AnalyzeResponse(
            transform=transform_proto(prepared.transform),
            image=image_info_proto(prepared),
            request_id=request.request_id,
        )
        masks: np.ndarray | None = None
        if classify is not None:
            response.classification.CopyFrom(classify.result())
        if detect is not None:
            response.detection.CopyFrom(detect.result())
        if segment is not None:
            segmentation, masks = segment.result()
            response.segmentation.CopyFrom(segmentation)
        clock.models_lap(encoded_ms)
        if wants_dicom:
            response.dicom_results.extend(
                await self._dicom_results(
                    request.image,
                    prepared,
                    clock,
                    classification=response.classification if classify else None,
                    detection=response.detection if detect else None,
                    segmentation=response.segmentation if segment else None,
                    masks=masks,
                )
            )
        if self.router is not None:
            response.review.extend(
                await self._route(
                    clock,
                    image=request.image,
                    prepared=prepared,
                    classification=response.classification if classify else None,
                    detection=response.detection if detect else None,
                    segmentation=response.segmentation if segment else None,
                    masks=masks,
                    request_id=request.request_id,
                    digest=digest,
                    dicom_results=response.dicom_results,
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

    async def _single_task(
        self,
        rpc: str,
        request: pb.ClassifyRequest | pb.DetectRequest | pb.SegmentRequest,
        context: grpc.aio.ServicerContext,
        field: str,
        run: Callable[[PreparedImage, float, Clock], Awaitable[tuple[ResponseT, np.ndarray | None]]],
    ) -> ResponseT:
        """The one pipeline of Classify, Detect and Segment: decode, checks, ``run`` (its own checks, cost and model
        call), DICOM results, review routing, the common fields. ``field`` names the answer for those two
        (``classification``, ``detection`` or ``segmentation``); ``run`` returns the answer and any masks."""
        _bind_caller(context)
        clock = Clock(started=time.perf_counter())
        deadline = self._deadline()
        prepared = await self._prepare(request.image, clock)
        digest = self.router.digest(request.image) if self.router is not None else None
        wants_dicom = self._check_dicom_results(request, prepared)
        encoded_ms = clock.encode_ms
        response, masks = await run(prepared, deadline, clock)
        clock.models_lap(encoded_ms)
        answer: dict[str, Any] = {field: response}
        if wants_dicom:
            response.dicom_results.extend(
                await self._dicom_results(request.image, prepared, clock, masks=masks, **answer)
            )
        if self.router is not None:
            response.review.extend(
                await self._route(
                    clock,
                    image=request.image,
                    prepared=prepared,
                    masks=masks,
                    digest=digest,
                    dicom_results=response.dicom_results,
                    **answer,
                )
            )
        return self._finish(response, prepared, clock, rpc)

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        async def run(prepared: PreparedImage, deadline: float, clock: Clock) -> tuple[pb.ClassifyResponse, None]:
            self._cost(prepared, image_passes=1)
            return await self._classify(prepared, deadline, clock), None

        return await self._single_task("Classify", request, context, "classification", run)

    async def Detect(self, request: pb.DetectRequest, context: grpc.aio.ServicerContext) -> pb.DetectResponse:
        _detection_limits(request.min_score, request.max_detections)

        async def run(prepared: PreparedImage, deadline: float, clock: Clock) -> tuple[pb.DetectResponse, None]:
            self._cost(prepared, image_passes=1)
            response = await self._detect(
                prepared, deadline, clock, min_score=request.min_score, max_detections=request.max_detections
            )
            return response, None

        return await self._single_task("Detect", request, context, "detection", run)

    async def Segment(self, request: pb.SegmentRequest, context: grpc.aio.ServicerContext) -> pb.SegmentResponse:
        prompts = self._prompts(request.prompts)
        if not prompts and not request.boxes:
            raise BadRequest("segmentation needs at least one text prompt or box prompt")

        async def run(prepared: PreparedImage, deadline: float, clock: Clock) -> tuple[pb.SegmentResponse, np.ndarray]:
            boxes = self._boxes(list(request.boxes), prepared.transform)
            cost = self._cost(prepared, image_passes=int(bool(prompts)), prompts=len(prompts), boxes=boxes)
            return await self._segment(
                prepared, deadline, clock, request, prompts=prompts, boxes=boxes, priority=self._priority(cost)
            )

        return await self._single_task("Segment", request, context, "segmentation", run)

    async def Analyze(self, request: pb.AnalyzeRequest, context: grpc.aio.ServicerContext) -> pb.AnalyzeResponse:
        _bind_caller(context)
        return await self._analyze(request)

    async def AnalyzeStream(
        self, request_iterator: AsyncIterator[pb.AnalyzeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AnalyzeStreamResponse]:
        """Up to ``gateway.stream_in_flight`` items at once; answers as they finish; a bad item ends nothing."""
        _bind_caller(context)
        answers = answer_each(
            request_iterator,
            pb.AnalyzeStreamResponse,
            self._analyze,
            rpc="AnalyzeStream",
            in_flight=self.settings.gateway.stream_in_flight,
        )
        async for answer in answers:
            yield answer

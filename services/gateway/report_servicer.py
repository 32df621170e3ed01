"""The Report servicer: findings text in, impression, score and evidence out; translation only.

Validation and limits live in :mod:`services.report.limits` (no gRPC there); the model call in
:mod:`services.triton.impression`; every failure becomes a status in the RPC layer (:mod:`services.rpc`).
Findings text is patient data: nothing here logs it or puts it into an error message.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import grpc

from medgate.v1 import inference_pb2 as inference_pb
from medgate.v1 import report_pb2 as pb
from medgate.v1 import report_pb2_grpc as pb_grpc
from services.gateway.convert import impression_proto
from services.report.limits import check_findings, evidence_count
from services.rpc.call import request_deadline
from services.rpc.streams import answer_each
from services.settings import Settings
from services.triton.impression import ImpressionModel


class ReportServicer(pb_grpc.ReportServicer):
    """medgate.v1.Report on one Triton model (``settings.report.model``)."""

    def __init__(self, settings: Settings, model: ImpressionModel) -> None:
        self.settings = settings
        self.model = model

    async def _impression(self, request: pb.ImpressionRequest) -> pb.ImpressionResponse:
        started = time.perf_counter()
        limits = self.settings.report
        findings = check_findings(request.findings, limits)
        evidence = evidence_count(request.max_evidence, limits)
        validated = time.perf_counter()
        (answer,) = await self.model.predict(
            [findings], deadline=request_deadline(self.settings.gateway.default_deadline_s)
        )
        answered = time.perf_counter()
        response = impression_proto(answer, evidence)
        response.request_id = request.request_id
        if self.model.info is not None:
            response.model.CopyFrom(inference_pb.ModelRef(name=self.model.info.name, version=self.model.info.version))
        response.timings.CopyFrom(
            pb.ReportTimings(
                validate_ms=(validated - started) * 1000.0,
                triton_ms=(answered - validated) * 1000.0,
                total_ms=(time.perf_counter() - started) * 1000.0,
            )
        )
        return response

    async def Impression(
        self, request: pb.ImpressionRequest, context: grpc.aio.ServicerContext
    ) -> pb.ImpressionResponse:
        return await self._impression(request)

    async def ImpressionStream(
        self, request_iterator: AsyncIterator[pb.ImpressionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ImpressionStreamResponse]:
        """Up to ``report.stream_in_flight`` items at once; answers as they finish; a failed item ends nothing."""
        answers = answer_each(
            request_iterator,
            pb.ImpressionStreamResponse,
            self._impression,
            rpc="ImpressionStream",
            in_flight=self.settings.report.stream_in_flight,
        )
        async for answer in answers:
            yield answer

"""The node as a client of the gateway: one Analyze call per routed instance, with ``output.dicom_results`` set.

The channel is built as every medgate client builds it (:mod:`clients.connect`): TLS trusting
``security.credentials_dir/ca.pem`` and the ``inference`` role's bearer token when ``security.tls``
is on, plaintext (and the token to loopback only) when it is off.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from clients import connect
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.dicom.node.routes import Route
from services.security.identity import Role
from services.settings import Settings

_TASKS = {"classify": pb.TASK_CLASSIFY, "detect": pb.TASK_DETECT, "segment": pb.TASK_SEGMENT}
# Worth another try later: the gateway or Triton is down or busy, or our token needs fixing by an operator
# (as the review outbox keeps a case refused for the gateway's own token). Anything else is about the
# instance itself, and trying again cannot change the answer.
TRANSIENT_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
    }
)


class AnalyzeFailed(Exception):
    """The gateway did not answer with results; ``transient`` says whether trying again may help."""

    def __init__(self, code: str, *, transient: bool, details: str = "") -> None:
        super().__init__(code)
        self.code = code
        self.transient = transient
        self.details = details  # the gateway's message: it names the problem, never a header value or prompt


def route_request(route: Route) -> dict[str, Any]:
    """What a route asks for, as kept in the ledger with each instance (the rules may change meanwhile)."""
    request: dict[str, Any] = {"tasks": list(route.tasks), "prompts": route.prompts}
    if route.min_score:
        request["min_score"] = route.min_score
    if route.max_detections:
        request["max_detections"] = route.max_detections
    if route.frame is not None:
        request["frame"] = route.frame
    return request


def analyze_request(data: bytes, request: Mapping[str, Any], *, request_id: str = "") -> pb.AnalyzeRequest:
    image = pb.ImageInput(data=data, kind=pb.INPUT_KIND_DICOM)
    if request.get("frame") is not None:
        image.frame = int(request["frame"])
    return pb.AnalyzeRequest(
        image=image,
        tasks=[_TASKS[task] for task in request.get("tasks", [])],
        prompts=str(request.get("prompts", "")),
        min_score=float(request.get("min_score", 0.0)),
        max_detections=int(request.get("max_detections", 0)),
        # The masks travel inside the SEG; the answer's own copy is only the model-space one, bit-packed.
        output=pb.OutputOptions(dicom_results=True, mask_encoding=pb.ARRAY_ENCODING_PACKBITS),
        request_id=request_id,
    )


def gateway_target(settings: Settings) -> str:
    if settings.dicom.gateway_url:
        return settings.dicom.gateway_url
    host = settings.gateway.host
    if host in {"", "0.0.0.0", "::", "[::]"}:
        host = "127.0.0.1"  # a wildcard listener is reached on loopback from beside it
    return f"{host}:{settings.gateway.port}"


@dataclass
class GatewayClient:
    """A blocking channel to the gateway (the node's worker threads call it)."""

    target: str
    security: connect.ClientSecurity
    timeout_s: float
    max_message_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> GatewayClient:
        security = settings.security
        token_file = Path(settings.dicom.token_file) if settings.dicom.token_file else None
        client = connect.resolve(
            Role.INFERENCE,
            credentials_dir=Path(security.credentials_dir),
            token_file=token_file,
            insecure=not security.tls,
        )
        return cls(
            gateway_target(settings),
            client,
            settings.dicom.analyze_timeout_s,
            max(settings.gateway.max_receive_message_bytes, settings.gateway.max_send_message_bytes),
        )

    def __post_init__(self) -> None:
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        self._channel = connect.channel(self.target, self.security, options)
        self._stub = pb_grpc.InferenceStub(self._channel)

    def analyze(self, data: bytes, request: Mapping[str, Any], *, request_id: str = "") -> pb.AnalyzeResponse:
        """The answer, or :class:`AnalyzeFailed` with the status code's name and the gateway's message."""
        try:
            answer: pb.AnalyzeResponse = self._stub.Analyze(
                analyze_request(data, request, request_id=request_id), timeout=self.timeout_s
            )
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = (exc.details() or "") if hasattr(exc, "details") else ""
            raise AnalyzeFailed(code.name, transient=code in TRANSIENT_CODES, details=details[:300]) from None
        if not answer.dicom_results:
            raise AnalyzeFailed("NO_DICOM_RESULTS", transient=False)
        return answer

    def close(self) -> None:
        self._channel.close()

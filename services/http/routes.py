"""Which Inference RPC each ``/v1`` route calls, with its message types. Pure: no gRPC, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass

from google.protobuf.message import Message

from medgate.v1 import inference_pb2 as pb

SERVICE = pb.DESCRIPTOR.services_by_name["Inference"].full_name


@dataclass(frozen=True)
class Rpc:
    """One Inference RPC the face serves: its method name and message types."""

    method: str
    request: type[Message]
    response: type[Message]

    @property
    def full_method(self) -> str:
        return f"/{SERVICE}/{self.method}"


# AnalyzeStream has no route: a stream of answers does not fit one JSON body; POST /score is the batch form.
V1_ROUTES: dict[str, Rpc] = {
    "classify": Rpc("Classify", pb.ClassifyRequest, pb.ClassifyResponse),
    "detect": Rpc("Detect", pb.DetectRequest, pb.DetectResponse),
    "segment": Rpc("Segment", pb.SegmentRequest, pb.SegmentResponse),
    "analyze": Rpc("Analyze", pb.AnalyzeRequest, pb.AnalyzeResponse),
}
SEGMENT = V1_ROUTES["segment"]

from medgate.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImpressionRequest(_message.Message):
    __slots__ = ("findings", "request_id", "max_evidence")
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    findings: str
    request_id: str
    max_evidence: int
    def __init__(self, findings: _Optional[str] = ..., request_id: _Optional[str] = ..., max_evidence: _Optional[int] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("report_id", "similarity", "findings", "impression")
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    FINDINGS_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    report_id: int
    similarity: float
    findings: str
    impression: str
    def __init__(self, report_id: _Optional[int] = ..., similarity: _Optional[float] = ..., findings: _Optional[str] = ..., impression: _Optional[str] = ...) -> None: ...

class ReportTimings(_message.Message):
    __slots__ = ("validate_ms", "triton_ms", "total_ms")
    VALIDATE_MS_FIELD_NUMBER: _ClassVar[int]
    TRITON_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    validate_ms: float
    triton_ms: float
    total_ms: float
    def __init__(self, validate_ms: _Optional[float] = ..., triton_ms: _Optional[float] = ..., total_ms: _Optional[float] = ...) -> None: ...

class ImpressionResponse(_message.Message):
    __slots__ = ("request_id", "impression", "score", "agreement", "top_similarity", "evidence", "model", "timings", "coverage")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    IMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    TOP_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    COVERAGE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    impression: str
    score: float
    agreement: float
    top_similarity: float
    evidence: _containers.RepeatedCompositeFieldContainer[Evidence]
    model: _inference_pb2.ModelRef
    timings: ReportTimings
    coverage: float
    def __init__(self, request_id: _Optional[str] = ..., impression: _Optional[str] = ..., score: _Optional[float] = ..., agreement: _Optional[float] = ..., top_similarity: _Optional[float] = ..., evidence: _Optional[_Iterable[_Union[Evidence, _Mapping]]] = ..., model: _Optional[_Union[_inference_pb2.ModelRef, _Mapping]] = ..., timings: _Optional[_Union[ReportTimings, _Mapping]] = ..., coverage: _Optional[float] = ...) -> None: ...

class ImpressionStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ImpressionResponse
    error: _inference_pb2.ItemError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ImpressionResponse, _Mapping]] = ..., error: _Optional[_Union[_inference_pb2.ItemError, _Mapping]] = ...) -> None: ...

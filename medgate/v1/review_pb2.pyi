import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from medgate.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TYPE_UNSPECIFIED: _ClassVar[TaskType]
    TASK_TYPE_CLASSIFICATION: _ClassVar[TaskType]
    TASK_TYPE_DETECTION: _ClassVar[TaskType]
    TASK_TYPE_SEGMENTATION: _ClassVar[TaskType]

class HumanLoopStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HUMAN_LOOP_STATUS_UNSPECIFIED: _ClassVar[HumanLoopStatus]
    HUMAN_LOOP_STATUS_IN_PROGRESS: _ClassVar[HumanLoopStatus]
    HUMAN_LOOP_STATUS_COMPLETED: _ClassVar[HumanLoopStatus]
    HUMAN_LOOP_STATUS_FAILED: _ClassVar[HumanLoopStatus]
    HUMAN_LOOP_STATUS_STOPPED: _ClassVar[HumanLoopStatus]
    HUMAN_LOOP_STATUS_STOPPING: _ClassVar[HumanLoopStatus]

class SortOrder(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SORT_ORDER_DESCENDING: _ClassVar[SortOrder]
    SORT_ORDER_ASCENDING: _ClassVar[SortOrder]
TASK_TYPE_UNSPECIFIED: TaskType
TASK_TYPE_CLASSIFICATION: TaskType
TASK_TYPE_DETECTION: TaskType
TASK_TYPE_SEGMENTATION: TaskType
HUMAN_LOOP_STATUS_UNSPECIFIED: HumanLoopStatus
HUMAN_LOOP_STATUS_IN_PROGRESS: HumanLoopStatus
HUMAN_LOOP_STATUS_COMPLETED: HumanLoopStatus
HUMAN_LOOP_STATUS_FAILED: HumanLoopStatus
HUMAN_LOOP_STATUS_STOPPED: HumanLoopStatus
HUMAN_LOOP_STATUS_STOPPING: HumanLoopStatus
SORT_ORDER_DESCENDING: SortOrder
SORT_ORDER_ASCENDING: SortOrder

class FlowDefinition(_message.Message):
    __slots__ = ("name", "task_type", "categories", "task_count", "task_availability_lifetime_seconds", "task_time_limit_seconds", "activation_conditions_json", "output_path")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNT_FIELD_NUMBER: _ClassVar[int]
    TASK_AVAILABILITY_LIFETIME_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TASK_TIME_LIMIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CONDITIONS_JSON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    name: str
    task_type: TaskType
    categories: _containers.RepeatedScalarFieldContainer[str]
    task_count: int
    task_availability_lifetime_seconds: int
    task_time_limit_seconds: int
    activation_conditions_json: str
    output_path: str
    def __init__(self, name: _Optional[str] = ..., task_type: _Optional[_Union[TaskType, str]] = ..., categories: _Optional[_Iterable[str]] = ..., task_count: _Optional[int] = ..., task_availability_lifetime_seconds: _Optional[int] = ..., task_time_limit_seconds: _Optional[int] = ..., activation_conditions_json: _Optional[str] = ..., output_path: _Optional[str] = ...) -> None: ...

class DescribeFlowDefinitionRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListFlowDefinitionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListFlowDefinitionsResponse(_message.Message):
    __slots__ = ("flow_definitions",)
    FLOW_DEFINITIONS_FIELD_NUMBER: _ClassVar[int]
    flow_definitions: _containers.RepeatedCompositeFieldContainer[FlowDefinition]
    def __init__(self, flow_definitions: _Optional[_Iterable[_Union[FlowDefinition, _Mapping]]] = ...) -> None: ...

class HumanLoop(_message.Message):
    __slots__ = ("name", "flow_definition", "status", "creation_time", "failure_code", "failure_reason", "output_path", "answers", "task_count", "verified_dicom_state", "verified_dicom_note")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLOW_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIME_FIELD_NUMBER: _ClassVar[int]
    FAILURE_CODE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    ANSWERS_FIELD_NUMBER: _ClassVar[int]
    TASK_COUNT_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_DICOM_STATE_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_DICOM_NOTE_FIELD_NUMBER: _ClassVar[int]
    name: str
    flow_definition: str
    status: HumanLoopStatus
    creation_time: _timestamp_pb2.Timestamp
    failure_code: str
    failure_reason: str
    output_path: str
    answers: int
    task_count: int
    verified_dicom_state: str
    verified_dicom_note: str
    def __init__(self, name: _Optional[str] = ..., flow_definition: _Optional[str] = ..., status: _Optional[_Union[HumanLoopStatus, str]] = ..., creation_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., failure_code: _Optional[str] = ..., failure_reason: _Optional[str] = ..., output_path: _Optional[str] = ..., answers: _Optional[int] = ..., task_count: _Optional[int] = ..., verified_dicom_state: _Optional[str] = ..., verified_dicom_note: _Optional[str] = ...) -> None: ...

class StartHumanLoopRequest(_message.Message):
    __slots__ = ("name", "flow_definition", "input_content_json", "image_png", "masks_packbits", "dicom", "modality_png")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FLOW_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    INPUT_CONTENT_JSON_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    MASKS_PACKBITS_FIELD_NUMBER: _ClassVar[int]
    DICOM_FIELD_NUMBER: _ClassVar[int]
    MODALITY_PNG_FIELD_NUMBER: _ClassVar[int]
    name: str
    flow_definition: str
    input_content_json: str
    image_png: bytes
    masks_packbits: bytes
    dicom: ReviewDicomSource
    modality_png: bytes
    def __init__(self, name: _Optional[str] = ..., flow_definition: _Optional[str] = ..., input_content_json: _Optional[str] = ..., image_png: _Optional[bytes] = ..., masks_packbits: _Optional[bytes] = ..., dicom: _Optional[_Union[ReviewDicomSource, _Mapping]] = ..., modality_png: _Optional[bytes] = ...) -> None: ...

class ReviewDicomSource(_message.Message):
    __slots__ = ("data", "frame", "ai_sr", "ai_seg", "seg_tracking_ids", "seg_tracking_uids", "models")
    class ModelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _inference_pb2.ModelRef
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_inference_pb2.ModelRef, _Mapping]] = ...) -> None: ...
    DATA_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    AI_SR_FIELD_NUMBER: _ClassVar[int]
    AI_SEG_FIELD_NUMBER: _ClassVar[int]
    SEG_TRACKING_IDS_FIELD_NUMBER: _ClassVar[int]
    SEG_TRACKING_UIDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    frame: int
    ai_sr: DicomReference
    ai_seg: DicomReference
    seg_tracking_ids: _containers.RepeatedScalarFieldContainer[str]
    seg_tracking_uids: _containers.RepeatedScalarFieldContainer[str]
    models: _containers.MessageMap[str, _inference_pb2.ModelRef]
    def __init__(self, data: _Optional[bytes] = ..., frame: _Optional[int] = ..., ai_sr: _Optional[_Union[DicomReference, _Mapping]] = ..., ai_seg: _Optional[_Union[DicomReference, _Mapping]] = ..., seg_tracking_ids: _Optional[_Iterable[str]] = ..., seg_tracking_uids: _Optional[_Iterable[str]] = ..., models: _Optional[_Mapping[str, _inference_pb2.ModelRef]] = ...) -> None: ...

class DicomReference(_message.Message):
    __slots__ = ("study_instance_uid", "series_instance_uid", "sop_instance_uid", "sop_class_uid")
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    def __init__(self, study_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., sop_class_uid: _Optional[str] = ...) -> None: ...

class DescribeHumanLoopRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListHumanLoopsRequest(_message.Message):
    __slots__ = ("flow_definition", "creation_time_after", "creation_time_before", "sort_order", "max_results", "next_token", "status")
    FLOW_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIME_AFTER_FIELD_NUMBER: _ClassVar[int]
    CREATION_TIME_BEFORE_FIELD_NUMBER: _ClassVar[int]
    SORT_ORDER_FIELD_NUMBER: _ClassVar[int]
    MAX_RESULTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    flow_definition: str
    creation_time_after: _timestamp_pb2.Timestamp
    creation_time_before: _timestamp_pb2.Timestamp
    sort_order: SortOrder
    max_results: int
    next_token: str
    status: HumanLoopStatus
    def __init__(self, flow_definition: _Optional[str] = ..., creation_time_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., creation_time_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sort_order: _Optional[_Union[SortOrder, str]] = ..., max_results: _Optional[int] = ..., next_token: _Optional[str] = ..., status: _Optional[_Union[HumanLoopStatus, str]] = ...) -> None: ...

class ListHumanLoopsResponse(_message.Message):
    __slots__ = ("human_loops", "next_token")
    HUMAN_LOOPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_TOKEN_FIELD_NUMBER: _ClassVar[int]
    human_loops: _containers.RepeatedCompositeFieldContainer[HumanLoop]
    next_token: str
    def __init__(self, human_loops: _Optional[_Iterable[_Union[HumanLoop, _Mapping]]] = ..., next_token: _Optional[str] = ...) -> None: ...

class StopHumanLoopRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteHumanLoopRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteHumanLoopResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamCasesRequest(_message.Message):
    __slots__ = ("reviewer_id", "flow_definitions", "max_in_flight")
    REVIEWER_ID_FIELD_NUMBER: _ClassVar[int]
    FLOW_DEFINITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    reviewer_id: str
    flow_definitions: _containers.RepeatedScalarFieldContainer[str]
    max_in_flight: int
    def __init__(self, reviewer_id: _Optional[str] = ..., flow_definitions: _Optional[_Iterable[str]] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class ReviewCase(_message.Message):
    __slots__ = ("delivery_id", "human_loop_name", "flow_definition", "task_type", "categories", "lease_expires", "image_png", "original_width", "original_height", "scores", "detections", "prompts", "masks", "input_content_json", "reviewer_id", "modality_png")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    HUMAN_LOOP_NAME_FIELD_NUMBER: _ClassVar[int]
    FLOW_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    TASK_TYPE_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    LEASE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PNG_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MASKS_FIELD_NUMBER: _ClassVar[int]
    INPUT_CONTENT_JSON_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_ID_FIELD_NUMBER: _ClassVar[int]
    MODALITY_PNG_FIELD_NUMBER: _ClassVar[int]
    delivery_id: str
    human_loop_name: str
    flow_definition: str
    task_type: TaskType
    categories: _containers.RepeatedScalarFieldContainer[str]
    lease_expires: _timestamp_pb2.Timestamp
    image_png: bytes
    original_width: int
    original_height: int
    scores: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ClassScore]
    detections: _containers.RepeatedCompositeFieldContainer[_inference_pb2.Detection]
    prompts: _containers.RepeatedCompositeFieldContainer[_inference_pb2.PromptResult]
    masks: _inference_pb2.NDArray
    input_content_json: str
    reviewer_id: str
    modality_png: bytes
    def __init__(self, delivery_id: _Optional[str] = ..., human_loop_name: _Optional[str] = ..., flow_definition: _Optional[str] = ..., task_type: _Optional[_Union[TaskType, str]] = ..., categories: _Optional[_Iterable[str]] = ..., lease_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., image_png: _Optional[bytes] = ..., original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., scores: _Optional[_Iterable[_Union[_inference_pb2.ClassScore, _Mapping]]] = ..., detections: _Optional[_Iterable[_Union[_inference_pb2.Detection, _Mapping]]] = ..., prompts: _Optional[_Iterable[_Union[_inference_pb2.PromptResult, _Mapping]]] = ..., masks: _Optional[_Union[_inference_pb2.NDArray, _Mapping]] = ..., input_content_json: _Optional[str] = ..., reviewer_id: _Optional[str] = ..., modality_png: _Optional[bytes] = ...) -> None: ...

class ReviewAnswer(_message.Message):
    __slots__ = ("accept", "reject_reason", "label", "boxes", "mask", "comment")
    ACCEPT_FIELD_NUMBER: _ClassVar[int]
    REJECT_REASON_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    COMMENT_FIELD_NUMBER: _ClassVar[int]
    accept: bool
    reject_reason: str
    label: str
    boxes: LabeledBoxes
    mask: _inference_pb2.NDArray
    comment: str
    def __init__(self, accept: _Optional[bool] = ..., reject_reason: _Optional[str] = ..., label: _Optional[str] = ..., boxes: _Optional[_Union[LabeledBoxes, _Mapping]] = ..., mask: _Optional[_Union[_inference_pb2.NDArray, _Mapping]] = ..., comment: _Optional[str] = ...) -> None: ...

class LabeledBoxes(_message.Message):
    __slots__ = ("boxes",)
    BOXES_FIELD_NUMBER: _ClassVar[int]
    boxes: _containers.RepeatedCompositeFieldContainer[_inference_pb2.Detection]
    def __init__(self, boxes: _Optional[_Iterable[_Union[_inference_pb2.Detection, _Mapping]]] = ...) -> None: ...

class SubmitReviewRequest(_message.Message):
    __slots__ = ("decision_id", "delivery_id", "reviewer_id", "answer")
    DECISION_ID_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_ID_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    decision_id: str
    delivery_id: str
    reviewer_id: str
    answer: ReviewAnswer
    def __init__(self, decision_id: _Optional[str] = ..., delivery_id: _Optional[str] = ..., reviewer_id: _Optional[str] = ..., answer: _Optional[_Union[ReviewAnswer, _Mapping]] = ...) -> None: ...

class SubmitReviewResponse(_message.Message):
    __slots__ = ("human_loop", "recorded_now")
    HUMAN_LOOP_FIELD_NUMBER: _ClassVar[int]
    RECORDED_NOW_FIELD_NUMBER: _ClassVar[int]
    human_loop: HumanLoop
    recorded_now: bool
    def __init__(self, human_loop: _Optional[_Union[HumanLoop, _Mapping]] = ..., recorded_now: _Optional[bool] = ...) -> None: ...

class ReleaseCaseRequest(_message.Message):
    __slots__ = ("delivery_id", "reviewer_id")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_ID_FIELD_NUMBER: _ClassVar[int]
    delivery_id: str
    reviewer_id: str
    def __init__(self, delivery_id: _Optional[str] = ..., reviewer_id: _Optional[str] = ...) -> None: ...

class ReleaseCaseResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("delivery_id", "reviewer_id")
    DELIVERY_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEWER_ID_FIELD_NUMBER: _ClassVar[int]
    delivery_id: str
    reviewer_id: str
    def __init__(self, delivery_id: _Optional[str] = ..., reviewer_id: _Optional[str] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("lease_expires",)
    LEASE_EXPIRES_FIELD_NUMBER: _ClassVar[int]
    lease_expires: _timestamp_pb2.Timestamp
    def __init__(self, lease_expires: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

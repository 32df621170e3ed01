from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ArrayEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ARRAY_ENCODING_RAW: _ClassVar[ArrayEncoding]
    ARRAY_ENCODING_PACKBITS: _ClassVar[ArrayEncoding]

class InputKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_KIND_AUTO: _ClassVar[InputKind]
    INPUT_KIND_DICOM: _ClassVar[InputKind]
    INPUT_KIND_PNG: _ClassVar[InputKind]
    INPUT_KIND_JPEG: _ClassVar[InputKind]
    INPUT_KIND_NIFTI: _ClassVar[InputKind]
    INPUT_KIND_MHA: _ClassVar[InputKind]
    INPUT_KIND_NRRD: _ClassVar[InputKind]
    INPUT_KIND_ARRAY: _ClassVar[InputKind]

class MaskSpace(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MASK_SPACE_MODEL: _ClassVar[MaskSpace]
    MASK_SPACE_ORIGINAL: _ClassVar[MaskSpace]
    MASK_SPACE_BOTH: _ClassVar[MaskSpace]

class PixelSpacingSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PIXEL_SPACING_SOURCE_UNSPECIFIED: _ClassVar[PixelSpacingSource]
    PIXEL_SPACING_SOURCE_PIXEL_MEASURES: _ClassVar[PixelSpacingSource]
    PIXEL_SPACING_SOURCE_PIXEL_SPACING: _ClassVar[PixelSpacingSource]
    PIXEL_SPACING_SOURCE_IMAGER_PIXEL_SPACING: _ClassVar[PixelSpacingSource]
    PIXEL_SPACING_SOURCE_VOLUME_HEADER: _ClassVar[PixelSpacingSource]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_CLASSIFY: _ClassVar[Task]
    TASK_DETECT: _ClassVar[Task]
    TASK_SEGMENT: _ClassVar[Task]
ARRAY_ENCODING_RAW: ArrayEncoding
ARRAY_ENCODING_PACKBITS: ArrayEncoding
INPUT_KIND_AUTO: InputKind
INPUT_KIND_DICOM: InputKind
INPUT_KIND_PNG: InputKind
INPUT_KIND_JPEG: InputKind
INPUT_KIND_NIFTI: InputKind
INPUT_KIND_MHA: InputKind
INPUT_KIND_NRRD: InputKind
INPUT_KIND_ARRAY: InputKind
MASK_SPACE_MODEL: MaskSpace
MASK_SPACE_ORIGINAL: MaskSpace
MASK_SPACE_BOTH: MaskSpace
PIXEL_SPACING_SOURCE_UNSPECIFIED: PixelSpacingSource
PIXEL_SPACING_SOURCE_PIXEL_MEASURES: PixelSpacingSource
PIXEL_SPACING_SOURCE_PIXEL_SPACING: PixelSpacingSource
PIXEL_SPACING_SOURCE_IMAGER_PIXEL_SPACING: PixelSpacingSource
PIXEL_SPACING_SOURCE_VOLUME_HEADER: PixelSpacingSource
TASK_UNSPECIFIED: Task
TASK_CLASSIFY: Task
TASK_DETECT: Task
TASK_SEGMENT: Task

class NDArray(_message.Message):
    __slots__ = ("data", "shape", "dtype", "encoding")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    shape: _containers.RepeatedScalarFieldContainer[int]
    dtype: str
    encoding: ArrayEncoding
    def __init__(self, data: _Optional[bytes] = ..., shape: _Optional[_Iterable[int]] = ..., dtype: _Optional[str] = ..., encoding: _Optional[_Union[ArrayEncoding, str]] = ...) -> None: ...

class Window(_message.Message):
    __slots__ = ("center", "width")
    CENTER_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    center: float
    width: float
    def __init__(self, center: _Optional[float] = ..., width: _Optional[float] = ...) -> None: ...

class ImageInput(_message.Message):
    __slots__ = ("data", "array", "reference", "kind", "frame", "window")
    DATA_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    array: NDArray
    reference: ImageReference
    kind: InputKind
    frame: int
    window: Window
    def __init__(self, data: _Optional[bytes] = ..., array: _Optional[_Union[NDArray, _Mapping]] = ..., reference: _Optional[_Union[ImageReference, _Mapping]] = ..., kind: _Optional[_Union[InputKind, str]] = ..., frame: _Optional[int] = ..., window: _Optional[_Union[Window, _Mapping]] = ...) -> None: ...

class ImageReference(_message.Message):
    __slots__ = ("file_path", "wadors_url")
    FILE_PATH_FIELD_NUMBER: _ClassVar[int]
    WADORS_URL_FIELD_NUMBER: _ClassVar[int]
    file_path: str
    wadors_url: str
    def __init__(self, file_path: _Optional[str] = ..., wadors_url: _Optional[str] = ...) -> None: ...

class OutputOptions(_message.Message):
    __slots__ = ("mask_space", "mask_encoding", "dicom_results")
    MASK_SPACE_FIELD_NUMBER: _ClassVar[int]
    MASK_ENCODING_FIELD_NUMBER: _ClassVar[int]
    DICOM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    mask_space: MaskSpace
    mask_encoding: ArrayEncoding
    dicom_results: bool
    def __init__(self, mask_space: _Optional[_Union[MaskSpace, str]] = ..., mask_encoding: _Optional[_Union[ArrayEncoding, str]] = ..., dicom_results: _Optional[bool] = ...) -> None: ...

class Transform(_message.Message):
    __slots__ = ("original_width", "original_height", "scale", "pad_left", "pad_top", "resized_width", "resized_height", "model_size", "scale_x", "scale_y")
    ORIGINAL_WIDTH_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    PAD_LEFT_FIELD_NUMBER: _ClassVar[int]
    PAD_TOP_FIELD_NUMBER: _ClassVar[int]
    RESIZED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    RESIZED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SCALE_X_FIELD_NUMBER: _ClassVar[int]
    SCALE_Y_FIELD_NUMBER: _ClassVar[int]
    original_width: int
    original_height: int
    scale: float
    pad_left: int
    pad_top: int
    resized_width: int
    resized_height: int
    model_size: int
    scale_x: float
    scale_y: float
    def __init__(self, original_width: _Optional[int] = ..., original_height: _Optional[int] = ..., scale: _Optional[float] = ..., pad_left: _Optional[int] = ..., pad_top: _Optional[int] = ..., resized_width: _Optional[int] = ..., resized_height: _Optional[int] = ..., model_size: _Optional[int] = ..., scale_x: _Optional[float] = ..., scale_y: _Optional[float] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x0", "y0", "x1", "y1")
    X0_FIELD_NUMBER: _ClassVar[int]
    Y0_FIELD_NUMBER: _ClassVar[int]
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    x0: float
    y0: float
    x1: float
    y1: float
    def __init__(self, x0: _Optional[float] = ..., y0: _Optional[float] = ..., x1: _Optional[float] = ..., y1: _Optional[float] = ...) -> None: ...

class ImageInfo(_message.Message):
    __slots__ = ("kind", "width", "height", "frames", "frame", "photometric_interpretation", "transfer_syntax", "modality", "window", "sop_instance_uid", "series_instance_uid", "study_instance_uid", "sop_class_uid", "frame_of_reference_uid", "pixel_spacing", "transfer_syntax_uid")
    KIND_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FRAMES_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    PHOTOMETRIC_INTERPRETATION_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SYNTAX_FIELD_NUMBER: _ClassVar[int]
    MODALITY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    STUDY_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    FRAME_OF_REFERENCE_UID_FIELD_NUMBER: _ClassVar[int]
    PIXEL_SPACING_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SYNTAX_UID_FIELD_NUMBER: _ClassVar[int]
    kind: InputKind
    width: int
    height: int
    frames: int
    frame: int
    photometric_interpretation: str
    transfer_syntax: str
    modality: str
    window: Window
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str
    sop_class_uid: str
    frame_of_reference_uid: str
    pixel_spacing: PixelSpacing
    transfer_syntax_uid: str
    def __init__(self, kind: _Optional[_Union[InputKind, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., frames: _Optional[int] = ..., frame: _Optional[int] = ..., photometric_interpretation: _Optional[str] = ..., transfer_syntax: _Optional[str] = ..., modality: _Optional[str] = ..., window: _Optional[_Union[Window, _Mapping]] = ..., sop_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., study_instance_uid: _Optional[str] = ..., sop_class_uid: _Optional[str] = ..., frame_of_reference_uid: _Optional[str] = ..., pixel_spacing: _Optional[_Union[PixelSpacing, _Mapping]] = ..., transfer_syntax_uid: _Optional[str] = ...) -> None: ...

class PixelSpacing(_message.Message):
    __slots__ = ("row_mm", "column_mm", "source")
    ROW_MM_FIELD_NUMBER: _ClassVar[int]
    COLUMN_MM_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    row_mm: float
    column_mm: float
    source: PixelSpacingSource
    def __init__(self, row_mm: _Optional[float] = ..., column_mm: _Optional[float] = ..., source: _Optional[_Union[PixelSpacingSource, str]] = ...) -> None: ...

class ModelRef(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class StageTimings(_message.Message):
    __slots__ = ("decode_ms", "preprocess_ms", "triton_ms", "encode_ms", "total_ms", "dicom_ms", "route_ms")
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    TRITON_MS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    DICOM_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTE_MS_FIELD_NUMBER: _ClassVar[int]
    decode_ms: float
    preprocess_ms: float
    triton_ms: float
    encode_ms: float
    total_ms: float
    dicom_ms: float
    route_ms: float
    def __init__(self, decode_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., triton_ms: _Optional[float] = ..., encode_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., dicom_ms: _Optional[float] = ..., route_ms: _Optional[float] = ...) -> None: ...

class DicomObject(_message.Message):
    __slots__ = ("data", "sop_class_uid", "sop_instance_uid", "series_instance_uid", "kind")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SOP_CLASS_UID_FIELD_NUMBER: _ClassVar[int]
    SOP_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    SERIES_INSTANCE_UID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    kind: str
    def __init__(self, data: _Optional[bytes] = ..., sop_class_uid: _Optional[str] = ..., sop_instance_uid: _Optional[str] = ..., series_instance_uid: _Optional[str] = ..., kind: _Optional[str] = ...) -> None: ...

class ReviewRouting(_message.Message):
    __slots__ = ("routed", "human_loop_name", "flow_definition", "reasons", "queued")
    ROUTED_FIELD_NUMBER: _ClassVar[int]
    HUMAN_LOOP_NAME_FIELD_NUMBER: _ClassVar[int]
    FLOW_DEFINITION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    routed: bool
    human_loop_name: str
    flow_definition: str
    reasons: _containers.RepeatedScalarFieldContainer[str]
    queued: bool
    def __init__(self, routed: _Optional[bool] = ..., human_loop_name: _Optional[str] = ..., flow_definition: _Optional[str] = ..., reasons: _Optional[_Iterable[str]] = ..., queued: _Optional[bool] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("image", "output")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    output: OutputOptions
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ...) -> None: ...

class ClassScore(_message.Message):
    __slots__ = ("label", "score")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    label: str
    score: float
    def __init__(self, label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("scores", "top_label", "top_score", "model", "transform", "image", "timings", "review", "dicom_results")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    TOP_LABEL_FIELD_NUMBER: _ClassVar[int]
    TOP_SCORE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    DICOM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[ClassScore]
    top_label: str
    top_score: float
    model: ModelRef
    transform: Transform
    image: ImageInfo
    timings: StageTimings
    review: _containers.RepeatedCompositeFieldContainer[ReviewRouting]
    dicom_results: _containers.RepeatedCompositeFieldContainer[DicomObject]
    def __init__(self, scores: _Optional[_Iterable[_Union[ClassScore, _Mapping]]] = ..., top_label: _Optional[str] = ..., top_score: _Optional[float] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ..., image: _Optional[_Union[ImageInfo, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., review: _Optional[_Iterable[_Union[ReviewRouting, _Mapping]]] = ..., dicom_results: _Optional[_Iterable[_Union[DicomObject, _Mapping]]] = ...) -> None: ...

class DetectRequest(_message.Message):
    __slots__ = ("image", "min_score", "max_detections", "output")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    min_score: float
    max_detections: int
    output: OutputOptions
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ..., min_score: _Optional[float] = ..., max_detections: _Optional[int] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ...) -> None: ...

class Detection(_message.Message):
    __slots__ = ("box", "model_box", "label", "score")
    BOX_FIELD_NUMBER: _ClassVar[int]
    MODEL_BOX_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    box: Box
    model_box: Box
    label: str
    score: float
    def __init__(self, box: _Optional[_Union[Box, _Mapping]] = ..., model_box: _Optional[_Union[Box, _Mapping]] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class DetectResponse(_message.Message):
    __slots__ = ("detections", "model", "transform", "image", "timings", "review", "dicom_results")
    DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    DICOM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    detections: _containers.RepeatedCompositeFieldContainer[Detection]
    model: ModelRef
    transform: Transform
    image: ImageInfo
    timings: StageTimings
    review: _containers.RepeatedCompositeFieldContainer[ReviewRouting]
    dicom_results: _containers.RepeatedCompositeFieldContainer[DicomObject]
    def __init__(self, detections: _Optional[_Iterable[_Union[Detection, _Mapping]]] = ..., model: _Optional[_Union[ModelRef, _Mapping]] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ..., image: _Optional[_Union[ImageInfo, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., review: _Optional[_Iterable[_Union[ReviewRouting, _Mapping]]] = ..., dicom_results: _Optional[_Iterable[_Union[DicomObject, _Mapping]]] = ...) -> None: ...

class SegmentRequest(_message.Message):
    __slots__ = ("image", "prompts", "boxes", "output")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    prompts: str
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    output: OutputOptions
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ..., prompts: _Optional[str] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ...) -> None: ...

class PromptResult(_message.Message):
    __slots__ = ("prompt", "category", "score", "box", "area_pixels", "mask_box", "model")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    BOX_FIELD_NUMBER: _ClassVar[int]
    AREA_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MASK_BOX_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    category: str
    score: float
    box: Box
    area_pixels: int
    mask_box: Box
    model: str
    def __init__(self, prompt: _Optional[str] = ..., category: _Optional[str] = ..., score: _Optional[float] = ..., box: _Optional[_Union[Box, _Mapping]] = ..., area_pixels: _Optional[int] = ..., mask_box: _Optional[_Union[Box, _Mapping]] = ..., model: _Optional[str] = ...) -> None: ...

class SegmentResponse(_message.Message):
    __slots__ = ("image_features", "text_features", "original_masks", "prompts", "models", "transform", "image", "timings", "review", "dicom_results")
    IMAGE_FEATURES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_MASKS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    DICOM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    image_features: NDArray
    text_features: _containers.RepeatedScalarFieldContainer[str]
    original_masks: NDArray
    prompts: _containers.RepeatedCompositeFieldContainer[PromptResult]
    models: _containers.RepeatedCompositeFieldContainer[ModelRef]
    transform: Transform
    image: ImageInfo
    timings: StageTimings
    review: _containers.RepeatedCompositeFieldContainer[ReviewRouting]
    dicom_results: _containers.RepeatedCompositeFieldContainer[DicomObject]
    def __init__(self, image_features: _Optional[_Union[NDArray, _Mapping]] = ..., text_features: _Optional[_Iterable[str]] = ..., original_masks: _Optional[_Union[NDArray, _Mapping]] = ..., prompts: _Optional[_Iterable[_Union[PromptResult, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelRef, _Mapping]]] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ..., image: _Optional[_Union[ImageInfo, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., review: _Optional[_Iterable[_Union[ReviewRouting, _Mapping]]] = ..., dicom_results: _Optional[_Iterable[_Union[DicomObject, _Mapping]]] = ...) -> None: ...

class AnalyzeRequest(_message.Message):
    __slots__ = ("image", "tasks", "prompts", "boxes", "output", "min_score", "max_detections", "request_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MIN_SCORE_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    image: ImageInput
    tasks: _containers.RepeatedScalarFieldContainer[Task]
    prompts: str
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    output: OutputOptions
    min_score: float
    max_detections: int
    request_id: str
    def __init__(self, image: _Optional[_Union[ImageInput, _Mapping]] = ..., tasks: _Optional[_Iterable[_Union[Task, str]]] = ..., prompts: _Optional[str] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., output: _Optional[_Union[OutputOptions, _Mapping]] = ..., min_score: _Optional[float] = ..., max_detections: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class AnalyzeResponse(_message.Message):
    __slots__ = ("classification", "detection", "segmentation", "transform", "image", "timings", "request_id", "review", "dicom_results")
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    SEGMENTATION_FIELD_NUMBER: _ClassVar[int]
    TRANSFORM_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REVIEW_FIELD_NUMBER: _ClassVar[int]
    DICOM_RESULTS_FIELD_NUMBER: _ClassVar[int]
    classification: ClassifyResponse
    detection: DetectResponse
    segmentation: SegmentResponse
    transform: Transform
    image: ImageInfo
    timings: StageTimings
    request_id: str
    review: _containers.RepeatedCompositeFieldContainer[ReviewRouting]
    dicom_results: _containers.RepeatedCompositeFieldContainer[DicomObject]
    def __init__(self, classification: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., detection: _Optional[_Union[DetectResponse, _Mapping]] = ..., segmentation: _Optional[_Union[SegmentResponse, _Mapping]] = ..., transform: _Optional[_Union[Transform, _Mapping]] = ..., image: _Optional[_Union[ImageInfo, _Mapping]] = ..., timings: _Optional[_Union[StageTimings, _Mapping]] = ..., request_id: _Optional[str] = ..., review: _Optional[_Iterable[_Union[ReviewRouting, _Mapping]]] = ..., dicom_results: _Optional[_Iterable[_Union[DicomObject, _Mapping]]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "code_name", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_NAME_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    code_name: str
    message: str
    def __init__(self, code: _Optional[int] = ..., code_name: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class AnalyzeStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: AnalyzeResponse
    error: ItemError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[AnalyzeResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

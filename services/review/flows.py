"""Flow definitions and A2I-style activation conditions: pure data, parsing, evaluation, config loading."""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

# A2I's rule for flow definition and human loop names.
NAME_PATTERN = re.compile(r"^[a-z0-9](-*[a-z0-9])*$")
MAX_NAME_CHARS = 63
MAX_TASK_COUNT = 3
# A2I's defaults: ten days to find reviewers, one hour per reviewer.
DEFAULT_AVAILABILITY_LIFETIME_S = 864_000.0
DEFAULT_TIME_LIMIT_S = 3_600.0
MAX_CONDITION_DEPTH = 10

SCORE_TOP_CLASS = "top_class"
SCORE_MAX_BOX = "max_box"
SCORE_MIN_PROMPT = "min_prompt"
SCORE_MAX_PROMPT = "max_prompt"
SCORE_PROMPT_PREFIX = "prompt:"

CONFIDENCE_LESS_THAN = "ConfidenceLessThan"
CONFIDENCE_GREATER_THAN_EQUALS = "ConfidenceGreaterThanEquals"
SAMPLING = "Sampling"


class ReviewError(Exception):
    """Base of every review error; messages name loops, flows and ids, never patient data."""


class InvalidArgument(ReviewError, ValueError):
    """A bad flow definition, name, condition or answer (maps to INVALID_ARGUMENT)."""


class TaskType(StrEnum):
    CLASSIFICATION = "classification"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"


def check_name(name: str, what: str = "name") -> str:
    """Refuse names A2I would refuse, so names travel unchanged into paths and output files."""
    if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS or not NAME_PATTERN.match(name):
        raise InvalidArgument(
            f"{what} {name!r} must be 1-{MAX_NAME_CHARS} lowercase letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


# ---------------------------------------------------------------------------------------------
# What the conditions see of an inference result.


@dataclass(frozen=True)
class ResultSummary:
    """The few numbers activation conditions look at, so evaluation never touches masks or pixels.

    ``None`` means the task did not run. A detection run that found nothing should report
    ``max_box_score=0.0`` (nothing found with any confidence), which :func:`summarize` does.
    ``input_hash`` identifies the input (e.g. SHA-256 of the image bytes) for deterministic sampling.
    """

    input_hash: str
    top_class_score: float | None = None
    max_box_score: float | None = None
    prompt_scores: Mapping[str, float] = field(default_factory=dict)

    def score(self, ref: str) -> float | None:
        """The score a condition's ``Score`` parameter names; ``None`` when the result lacks it."""
        if ref == SCORE_TOP_CLASS:
            return self.top_class_score
        if ref == SCORE_MAX_BOX:
            return self.max_box_score
        if ref == SCORE_MIN_PROMPT:
            return min(self.prompt_scores.values(), default=None)
        if ref == SCORE_MAX_PROMPT:
            return max(self.prompt_scores.values(), default=None)
        if ref.startswith(SCORE_PROMPT_PREFIX):
            return self.prompt_scores.get(ref[len(SCORE_PROMPT_PREFIX) :])
        raise InvalidArgument(f"unknown score {ref!r}")


def summarize(
    input_hash: str,
    *,
    class_scores: Iterable[float] | None = None,
    box_scores: Iterable[float] | None = None,
    prompt_scores: Mapping[str, float] | None = None,
) -> ResultSummary:
    """Build a summary from raw per-class, per-box and per-prompt scores."""
    top = max(class_scores, default=None) if class_scores is not None else None
    max_box = max(box_scores, default=0.0) if box_scores is not None else None
    return ResultSummary(
        input_hash=input_hash,
        top_class_score=None if top is None else float(top),
        max_box_score=None if max_box is None else float(max_box),
        prompt_scores={k: float(v) for k, v in (prompt_scores or {}).items()},
    )


# ---------------------------------------------------------------------------------------------
# The condition tree.


@dataclass(frozen=True)
class Confidence:
    """``ConfidenceLessThan`` (``below=True``) or ``ConfidenceGreaterThanEquals`` on one score."""

    score: str
    threshold: float
    below: bool = True


@dataclass(frozen=True)
class Sampling:
    """A fixed share of inputs, chosen by input hash so a retried request decides the same way.

    ``salt`` lets two Sampling conditions (or two flows) pick different subsets.
    """

    percentage: float
    salt: str = ""


@dataclass(frozen=True)
class AllOf:
    conditions: tuple[Condition, ...]


@dataclass(frozen=True)
class AnyOf:
    conditions: tuple[Condition, ...]


Condition = Confidence | Sampling | AllOf | AnyOf


def _check_score_ref(ref: Any) -> str:
    named = ref in {SCORE_TOP_CLASS, SCORE_MAX_BOX, SCORE_MIN_PROMPT, SCORE_MAX_PROMPT}
    prompt = isinstance(ref, str) and ref.startswith(SCORE_PROMPT_PREFIX) and len(ref) > len(SCORE_PROMPT_PREFIX)
    if isinstance(ref, str) and (named or prompt):
        return ref
    raise InvalidArgument(
        f"Score {ref!r} must be one of {SCORE_TOP_CLASS}, {SCORE_MAX_BOX}, {SCORE_MIN_PROMPT}, "
        f"{SCORE_MAX_PROMPT} or {SCORE_PROMPT_PREFIX}<prompt>"
    )


def _number(value: Any, what: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidArgument(f"{what} must be a number, got {value!r}")
    if not low <= value <= high:
        raise InvalidArgument(f"{what} must be in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _simple_condition(node: Mapping[str, Any]) -> Condition:
    extra = set(node) - {"ConditionType", "ConditionParameters"}
    if extra:
        raise InvalidArgument(f"unknown condition keys {sorted(extra)}")
    kind = node.get("ConditionType")
    params = node.get("ConditionParameters")
    if not isinstance(params, Mapping):
        raise InvalidArgument(f"condition {kind!r} needs a ConditionParameters object")
    if kind in (CONFIDENCE_LESS_THAN, CONFIDENCE_GREATER_THAN_EQUALS):
        allowed = {"Score", kind}
        if set(params) != allowed:
            raise InvalidArgument(f"{kind} takes exactly the parameters {sorted(allowed)}, got {sorted(params)}")
        return Confidence(
            score=_check_score_ref(params["Score"]),
            threshold=_number(params[kind], kind, 0.0, 1.0),
            below=kind == CONFIDENCE_LESS_THAN,
        )
    if kind == SAMPLING:
        if "RandomSamplingPercentage" not in params or set(params) - {"RandomSamplingPercentage", "Salt"}:
            raise InvalidArgument(
                f"Sampling takes RandomSamplingPercentage (and optionally Salt), got {sorted(params)}"
            )
        salt = params.get("Salt", "")
        if not isinstance(salt, str):
            raise InvalidArgument("Sampling Salt must be a string")
        return Sampling(_number(params["RandomSamplingPercentage"], "RandomSamplingPercentage", 0.0, 100.0), salt)
    raise InvalidArgument(
        f"ConditionType {kind!r} must be {CONFIDENCE_LESS_THAN}, {CONFIDENCE_GREATER_THAN_EQUALS} or {SAMPLING}"
    )


def _parse_node(node: Any, depth: int) -> Condition:
    if depth > MAX_CONDITION_DEPTH:
        raise InvalidArgument(f"conditions nest deeper than {MAX_CONDITION_DEPTH}")
    if not isinstance(node, Mapping):
        raise InvalidArgument(f"a condition must be an object, got {type(node).__name__}")
    for key, kind in (("And", AllOf), ("Or", AnyOf), ("Conditions", AnyOf)):
        if key in node:
            if len(node) != 1:
                raise InvalidArgument(f"{key} must be the only key of its object")
            members = node[key]
            if not isinstance(members, list) or not members:
                raise InvalidArgument(f"{key} needs a non-empty list of conditions")
            return kind(tuple(_parse_node(member, depth + 1) for member in members))
    return _simple_condition(node)


def parse_conditions(source: str | Mapping[str, Any]) -> Condition:
    """Parse A2I's HumanLoopActivationConditions shape (a JSON string or the decoded object)."""
    if isinstance(source, str):
        try:
            source = json.loads(source)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(f"activation conditions are not valid JSON: {exc}") from None
    return _parse_node(source, 0)


def conditions_to_json(condition: Condition) -> dict[str, Any]:
    """The A2I-shaped JSON object for a condition tree (round-trips through :func:`parse_conditions`)."""
    if isinstance(condition, AllOf):
        return {"And": [conditions_to_json(member) for member in condition.conditions]}
    if isinstance(condition, AnyOf):
        return {"Or": [conditions_to_json(member) for member in condition.conditions]}
    if isinstance(condition, Sampling):
        params: dict[str, Any] = {"RandomSamplingPercentage": condition.percentage}
        if condition.salt:
            params["Salt"] = condition.salt
        return {"ConditionType": SAMPLING, "ConditionParameters": params}
    kind = CONFIDENCE_LESS_THAN if condition.below else CONFIDENCE_GREATER_THAN_EQUALS
    return {"ConditionType": kind, "ConditionParameters": {"Score": condition.score, kind: condition.threshold}}


def sampling_bucket(input_hash: str, salt: str = "") -> float:
    """Where an input falls in [0, 100): uniform over hashes, fixed for one hash and salt."""
    digest = hashlib.sha256(f"{salt}\0{input_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * 100.0


@dataclass(frozen=True)
class Activation:
    """Whether a loop should start, and which simple conditions said so (for audit and output)."""

    matched: bool
    reasons: tuple[str, ...] = ()


def evaluate(condition: Condition, summary: ResultSummary) -> Activation:
    """Evaluate a condition tree; a score the result lacks makes its condition false (no evidence)."""
    if isinstance(condition, AllOf | AnyOf):
        results = [evaluate(member, summary) for member in condition.conditions]
        matched = all(r.matched for r in results) if isinstance(condition, AllOf) else any(r.matched for r in results)
        reasons = tuple(reason for r in results if r.matched for reason in r.reasons) if matched else ()
        return Activation(matched, reasons)
    if isinstance(condition, Sampling):
        bucket = sampling_bucket(summary.input_hash, condition.salt)
        if bucket < condition.percentage:
            return Activation(True, (f"{SAMPLING} {condition.percentage:g}%",))
        return Activation(False)
    value = summary.score(condition.score)
    if value is None:
        return Activation(False)
    if condition.below and value < condition.threshold:
        return Activation(True, (f"{CONFIDENCE_LESS_THAN} {condition.score} {value:.4f} < {condition.threshold:g}",))
    if not condition.below and value >= condition.threshold:
        return Activation(
            True, (f"{CONFIDENCE_GREATER_THAN_EQUALS} {condition.score} {value:.4f} >= {condition.threshold:g}",)
        )
    return Activation(False)


# ---------------------------------------------------------------------------------------------
# Flow definitions.


@dataclass(frozen=True)
class FlowDefinition:
    """One review workflow (A2I's flow definition); validated on construction."""

    name: str
    task_type: TaskType
    categories: tuple[str, ...] = ()
    task_count: int = 1
    task_availability_lifetime_s: float = DEFAULT_AVAILABILITY_LIFETIME_S
    task_time_limit_s: float = DEFAULT_TIME_LIMIT_S
    activation_conditions: Condition | None = None
    output_dir: Path | None = None

    def __post_init__(self) -> None:
        check_name(self.name, "flow name")
        if not isinstance(self.task_type, TaskType):
            object.__setattr__(self, "task_type", _task_type(self.task_type))
        object.__setattr__(self, "categories", tuple(self.categories))
        if self.task_type is not TaskType.SEGMENTATION and not self.categories:
            raise InvalidArgument(f"flow {self.name}: {self.task_type} flows need categories")
        if any(not isinstance(c, str) or not c for c in self.categories):
            raise InvalidArgument(f"flow {self.name}: categories must be non-empty strings")
        if len(set(self.categories)) != len(self.categories):
            raise InvalidArgument(f"flow {self.name}: categories repeat")
        if isinstance(self.task_count, bool) or not isinstance(self.task_count, int):
            raise InvalidArgument(f"flow {self.name}: task_count must be an integer")
        if not 1 <= self.task_count <= MAX_TASK_COUNT:
            raise InvalidArgument(f"flow {self.name}: task_count must be 1-{MAX_TASK_COUNT}, got {self.task_count}")
        for what in ("task_availability_lifetime_s", "task_time_limit_s"):
            seconds = _number(getattr(self, what), f"flow {self.name}: {what}", 1.0, 10 * 365 * 86_400.0)
            object.__setattr__(self, what, seconds)

    def activation(self, summary: ResultSummary) -> Activation:
        """Evaluate this flow's conditions; a flow without conditions only gets loops started by hand."""
        if self.activation_conditions is None:
            return Activation(False)
        return evaluate(self.activation_conditions, summary)

    def class_id(self, label: str) -> int:
        try:
            return self.categories.index(label)
        except ValueError:
            raise InvalidArgument(f"flow {self.name}: unknown category {label!r}") from None

    def to_dict(self) -> dict[str, Any]:
        """The config-file shape (JSON-ready), e.g. for a Describe call."""
        table: dict[str, Any] = {
            "name": self.name,
            "task_type": str(self.task_type),
            "categories": list(self.categories),
            "task_count": self.task_count,
            "task_availability_lifetime_s": self.task_availability_lifetime_s,
            "task_time_limit_s": self.task_time_limit_s,
        }
        if self.activation_conditions is not None:
            table["activation_conditions"] = conditions_to_json(self.activation_conditions)
        if self.output_dir is not None:
            table["output_dir"] = str(self.output_dir)
        return table

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], *, base_dir: Path | None = None) -> FlowDefinition:
        """Build from a config table; a relative ``output_dir`` is taken relative to ``base_dir``."""
        known = {
            "name",
            "task_type",
            "categories",
            "task_count",
            "task_availability_lifetime_s",
            "task_time_limit_s",
            "activation_conditions",
            "output_dir",
        }
        unknown = set(table) - known
        name = table.get("name")
        if unknown:
            raise InvalidArgument(f"flow {name!r}: unknown keys {sorted(unknown)}")
        if "name" not in table or "task_type" not in table:
            raise InvalidArgument(f"flow {name!r}: name and task_type are required")
        categories = table.get("categories", [])
        if not isinstance(categories, list | tuple):
            raise InvalidArgument(f"flow {name!r}: categories must be a list")
        conditions = table.get("activation_conditions")
        output_dir = table.get("output_dir")
        output_path: Path | None = None
        if output_dir is not None:
            if not isinstance(output_dir, str) or not output_dir:
                raise InvalidArgument(f"flow {name!r}: output_dir must be a non-empty string")
            output_path = Path(output_dir)
            if not output_path.is_absolute() and base_dir is not None:
                output_path = base_dir / output_path
        return cls(
            name=table["name"],
            task_type=_task_type(table["task_type"]),
            categories=tuple(categories),
            task_count=table.get("task_count", 1),
            task_availability_lifetime_s=table.get("task_availability_lifetime_s", DEFAULT_AVAILABILITY_LIFETIME_S),
            task_time_limit_s=table.get("task_time_limit_s", DEFAULT_TIME_LIMIT_S),
            activation_conditions=None if conditions is None else parse_conditions(conditions),
            output_dir=output_path,
        )


def _task_type(value: Any) -> TaskType:
    try:
        return TaskType(value)
    except ValueError:
        raise InvalidArgument(f"task_type {value!r} must be one of {', '.join(t.value for t in TaskType)}") from None


def parse_flows(document: Mapping[str, Any], *, base_dir: Path | None = None) -> dict[str, FlowDefinition]:
    """Flows from a decoded config document ``{"flows": [...]}``, by name, in file order."""
    extra = set(document) - {"flows"}
    if extra:
        raise InvalidArgument(f"unknown top-level keys {sorted(extra)}; flows go in a 'flows' list")
    tables = document.get("flows", [])
    if not isinstance(tables, list):
        raise InvalidArgument("'flows' must be a list of tables")
    flows: dict[str, FlowDefinition] = {}
    for table in tables:
        if not isinstance(table, Mapping):
            raise InvalidArgument("each flow must be a table")
        flow = FlowDefinition.from_dict(table, base_dir=base_dir)
        if flow.name in flows:
            raise InvalidArgument(f"flow {flow.name} is defined twice")
        flows[flow.name] = flow
    return flows


def load_flows(path: str | Path) -> dict[str, FlowDefinition]:
    """Read a ``.toml`` or ``.json`` flow file; relative output directories resolve beside it.

    A flow file (TOML or JSON) holds a list of flows::

        [[flows]]
        name = "chest-findings"
        task_type = "detection"                  # classification | detection | segmentation
        categories = ["nodule", "mass"]
        task_count = 2                           # reviewers per case, 1-3 as in A2I
        task_availability_lifetime_s = 86400     # A2I's TaskAvailabilityLifetimeInSeconds
        task_time_limit_s = 1800                 # A2I's TaskTimeLimitInSeconds: one lease
        output_dir = "review-output"             # relative to the flow file
        activation_conditions = '''
        {"Or": [{"ConditionType": "ConfidenceLessThan",
                 "ConditionParameters": {"Score": "max_box", "ConfidenceLessThan": 0.5}},
                {"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 5}}]}
        '''

    ``activation_conditions`` is A2I's HumanLoopActivationConditions JSON (a string, or the same shape
    as a table): ``{"Conditions": [...]}`` (members are independent: any true starts a loop), or one
    node: ``{"And": [...]}``, ``{"Or": [...]}`` or a simple condition. ``Score`` is ``top_class``,
    ``max_box``, ``min_prompt``, ``max_prompt`` or ``prompt:<prompt text>``; scores are probabilities
    in [0, 1] (not A2I's 0-100 Rekognition confidences, so a pasted ``90`` is refused).
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    try:
        document = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidArgument(f"{path.name}: {exc}") from None
    if not isinstance(document, Mapping):
        raise InvalidArgument(f"{path.name}: the top level must be an object")
    return parse_flows(document, base_dir=path.resolve().parent)


# ---------------------------------------------------------------------------------------------
# Answers.


def _box(box: Any, flow: FlowDefinition, index: int) -> None:
    if not isinstance(box, Mapping):
        raise InvalidArgument(f"boundingBoxes[{index}] must be an object")
    label = box.get("label")
    if label not in flow.categories:
        raise InvalidArgument(f"boundingBoxes[{index}].label {label!r} is not a category of flow {flow.name}")
    for key in ("left", "top"):
        _number(box.get(key), f"boundingBoxes[{index}].{key}", 0.0, math.inf)
    for key in ("width", "height"):
        if _number(box.get(key), f"boundingBoxes[{index}].{key}", 0.0, math.inf) <= 0:
            raise InvalidArgument(f"boundingBoxes[{index}].{key} must be positive")


def validate_answer(flow: FlowDefinition, answer: Any) -> None:
    """Check a reviewer's answer against the flow before it is stored, with a precise message.

    classification: ``{"label": <category>}``; detection: A2I's bounding-box template answer
    ``{"annotatedResult": {"boundingBoxes": [{"label", "left", "top", "width", "height"}],
    "inputImageProperties": {"width", "height"}}}`` in the reviewed image's pixels;
    segmentation: any JSON object, whose ``label`` (if present) is a category. Extra keys pass.
    """
    if not isinstance(answer, Mapping):
        raise InvalidArgument("an answer must be a JSON object")
    try:
        json.dumps(answer, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"the answer is not plain JSON: {exc}") from None
    if answer.get("rejected") is True:
        return  # "not reviewable" is a valid answer for every task type
    if flow.task_type is TaskType.CLASSIFICATION:
        if answer.get("label") not in flow.categories:
            raise InvalidArgument(f"label {answer.get('label')!r} is not a category of flow {flow.name}")
    elif flow.task_type is TaskType.DETECTION:
        result = answer.get("annotatedResult")
        if not isinstance(result, Mapping) or not isinstance(result.get("boundingBoxes"), list):
            raise InvalidArgument("a detection answer needs annotatedResult.boundingBoxes (a list)")
        for index, box in enumerate(result["boundingBoxes"]):
            _box(box, flow, index)
        size = result.get("inputImageProperties")
        if not isinstance(size, Mapping):
            raise InvalidArgument("a detection answer needs annotatedResult.inputImageProperties")
        for key in ("width", "height"):
            if _number(size.get(key), f"inputImageProperties.{key}", 1.0, math.inf) != int(size[key]):
                raise InvalidArgument(f"inputImageProperties.{key} must be an integer")
    elif "label" in answer and flow.categories and answer["label"] not in flow.categories:
        raise InvalidArgument(f"label {answer['label']!r} is not a category of flow {flow.name}")

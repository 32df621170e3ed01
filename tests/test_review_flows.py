"""Flow definitions: A2I-style activation conditions, deterministic sampling, config files, answer checks."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from services.review.flows import (
    AllOf,
    AnyOf,
    Confidence,
    FlowDefinition,
    InvalidArgument,
    ResultSummary,
    Sampling,
    TaskType,
    conditions_to_json,
    evaluate,
    load_flows,
    parse_conditions,
    sampling_bucket,
    summarize,
    validate_answer,
)

ISSUE_EXAMPLE = {
    "Or": [
        {
            "ConditionType": "ConfidenceLessThan",
            "ConditionParameters": {"Score": "top_class", "ConfidenceLessThan": 0.9},
        },
        {"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 5}},
    ]
}


def less_than(score: str, threshold: float) -> dict[str, Any]:
    return {
        "ConditionType": "ConfidenceLessThan",
        "ConditionParameters": {"Score": score, "ConfidenceLessThan": threshold},
    }


def at_least(score: str, threshold: float) -> dict[str, Any]:
    return {
        "ConditionType": "ConfidenceGreaterThanEquals",
        "ConditionParameters": {"Score": score, "ConfidenceGreaterThanEquals": threshold},
    }


def unsampled_hash(percentage: float) -> str:
    """An input hash that a Sampling condition of ``percentage`` does not pick."""
    for i in range(1000):
        candidate = hashlib.sha256(str(i).encode()).hexdigest()
        if sampling_bucket(candidate) >= percentage:
            return candidate
    raise AssertionError("no unsampled hash")


def test_issue_example_parses_into_a_tree() -> None:
    tree = parse_conditions(json.dumps(ISSUE_EXAMPLE))
    assert tree == AnyOf((Confidence("top_class", 0.9, below=True), Sampling(5.0)))
    assert parse_conditions(conditions_to_json(tree)) == tree


def test_confidence_less_than_on_the_top_class_score() -> None:
    tree = parse_conditions(ISSUE_EXAMPLE)
    quiet = unsampled_hash(5)
    unsure = evaluate(tree, ResultSummary(quiet, top_class_score=0.62))
    assert unsure.matched
    assert unsure.reasons == ("ConfidenceLessThan top_class 0.6200 < 0.9",)
    assert not evaluate(tree, ResultSummary(quiet, top_class_score=0.95)).matched
    assert not evaluate(tree, ResultSummary(quiet, top_class_score=0.9)).matched  # strictly less than


def test_greater_than_equals_is_inclusive() -> None:
    tree = parse_conditions(at_least("max_box", 0.3))
    assert evaluate(tree, ResultSummary("h", max_box_score=0.3)).matched
    assert not evaluate(tree, ResultSummary("h", max_box_score=0.29)).matched


def test_and_needs_every_member_and_or_any() -> None:
    band = {"And": [at_least("max_box", 0.2), less_than("max_box", 0.6)]}
    tree = parse_conditions(band)
    assert evaluate(tree, ResultSummary("h", max_box_score=0.4)).matched
    assert evaluate(tree, ResultSummary("h", max_box_score=0.4)).reasons == (
        "ConfidenceGreaterThanEquals max_box 0.4000 >= 0.2",
        "ConfidenceLessThan max_box 0.4000 < 0.6",
    )
    assert not evaluate(tree, ResultSummary("h", max_box_score=0.1)).matched
    assert not evaluate(tree, ResultSummary("h", max_box_score=0.7)).matched
    either = parse_conditions({"Or": [less_than("top_class", 0.5), less_than("prompt:liver", 0.5)]})
    assert evaluate(either, ResultSummary("h", top_class_score=0.9, prompt_scores={"liver": 0.2})).matched
    assert not evaluate(either, ResultSummary("h", top_class_score=0.9, prompt_scores={"liver": 0.8})).matched


def test_a2i_top_level_conditions_are_independent() -> None:
    tree = parse_conditions({"Conditions": [less_than("top_class", 0.5), {"And": [at_least("max_box", 0.1)]}]})
    assert isinstance(tree, AnyOf) and isinstance(tree.conditions[1], AllOf)
    assert evaluate(tree, ResultSummary("h", top_class_score=0.9, max_box_score=0.5)).matched
    assert not evaluate(tree, ResultSummary("h", top_class_score=0.9, max_box_score=0.05)).matched


def test_prompt_scores_by_name_minimum_and_maximum() -> None:
    summary = ResultSummary("h", prompt_scores={"liver": 0.95, "tumor": 0.4})
    assert evaluate(parse_conditions(less_than("min_prompt", 0.5)), summary).matched
    assert not evaluate(parse_conditions(less_than("max_prompt", 0.5)), summary).matched
    assert evaluate(parse_conditions(less_than("prompt:tumor", 0.5)), summary).matched
    assert not evaluate(parse_conditions(less_than("prompt:liver", 0.5)), summary).matched


def test_a_missing_score_never_matches() -> None:
    summary = ResultSummary("h", top_class_score=0.1)
    for condition in (less_than("max_box", 0.5), at_least("max_box", 0.0), less_than("prompt:lung", 0.5)):
        assert not evaluate(parse_conditions(condition), summary).matched


def test_summarize_treats_no_boxes_as_zero_confidence() -> None:
    summary = summarize("h", class_scores=[0.1, 0.7, 0.2], box_scores=[], prompt_scores={"lung": 0.5})
    assert summary.top_class_score == 0.7
    assert summary.max_box_score == 0.0
    assert summarize("h").max_box_score is None
    assert evaluate(parse_conditions(less_than("max_box", 0.5)), summary).matched


def test_sampling_is_deterministic_by_input_hash() -> None:
    tree = parse_conditions({"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 30}})
    hashes = [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(200)]
    first = [evaluate(tree, ResultSummary(h)).matched for h in hashes]
    again = [evaluate(tree, ResultSummary(h, top_class_score=0.5)).matched for h in hashes]
    assert first == again


def test_sampling_picks_about_the_configured_share() -> None:
    tree = parse_conditions({"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 5}})
    picked = sum(evaluate(tree, ResultSummary(f"{i:08d}")).matched for i in range(20_000))
    assert 900 <= picked <= 1100  # 1000 expected; the binomial SD is about 31
    never = parse_conditions({"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 0}})
    always = parse_conditions({"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 100}})
    assert not any(evaluate(never, ResultSummary(str(i))).matched for i in range(500))
    assert all(evaluate(always, ResultSummary(str(i))).matched for i in range(500))


def test_sampling_salt_picks_a_different_subset() -> None:
    plain = [sampling_bucket(str(i)) < 50 for i in range(400)]
    salted = [sampling_bucket(str(i), "second-flow") < 50 for i in range(400)]
    assert plain != salted
    tree = parse_conditions(
        {"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 50, "Salt": "second-flow"}}
    )
    assert [evaluate(tree, ResultSummary(str(i))).matched for i in range(400)] == salted


@pytest.mark.parametrize(
    ("conditions", "message"),
    [
        (less_than("top_class", 90), r"\[0, 1\]"),
        (less_than("second_class", 0.5), "Score"),
        (less_than("prompt:", 0.5), "Score"),
        ({"ConditionType": "ModerationLabelConfidenceCheck", "ConditionParameters": {}}, "ConditionType"),
        ({"ConditionType": "ConfidenceLessThan", "ConditionParameters": {"Score": "top_class"}}, "exactly"),
        ({"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 101}}, "100"),
        ({"ConditionType": "Sampling", "ConditionParameters": {"Percentage": 5}}, "RandomSamplingPercentage"),
        ({"Or": []}, "non-empty"),
        ({"Or": [less_than("top_class", 0.5)], "And": []}, "only key"),
        ({"ConditionType": "Sampling"}, "ConditionParameters"),
        ([less_than("top_class", 0.5)], "object"),
        ("{not json", "JSON"),
    ],
)
def test_bad_conditions_are_refused_with_a_precise_message(conditions: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_conditions(conditions if isinstance(conditions, str) else json.dumps(conditions))


def test_nesting_depth_is_limited() -> None:
    node: dict[str, Any] = less_than("top_class", 0.5)
    for _ in range(12):
        node = {"And": [node]}
    with pytest.raises(InvalidArgument, match="deeper"):
        parse_conditions(node)


TOML_FLOWS = '''
[[flows]]
name = "chest-findings"
task_type = "detection"
categories = ["nodule", "mass"]
task_count = 2
task_availability_lifetime_s = 86400
task_time_limit_s = 1800
output_dir = "review-output"
activation_conditions = """
{"Or": [{"ConditionType": "ConfidenceLessThan",
         "ConditionParameters": {"Score": "max_box", "ConfidenceLessThan": 0.5}},
        {"ConditionType": "Sampling", "ConditionParameters": {"RandomSamplingPercentage": 5}}]}
"""

[[flows]]
name = "chest-normal"
task_type = "classification"
categories = ["normal", "abnormal"]

[flows.activation_conditions]
Conditions = [
  {ConditionType = "ConfidenceLessThan", ConditionParameters = {Score = "top_class", ConfidenceLessThan = 0.8}},
]
'''


def test_load_flows_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "flows.toml"
    path.write_text(TOML_FLOWS)
    flows = load_flows(path)
    assert list(flows) == ["chest-findings", "chest-normal"]
    findings = flows["chest-findings"]
    assert findings.task_type is TaskType.DETECTION
    assert findings.categories == ("nodule", "mass")
    assert findings.task_count == 2
    assert findings.task_availability_lifetime_s == 86400
    assert findings.task_time_limit_s == 1800
    assert findings.output_dir == tmp_path / "review-output"
    assert findings.activation_conditions == AnyOf((Confidence("max_box", 0.5), Sampling(5.0)))
    normal = flows["chest-normal"]
    assert normal.task_count == 1 and normal.task_time_limit_s == 3600 and normal.task_availability_lifetime_s == 864000
    assert normal.output_dir is None
    assert normal.activation(ResultSummary("h", top_class_score=0.6)).matched


def test_load_flows_from_json_round_trips_to_dict(tmp_path: Path) -> None:
    toml_path = tmp_path / "flows.toml"
    toml_path.write_text(TOML_FLOWS)
    flows = load_flows(toml_path)
    json_path = tmp_path / "flows.json"
    json_path.write_text(json.dumps({"flows": [flow.to_dict() for flow in flows.values()]}))
    assert load_flows(json_path) == flows


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"name": "Chest", "task_type": "detection", "categories": ["a"]}, "lowercase"),
        ({"name": "a" * 64, "task_type": "detection", "categories": ["a"]}, "1-63"),
        ({"name": "x", "task_type": "ranking", "categories": ["a"]}, "task_type"),
        ({"name": "x", "task_type": "detection"}, "need categories"),
        ({"name": "x", "task_type": "detection", "categories": ["a", "a"]}, "repeat"),
        ({"name": "x", "task_type": "detection", "categories": ["a"], "task_count": 4}, "1-3"),
        ({"name": "x", "task_type": "detection", "categories": ["a"], "task_count": 0}, "1-3"),
        ({"name": "x", "task_type": "detection", "categories": ["a"], "task_time_limit_s": 0}, "task_time_limit_s"),
        ({"name": "x", "task_type": "detection", "categories": ["a"], "TaskCount": 2}, "unknown keys"),
        ({"task_type": "detection", "categories": ["a"]}, "required"),
    ],
)
def test_bad_flows_are_refused(tmp_path: Path, table: dict[str, Any], message: str) -> None:
    path = tmp_path / "flows.json"
    path.write_text(json.dumps({"flows": [table]}))
    with pytest.raises(InvalidArgument, match=message):
        load_flows(path)


def test_duplicate_flow_names_and_stray_keys_are_refused(tmp_path: Path) -> None:
    flow = {"name": "x", "task_type": "segmentation"}
    path = tmp_path / "flows.json"
    path.write_text(json.dumps({"flows": [flow, flow]}))
    with pytest.raises(InvalidArgument, match="twice"):
        load_flows(path)
    path.write_text(json.dumps({"flow": [flow]}))
    with pytest.raises(InvalidArgument, match="top-level"):
        load_flows(path)


def test_a_flow_without_conditions_never_activates() -> None:
    flow = FlowDefinition("manual", TaskType.SEGMENTATION)
    assert not flow.activation(ResultSummary("h", prompt_scores={"liver": 0.0})).matched


DETECTION = FlowDefinition("boxes", TaskType.DETECTION, ("nodule", "mass"))
CLASSIFICATION = FlowDefinition("labels", TaskType.CLASSIFICATION, ("normal", "abnormal"))


def box_answer(**box: Any) -> dict[str, Any]:
    base = {"label": "nodule", "left": 10, "top": 20, "width": 30, "height": 40} | box
    return {"annotatedResult": {"boundingBoxes": [base], "inputImageProperties": {"width": 1024, "height": 1024}}}


def test_valid_answers_pass() -> None:
    validate_answer(CLASSIFICATION, {"label": "abnormal", "comment": "extra keys pass"})
    validate_answer(DETECTION, box_answer())
    validate_answer(
        DETECTION, {"annotatedResult": {"boundingBoxes": [], "inputImageProperties": {"width": 8, "height": 8}}}
    )
    validate_answer(FlowDefinition("masks", TaskType.SEGMENTATION), {"accepted": True})


@pytest.mark.parametrize(
    ("flow", "answer", "message"),
    [
        (CLASSIFICATION, {"label": "cat"}, "not a category"),
        (CLASSIFICATION, ["normal"], "JSON object"),
        (CLASSIFICATION, {"label": "normal", "score": float("nan")}, "plain JSON"),
        (DETECTION, {"boxes": []}, "boundingBoxes"),
        (DETECTION, box_answer(label="cat"), "not a category"),
        (DETECTION, box_answer(width=0), "positive"),
        (DETECTION, box_answer(left=-1), "left"),
        (DETECTION, box_answer(top="7"), "number"),
        (DETECTION, {"annotatedResult": {"boundingBoxes": []}}, "inputImageProperties"),
    ],
)
def test_bad_answers_are_refused(flow: FlowDefinition, answer: Any, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        validate_answer(flow, answer)

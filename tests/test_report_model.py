"""The ``impression`` model in the real tritonserver: its contract, answers and evidence, scores, bad requests."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as triton_grpc
from tritonclient.utils import InferenceServerException

from services.report.data import Report, load_reports, split
from services.triton.client import check_contract
from services.triton.impression import CONTRACT, parse_answer
from training.build_impression import MODEL_DIR, load_engine

NORMAL = "The heart is normal in size. The mediastinum is unremarkable. The lungs are clear."
GARBAGE = [
    "qzxv wplk jjjrt vbnmq",
    "Le coeur est de taille normale, pas d'épanchement pleural visible.",  # shares 'pleural', 'visible'
    "!!!! ???? ....",
]


@pytest.fixture(scope="module")
def client(triton_url: str) -> triton_grpc.InferenceServerClient:
    return triton_grpc.InferenceServerClient(triton_url)


@pytest.fixture(scope="module")
def reports() -> tuple[list[Report], list[Report]]:
    return split(load_reports())


def _infer(client: triton_grpc.InferenceServerClient, texts: list[str]) -> triton_grpc.InferResult:
    data = np.array([[t.encode("utf-8")] for t in texts], dtype=np.object_)
    tensor = triton_grpc.InferInput("findings", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return client.infer("impression", [tensor])


def _answers(result: triton_grpc.InferResult) -> list:
    rows = zip(*(result.as_numpy(n).reshape(-1) for n in ("impression", "score", "evidence")), strict=True)
    return [parse_answer(i, s, e) for i, s, e in rows]


def test_model_is_ready_and_fits_the_contract(client: triton_grpc.InferenceServerClient) -> None:
    assert client.is_model_ready("impression")
    metadata = client.get_model_metadata("impression", as_json=True)
    config = client.get_model_config("impression", as_json=True)["config"]
    check_contract(CONTRACT, metadata, config)
    assert int(config["max_batch_size"]) >= 8


def test_the_index_holds_the_training_split_only(reports: tuple[list[Report], list[Report]]) -> None:
    train, _test = reports
    meta = json.loads((MODEL_DIR / load_engine().INDEX_META).read_text())
    assert meta["report_ids"] == [r.id for r in train]
    assert not any(i % 5 == 0 for i in meta["report_ids"])


def test_a_batch_answers_each_report_from_training_evidence(
    client: triton_grpc.InferenceServerClient, reports: tuple[list[Report], list[Report]]
) -> None:
    train, test = reports
    known = next(r for r in train if sum(t.findings == r.findings for t in train) == 1 and len(r.findings) > 200)
    unseen = [r for r in test if r.findings not in {t.findings for t in train}][:3]
    result = _infer(client, [known.findings, *(r.findings for r in unseen)])
    assert result.as_numpy("impression").shape == (4, 1) and result.as_numpy("score").dtype == np.float32
    answers = _answers(result)
    # A training report's own findings: it is the nearest report (similarity 1) and the score is high.
    assert answers[0].evidence[0]["report_id"] == known.id
    assert answers[0].evidence[0]["similarity"] == pytest.approx(1.0, abs=1e-3)
    assert answers[0].top_similarity == pytest.approx(1.0, abs=1e-3)
    train_ids = {r.id for r in train}
    for answer in answers:
        assert answer.impression and 0.0 <= answer.score <= 1.0
        assert len(answer.evidence) == 10
        assert {e["report_id"] for e in answer.evidence} <= train_ids  # never a test report
        similarities = [e["similarity"] for e in answer.evidence]
        assert similarities == sorted(similarities, reverse=True)
    impressions = {r.impression for r in train}
    assert all(a.impression in impressions for a in answers)


def test_normal_findings_score_high_and_garbage_low(client: triton_grpc.InferenceServerClient) -> None:
    normal, *garbage = _answers(_infer(client, [NORMAL, *GARBAGE]))
    assert normal.score > 0.8 and "acute" in normal.impression.lower()
    for answer in garbage:
        assert answer.score < 0.1, answer


def test_empty_findings_is_refused_and_the_model_keeps_serving(client: triton_grpc.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as refused:
        _infer(client, ["   "])
    assert "empty" in refused.value.message()
    assert _answers(_infer(client, [NORMAL]))[0].score > 0.8

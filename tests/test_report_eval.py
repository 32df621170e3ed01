"""The ROUGE harness (make eval-report) on a small subset of the test split, through the real Triton."""

from __future__ import annotations

from training.evaluate_report import METRICS, SEED_004, rouge, table
from training.evaluate_report import evaluate as evaluate_report


def test_rouge_is_the_stemmed_f1_of_rouge_score() -> None:
    assert rouge(["No acute disease."], ["No acute disease."]) == dict.fromkeys(METRICS, 1.0)
    scores = rouge(["No acute cardiopulmonary abnormality."], ["No acute cardiopulmonary abnormalities."])
    assert scores["rouge1"] == 1.0  # stemming: abnormality ~ abnormalities
    assert rouge(["Stable cardiomegaly."], ["No acute disease."])["rougeL"] == 0.0


def test_harness_scores_model_and_baselines_on_a_subset(triton_url: str) -> None:
    results = evaluate_report(triton_url, limit=60)
    assert results["split"]["test_reports"] == 60 and results["split"]["training_reports"] == 2747
    assert 0 < results["split"]["non_duplicate_test_reports"] < 60
    for subset in ("test", "non_duplicate"):
        systems = results["scores"][subset]
        assert set(systems) == {"impression", "most_frequent", "tfidf_1nn", "tfidf_10nn_consensus"}
        for scores in systems.values():
            assert set(scores) == set(METRICS) and all(0.0 <= v <= 1.0 for v in scores.values())
        assert systems["impression"]["rougeL"] > systems["most_frequent"]["rougeL"] + 0.05
    text = table(results)
    assert "TF-IDF 10-NN consensus" in text and f"{SEED_004['rougeL']:.4f}" in text
    assert set(results["met"]) == {"test.rougeL", "non_duplicate.rougeL"}

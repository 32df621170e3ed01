"""The calibration arithmetic against hand-computed values: ECE, reliability bins, AUROC, Spearman, routing, fits,
and the maps that model.py applies (triton_models/medgate_calibration.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import metrics as M
from training.calibration import detection_wrong, serving_calibration


def test_reliability_bins_and_ece_by_hand() -> None:
    scores = np.array([0.05, 0.15, 0.95, 0.95])
    outcomes = np.array([0, 0, 1, 0])
    bins = M.reliability_bins(scores, outcomes)
    assert [b.count for b in bins] == [1, 1, 0, 0, 0, 0, 0, 0, 0, 2]
    assert bins[9].mean_score == pytest.approx(0.95) and bins[9].mean_outcome == pytest.approx(0.5)
    assert np.isnan(bins[4].mean_score)
    # 1/4 * 0.05 + 1/4 * 0.15 + 2/4 * |0.95 - 0.5|
    assert M.ece(scores, outcomes) == pytest.approx(0.275)


def test_bin_edges_lower_edge_inclusive_and_one_in_the_last_bin() -> None:
    bins = M.reliability_bins(np.array([0.1, 1.0, 0.0]), np.array([1, 1, 0]))
    assert bins[1].count == 1 and bins[9].count == 1 and bins[0].count == 1


def test_perfect_calibration_has_zero_ece_and_real_valued_outcomes_work() -> None:
    assert M.ece(np.array([0.25, 0.25, 0.25, 0.25]), np.array([1, 0, 0, 0])) == pytest.approx(0.0)
    # LiteMedSAM's predicted IoU against the real IoU: a regression outcome
    assert M.ece(np.array([0.9, 0.8]), np.array([0.7, 0.8])) == pytest.approx(0.5 * 0.2)


def test_auroc_by_hand_with_ties() -> None:
    assert M.auroc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == pytest.approx(0.75)
    assert M.auroc(np.array([0.5, 0.5]), np.array([1, 0])) == pytest.approx(0.5)
    assert M.auroc(np.array([0.9, 0.1]), np.array([1, 0])) == pytest.approx(1.0)
    assert np.isnan(M.auroc(np.array([0.1, 0.2]), np.array([1, 1])))


def test_spearman_by_hand() -> None:
    # 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 60
    assert M.spearman(np.array([1, 2, 3, 4]), np.array([1, 3, 2, 4])) == pytest.approx(0.8)
    assert M.spearman(np.array([1.0, 2.0, 3.0]), np.array([30.0, 20.0, 10.0])) == pytest.approx(-1.0)
    assert np.array_equal(M.rankdata(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])


def test_routing_shares() -> None:
    sent, caught = M.routing(np.array([0.2, 0.7, 0.4, 0.9]), np.array([1, 0, 0, 1]), 0.5)
    assert (sent, caught) == (0.5, 0.5)


def test_isotonic_pools_adjacent_violators() -> None:
    xs, ys = M.fit_isotonic(np.array([1.0, 2.0, 3.0, 4.0]), np.array([1.0, 0.0, 1.0, 1.0]))
    assert xs == [1.0, 2.0, 3.0, 4.0] and ys == [0.5, 0.5, 1.0, 1.0]
    xs, ys = M.fit_isotonic(np.array([0.3, 0.3, 0.1]), np.array([1.0, 0.0, 0.0]))  # tied scores: one knot
    assert xs == [0.1, 0.3] and ys == [0.0, 0.5]


def test_platt_and_temperature_recover_known_parameters() -> None:
    rng = np.random.default_rng(7)
    s = rng.uniform(0.01, 0.99, 40_000)
    z = np.log(s / (1 - s))
    y = (rng.uniform(size=s.size) < 1 / (1 + np.exp(-(2.0 * z + 0.5)))).astype(float)
    a, b = M.fit_platt(s, y)
    assert a == pytest.approx(2.0, abs=0.1) and b == pytest.approx(0.5, abs=0.1)
    y = (rng.uniform(size=s.size) < 1 / (1 + np.exp(-z / 2.0))).astype(float)
    assert M.fit_temperature(s, y) == pytest.approx(2.0, rel=0.08)


def test_match_detections_counts_one_hit_per_true_box() -> None:
    truth = np.array([[0, 0, 10, 10]])
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60]])
    hits = M.match_detections(boxes, np.array([0.6, 0.9, 0.8]), truth)
    assert hits.tolist() == [False, True, False]  # the higher score takes the one true box
    # the answer at the 0.5 operating point has a false box, so the image is wrong; without it, right
    assert detection_wrong(boxes, np.array([0.6, 0.9, 0.8]), truth)
    assert detection_wrong(boxes, np.array([0.6, 0.9, 0.1]), truth)  # a duplicate of the true box is false
    assert not detection_wrong(boxes, np.array([0.3, 0.9, 0.1]), truth)
    assert detection_wrong(boxes[:0], np.zeros(0), truth)  # a missed lesion


def test_serving_maps_by_hand(tmp_path: Path) -> None:
    cal = serving_calibration()
    platt = {"method": "platt", "a": 1.0, "b": 0.0}
    assert cal.apply_map(platt, np.array([0.3, 0.8])) == pytest.approx([0.3, 0.8], abs=1e-6)
    temperature = {"method": "platt", "a": 0.5, "b": 0.0}  # T = 2: logit(0.8) = ln 4 -> ln 2 -> 2/3
    assert cal.apply_map(temperature, np.array([0.8]))[0] == pytest.approx(2 / 3, abs=1e-6)
    iso = {"method": "isotonic", "x": [0.2, 0.6], "y": [0.1, 0.9]}
    assert cal.apply_map(iso, np.array([0.0, 0.4, 1.0])) == pytest.approx([0.1, 0.5, 0.9], abs=1e-6)
    head = {"method": "logistic", "features": ["a", "b"], "weights": [1.0, -2.0], "bias": 0.5, "then": iso}
    # z = 0.5 + 1.5 - 2 = 0 -> 0.5 -> isotonic 0.5 (between the knots: 0.1 + 0.8 * 0.75 = 0.7)
    assert cal.apply_map(head, np.zeros(1), {"a": np.array([1.5]), "b": np.array([1.0])})[0] == pytest.approx(0.7)
    features = cal.mask_features(np.array([0.5, 0.0]), np.array([np.e - 1, 0.0]), np.array([0.9, 0.2]))
    assert features["empty"].tolist() == [0.0, 1.0]
    assert features["empty_peak"] == pytest.approx([0.0, np.log(0.2 / 0.8)])  # only an empty mask reads its peak
    assert features["logit_score"] == pytest.approx([0.0, 0.0]) and features["log_area"] == pytest.approx([1.0, 0.0])

    assert cal.Calibration.load(str(tmp_path))("scores", np.array([0.3]))[0] == pytest.approx(0.3)  # no file
    (tmp_path / "calibration.json").write_text(json.dumps({"version": 1, "scores": {"s": {"method": "sorcery"}}}))
    with pytest.raises(ValueError, match="sorcery"):
        cal.Calibration.load(str(tmp_path))
    (tmp_path / "calibration.json").write_text(json.dumps({"version": 1, "scores": {"s": iso}}))
    loaded = cal.Calibration.load(str(tmp_path))
    assert loaded("s", np.array([0.4]))[0] == pytest.approx(0.5) and loaded("other", np.array([0.4]))[
        0
    ] == pytest.approx(0.4)


def test_shipped_calibration_files_load_and_are_increasing_where_order_matters() -> None:
    cal = serving_calibration()
    root = Path(__file__).resolve().parents[1] / "triton_models"
    grid = np.linspace(0.01, 0.99, 99)
    for model, name in (("classifier", "lesion_probability"), ("detector", "scores")):
        loaded = cal.Calibration.load(str(root / model / "1"))
        assert name in loaded, f"{model} ships no calibration for {name}"
        assert np.all(np.diff(loaded(name, grid)) > 0), f"{model}: the map must keep the order (AP, decisions)"
    head = cal.Calibration.load(str(root / "segmenter_text" / "1"))
    assert "lesion" in head

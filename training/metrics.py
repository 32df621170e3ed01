"""Pure score metrics and calibration fits (numpy only): ECE, reliability bins, AUROC, Spearman, Platt, isotonic.

Kept free of Triton, torch and the phantoms so the review-retraining work (issue 17) and the tests can use them
as plain functions. A *score* is a number in [0, 1] a model returns; an *outcome* is what it should predict: 1/0
(right or wrong) for a classifier, a detection or a mask, or a real value in [0, 1] (LiteMedSAM's real IoU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from services.imaging.boxes import box_iou

ECE_BINS = 10


@dataclass(frozen=True)
class ReliabilityBin:
    """One of the equal-width score bins: [low, high), the last one closed."""

    low: float
    high: float
    count: int
    mean_score: float  # nan when empty
    mean_outcome: float  # nan when empty


def reliability_bins(scores: np.ndarray, outcomes: np.ndarray, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1]; a score of exactly 1.0 falls in the last bin."""
    s = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 0.0, 1.0)
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"{s.size} scores but {y.size} outcomes")
    index = np.minimum((s * bins).astype(np.int64), bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        n = int(members.sum())
        out.append(
            ReliabilityBin(
                low=b / bins,
                high=(b + 1) / bins,
                count=n,
                mean_score=float(s[members].mean()) if n else float("nan"),
                mean_outcome=float(y[members].mean()) if n else float("nan"),
            )
        )
    return out


def ece(scores: np.ndarray, outcomes: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: sum over bins of (bin share) * |mean score - mean outcome|; nan when empty."""
    table = reliability_bins(scores, outcomes, bins)
    total = sum(b.count for b in table)
    if total == 0:
        return float("nan")
    return float(sum(b.count / total * abs(b.mean_score - b.mean_outcome) for b in table if b.count))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum (Mann-Whitney) statistic, ties counted half; nan with one class."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    p = np.asarray(positives).astype(bool).reshape(-1)
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy's ``rankdata(method='average')``)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(v, kind="mergesort")
    sorted_v = v[order]
    starts = np.concatenate([[True], sorted_v[1:] != sorted_v[:-1]])
    group = np.cumsum(starts) - 1
    first = np.nonzero(starts)[0]
    last = np.concatenate([first[1:], [len(v)]]) - 1
    ranks = np.empty(len(v))
    ranks[order] = (first[group] + last[group]) / 2.0 + 1.0
    return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (Pearson on average ranks); nan when either side is constant."""
    ra, rb = rankdata(a), rankdata(b)
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def routing(scores: np.ndarray, wrong: np.ndarray, threshold: float) -> tuple[float, float]:
    """(share of cases with score < threshold, share of the wrong cases among them); nan when no case is wrong."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    w = np.asarray(wrong).astype(bool).reshape(-1)
    sent = s < threshold
    sent_share = float(sent.mean()) if len(s) else float("nan")
    caught = float(sent[w].mean()) if w.any() else float("nan")
    return sent_share, caught


# ---------------------------------------------------------------------------------------------
# Fits: each returns the parameters of a monotone map that triton_models/medgate_calibration.py applies.


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1.0 - 1e-6)
    return np.log(p) - np.log1p(-p)


def fit_logistic(features: np.ndarray, outcomes: np.ndarray, *, l2: float = 1e-3, steps: int = 100) -> np.ndarray:
    """Weights w (last one the bias) of p = sigmoid(features @ w[:-1] + w[-1]) by Newton's method on log loss.

    ``outcomes`` may be soft (in [0, 1]). A small L2 penalty (not on the bias) keeps separable data finite.
    """
    x = np.asarray(features, dtype=np.float64)
    x = x.reshape(len(x), -1)
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    design = np.hstack([x, np.ones((len(x), 1))])
    w = np.zeros(design.shape[1])
    penalty = np.full(design.shape[1], l2 * len(y))
    penalty[-1] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + penalty * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-9:
            break
    return w


def fit_platt(scores: np.ndarray, outcomes: np.ndarray) -> tuple[float, float]:
    """(a, b) of p = sigmoid(a * logit(score) + b); with b = 0 and a = 1/T it is temperature scaling."""
    w = fit_logistic(_logit(scores)[:, None], outcomes, l2=0.0)
    return float(w[0]), float(w[1])


def fit_temperature(scores: np.ndarray, outcomes: np.ndarray) -> float:
    """T minimising the log loss of sigmoid(logit(score) / T) (golden-section search over log T)."""
    z = _logit(scores)
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)

    def loss(log_t: float) -> float:
        p = np.clip(1.0 / (1.0 + np.exp(-z / np.exp(log_t))), 1e-12, 1 - 1e-12)
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    lo, hi = np.log(0.05), np.log(20.0)
    ratio = (np.sqrt(5.0) - 1) / 2
    for _ in range(80):
        a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
        if loss(a) < loss(b):
            hi = b
        else:
            lo = a
    return float(np.exp((lo + hi) / 2))


def fit_isotonic(scores: np.ndarray, outcomes: np.ndarray) -> tuple[list[float], list[float]]:
    """Knots (x, y) of the non-decreasing least-squares fit (pool adjacent violators), for linear interpolation."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(outcomes, dtype=np.float64).reshape(-1)
    values, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)  # tied scores: one point
    sums = np.bincount(inverse, weights=y, minlength=len(values))
    # blocks: [sum of y, count, min x, max x]
    blocks: list[list[float]] = []
    for xi, total, n in zip(values, sums, counts, strict=True):
        blocks.append([float(total), float(n), float(xi), float(xi)])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] >= blocks[-1][0] / blocks[-1][1]:
            top = blocks.pop()
            blocks[-1][0] += top[0]
            blocks[-1][1] += top[1]
            blocks[-1][3] = top[3]
    xs: list[float] = []
    ys: list[float] = []
    for total, count, low, high in blocks:
        level = total / count
        for x in (low, high) if high > low else (low,):
            xs.append(float(x))
            ys.append(float(level))
    return xs, ys


def match_detections(boxes: np.ndarray, scores: np.ndarray, truth: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """True positive flag per detection: greedy in descending score, each true box matched once at IoU >= ``iou``.

    The matching AP50 uses (``training.evaluate.average_precision``), so a detection's outcome is what AP counts.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    t = np.asarray(truth, dtype=np.float64).reshape(-1, 4)
    hits = np.zeros(len(b), dtype=bool)
    if len(b) == 0 or len(t) == 0:
        return hits
    overlaps = box_iou(b, t)
    used = np.zeros(len(t), dtype=bool)
    for index in np.argsort(-np.asarray(scores, dtype=np.float64).reshape(-1), kind="stable"):
        best = int(np.argmax(overlaps[index]))
        if overlaps[index, best] >= iou and not used[best]:
            used[best] = True
            hits[index] = True
    return hits

"""ROUGE of the ``impression`` model on the fixed test split of the IU reports, through a running Triton.

    python -m training.evaluate_report [--url host:port] [--limit N] [--out bench/results/report.json]

Starts the embedded tritonserver on free ports with the ``impression`` model alone (or uses ``--url``),
sends every test-split findings text through tritonclient gRPC as the gateway does, and scores the answers
with the ``rouge-score`` package (Porter stemming): ROUGE-1/2/L/Lsum F1, averaged over reports, on the
whole test split and on its non-duplicate part (test findings that do not appear verbatim among the
training findings). In the same run and on the same split it scores three baselines built from the
training split only: the most frequent training impression, TF-IDF 1-nearest-neighbour retrieval, and
10-nearest-neighbour consensus. The seed's FLAN-T5 XL numbers are printed beside them for reference
(a different model on 2,000 IU reports). The JSON holds aggregate numbers only, no report text.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import socket
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from services.report.data import Report, load_reports, split
from training.build_impression import MODEL_DIR, load_engine, rouge_tokenizer

METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
SEED_004 = {"rouge1": 0.466, "rouge2": 0.3125, "rougeL": 0.4525}  # FLAN-T5 XL, 2,000 IU reports
TARGETS = {"test.rougeL": 0.66, "non_duplicate.rougeL": 0.56}
MODEL = "impression"
BATCH = 8
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"(?u)\b\w\w+\b")


def _lsum_form(text: str) -> str:
    """rougeLsum reads sentences from newlines."""
    return "\n".join(s for s in _SENTENCE_END.split(text.strip()) if s)


def rouge(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F1 over pairs (rouge-score, Porter stemming)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(METRICS), use_stemmer=True)
    totals = dict.fromkeys(METRICS, 0.0)
    for reference, prediction in zip(references, predictions, strict=True):
        scores = scorer.score(_lsum_form(reference), _lsum_form(prediction))
        for metric in METRICS:
            totals[metric] += scores[metric].fmeasure
    count = max(len(references), 1)
    return {metric: round(total / count, 4) for metric, total in totals.items()}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); nan when either side is constant."""

    def ranks(values: np.ndarray) -> np.ndarray:
        order = np.argsort(values, kind="stable")
        ranked = np.empty(len(values))
        ranked[order] = np.arange(len(values), dtype=np.float64)
        for value in np.unique(values):  # ties share their mean rank
            tied = values == value
            ranked[tied] = ranked[tied].mean()
        return ranked

    if len(a) < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


class PlainTfidf:
    """The textbook baseline: word-unigram TF-IDF (lower case, smooth IDF, L2) with cosine retrieval."""

    def __init__(self, train: Sequence[Report]) -> None:
        documents = [Counter(_WORD.findall(r.findings.lower())) for r in train]
        frequency: Counter[str] = Counter()
        for document in documents:
            frequency.update(document.keys())
        self.vocabulary = {term: i for i, term in enumerate(sorted(frequency))}
        self.idf = np.array(
            [math.log((1 + len(documents)) / (1 + frequency[t])) + 1.0 for t in self.vocabulary], np.float32
        )
        self.matrix = np.stack([self._vector(d) for d in documents])
        self.impressions = [r.impression for r in train]

    def _vector(self, counts: Counter[str]) -> np.ndarray:
        vector = np.zeros(len(self.vocabulary), np.float32)
        for term, count in counts.items():
            index = self.vocabulary.get(term)
            if index is not None:
                vector[index] = count * self.idf[index]
        norm = float(np.linalg.norm(vector))
        return vector / norm if norm > 0 else vector

    def nearest(self, findings: str, k: int) -> list[int]:
        similarities = self.matrix @ self._vector(Counter(_WORD.findall(findings.lower())))
        return [int(i) for i in np.argsort(-similarities, kind="stable")[:k]]


def baseline_predictions(train: Sequence[Report], reports: Sequence[Report]) -> dict[str, list[str]]:
    """The three baselines' answers for ``reports``, each built from ``train`` only."""
    engine = load_engine()
    tokenize = rouge_tokenizer()
    most_frequent = Counter(r.impression for r in train).most_common(1)[0][0]
    tfidf = PlainTfidf(train)
    tokens = [tuple(tokenize(text)) for text in tfidf.impressions]
    nearest, consensus = [], []
    for report in reports:
        top = tfidf.nearest(report.findings, 10)
        nearest.append(tfidf.impressions[top[0]])
        # Minimum Bayes risk with equal votes: the neighbour impression with the highest total ROUGE-L to the rest.
        agreement = [sum(engine.rouge_l(tokens[a], tokens[b]) for b in top if b != a) for a in top]
        consensus.append(tfidf.impressions[top[int(np.argmax(agreement))]])
    return {
        "most_frequent": [most_frequent] * len(reports),
        "tfidf_1nn": nearest,
        "tfidf_10nn_consensus": consensus,
    }


def predict_through_triton(url: str, findings: Sequence[str], *, concurrency: int = 4) -> list[tuple[str, float]]:
    """(impression, score) for each findings text, via Triton's gRPC API in batches of BATCH."""
    import tritonclient.grpc as triton_grpc

    client = triton_grpc.InferenceServerClient(url)

    def call(chunk: Sequence[str]) -> list[tuple[str, float]]:
        data = np.array([[text.encode("utf-8")] for text in chunk], dtype=np.object_)
        tensor = triton_grpc.InferInput("findings", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        result = client.infer(MODEL, [tensor], client_timeout=120)
        impressions = result.as_numpy("impression").reshape(-1)
        scores = result.as_numpy("score").reshape(-1)
        return [(i.decode("utf-8"), float(s)) for i, s in zip(impressions, scores, strict=True)]

    chunks = [findings[i : i + BATCH] for i in range(0, len(findings), BATCH)]
    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return [answer for answers in pool.map(call, chunks) for answer in answers]
    finally:
        client.close()


def non_duplicates(train: Sequence[Report], test: Sequence[Report]) -> list[Report]:
    """Test reports whose findings do not appear verbatim among the training findings."""
    seen = {r.findings for r in train}
    return [r for r in test if r.findings not in seen]


def evaluate(url: str, *, limit: int | None = None, reports: Sequence[Report] | None = None) -> dict[str, Any]:
    """Model and baselines on the test split (the first ``limit`` test reports by id when given)."""
    train, test = split(reports if reports is not None else load_reports())
    if limit:
        test = test[:limit]
    started = time.perf_counter()
    answers = predict_through_triton(url, [r.findings for r in test])
    seconds = time.perf_counter() - started
    predictions = {MODEL: [a[0] for a in answers], **baseline_predictions(train, test)}
    unique = {r.id for r in non_duplicates(train, test)}
    subsets = {"test": [True] * len(test), "non_duplicate": [r.id in unique for r in test]}
    results: dict[str, Any] = {
        "split": {
            "rule": "test: file id % 5 == 0; training: the rest",
            "training_reports": len(train),
            "test_reports": len(test),
            "non_duplicate_test_reports": len(unique),
        },
        "model": {"name": MODEL, "reports_per_second": round(len(test) / seconds, 1) if seconds > 0 else None},
        "scores": {},
        "seed_004_flan_t5_xl": SEED_004,
        "targets": TARGETS,
    }
    for subset, mask in subsets.items():
        references = [r.impression for r, keep in zip(test, mask, strict=True) if keep]
        results["scores"][subset] = {
            name: rouge(references, [p for p, keep in zip(values, mask, strict=True) if keep])
            for name, values in predictions.items()
        }
    model_scores = np.array([a[1] for a in answers])
    results["model"]["mean_score"] = round(float(model_scores.mean()), 4) if len(answers) else None
    # Is the score meaningful? Its rank correlation with each report's ROUGE-L.
    per_report = [rouge([r.impression], [p])["rougeL"] for r, p in zip(test, predictions[MODEL], strict=True)]
    results["model"]["score_spearman_vs_rougeL"] = round(spearman(model_scores, np.array(per_report)), 4)
    results["met"] = {
        key: results["scores"][key.split(".")[0]][MODEL][key.split(".")[1]] >= target
        for key, target in TARGETS.items()
    }
    return results


def table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per system and subset, the seed's numbers last."""
    names = {
        MODEL: "**medgate impression** (retrieval + MBR consensus)",
        "most_frequent": "most frequent impression",
        "tfidf_1nn": "TF-IDF 1-NN",
        "tfidf_10nn_consensus": "TF-IDF 10-NN consensus",
    }
    split_info = results["split"]
    sizes = {"test": split_info["test_reports"], "non_duplicate": split_info["non_duplicate_test_reports"]}
    lines = [
        "| subset | system | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum |",
        "|---|---|---|---|---|---|",
    ]
    for subset, systems in results["scores"].items():
        for name, scores in systems.items():
            cells = " | ".join(f"{scores[m]:.4f}" for m in METRICS)
            lines.append(f"| {subset} ({sizes[subset]}) | {names.get(name, name)} | {cells} |")
    seed = results["seed_004_flan_t5_xl"]
    lines.append(
        f"| seed 004 (2,000 IU reports) | FLAN-T5 XL | {seed['rouge1']:.4f} | {seed['rouge2']:.4f} | "
        f"{seed['rougeL']:.4f} | - |"
    )
    targets = ", ".join(
        f"{key} ≥ {value} {'met' if results['met'][key] else 'NOT met'}" for key, value in results["targets"].items()
    )
    return "\n".join(lines) + f"\n\ntargets: {targets}"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def impression_triton(url: str | None) -> Iterator[str]:
    """``url``, or the embedded tritonserver on free ports serving a repository with only this model."""
    if url:
        yield url
        return
    from services.settings import load_settings
    from services.triton.embedded import EmbeddedTriton

    settings = load_settings()
    with tempfile.TemporaryDirectory(prefix="medgate-report-") as folder:
        repository = Path(folder)
        (repository / MODEL).symlink_to(MODEL_DIR.parent, target_is_directory=True)
        triton = dataclasses.replace(
            settings.triton,
            url="",
            model_repository=repository,
            http_port=_free_port(),
            grpc_port=_free_port(),
            metrics_port=_free_port(),
        )
        with EmbeddedTriton(triton):
            yield triton.grpc_url


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="Triton gRPC host:port (default: start the embedded one)")
    parser.add_argument("--limit", type=int, help="only the first N test reports (by file id)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/report.json"))
    args = parser.parse_args(argv)
    with impression_triton(args.url) as url:
        results = evaluate(url, limit=args.limit)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out}")
    return 0 if all(results["met"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

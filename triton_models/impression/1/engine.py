"""Findings -> impression by TF-IDF retrieval over training reports and minimum-Bayes-risk consensus.

Self-contained (numpy and the standard library), so the Triton model, the index builder
(``training/build_impression.py``) and the evaluation all run the same code.

* Findings are normalised (lower case, de-identification tokens such as ``XXXX`` and numbers folded)
  and embedded as two L2-normalised TF-IDF blocks, word 1-2 grams and character 3-5 grams within
  words, joined with weight ``word_weight``; cosine similarity against the training findings comes from
  an inverted index (CSC-like arrays) so no dense matrix is ever built.
* The ``k`` nearest training reports vote: each distinct impression among them is a candidate, and the
  answer is the candidate with the highest similarity-weighted ROUGE-L F1 agreement with the neighbours'
  impressions (weights ``similarity ** power``), i.e. the minimum-Bayes-risk choice under ROUGE-L.
* ``score`` = agreement x top similarity x vocabulary coverage (the share of the text's words that occur in
  the training findings), each 0..1: high when the words are known, close neighbours exist and agree; low
  for text unlike any training finding (garbage, another language that shares a few medical words).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INDEX_ARRAYS = "index.npz"
INDEX_META = "index.json"
FORMAT = 1

_DEID = re.compile(r"\bx{2,}\b", re.IGNORECASE)
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_NON_WORD = re.compile(r"[^a-z0-9]+")
_ROUGE_SPLIT = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Params:
    """Retrieval and consensus settings; tuned by cross-validation on the training split only."""

    word_weight: float = 0.7  # share of the word block in the joined vector (the rest: character n-grams)
    k: int = 30  # neighbours that vote
    power: float = 4.0  # vote weight = similarity ** power
    min_df: int = 1
    evidence: int = 3  # neighbours returned as evidence


def normalise_findings(text: str) -> str:
    """Lower case; ``XXXX`` (de-identified words) -> ``x``; numbers -> ``0``; punctuation -> spaces."""
    text = _DEID.sub(" x ", text.lower())
    text = _NUMBER.sub(" 0 ", text)
    return " ".join(_NON_WORD.sub(" ", text).split())


def impression_key(text: str) -> str:
    """Impressions that differ only in case, numbering or punctuation are one candidate."""
    return " ".join(_ROUGE_SPLIT.sub(" ", _NUMBER.sub(" ", text.lower())).split())


def rouge_tokens(text: str) -> list[str]:
    """rouge-score's tokenisation without the stemmer: lower case, alphanumeric runs."""
    return [t for t in _ROUGE_SPLIT.split(text.lower()) if t]


def features(normalised: str) -> tuple[list[str], list[str]]:
    """Word 1-2 grams and character 3-5 grams within space-padded words."""
    words = normalised.split()
    grams = [f"w:{w}" for w in words] + [f"w:{a} {b}" for a, b in itertools.pairwise(words)]
    chars: list[str] = []
    for word in words:
        padded = f" {word} "
        for n in (3, 4, 5):
            chars.extend(f"c:{padded[i : i + n]}" for i in range(len(padded) - n + 1))
    return grams, chars


def lcs_length(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the longest common subsequence (ROUGE-L's core), O(len(a) * len(b))."""
    if not a or not b:
        return 0
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """ROUGE-L F1 between two token-id sequences."""
    lcs = lcs_length(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


@dataclass
class Neighbour:
    index: int
    similarity: float


@dataclass
class Answer:
    impression: str
    score: float
    agreement: float
    top_similarity: float
    coverage: float
    neighbours: list[Neighbour] = field(default_factory=list)


class ImpressionIndex:
    """The built index: vocabulary, IDF, the inverted index and the training reports it answers from."""

    def __init__(
        self,
        *,
        vocabulary: dict[str, int],
        idf: np.ndarray,
        postings_indptr: np.ndarray,
        postings_docs: np.ndarray,
        postings_values: np.ndarray,
        findings: list[str],
        impressions: list[str],
        report_ids: list[int],
        candidate_of: np.ndarray,
        candidate_tokens: list[tuple[int, ...]],
        params: Params,
        info: dict[str, Any] | None = None,
    ) -> None:
        self.vocabulary = vocabulary
        self.idf = idf
        self.indptr = postings_indptr
        self.docs = postings_docs
        self.values = postings_values
        self.findings = findings
        self.impressions = impressions
        self.report_ids = report_ids
        self.candidate_of = candidate_of  # report -> distinct-impression id
        self.candidate_tokens = candidate_tokens  # distinct-impression id -> ROUGE token ids
        self.params = params
        self.info = info or {}
        self._agreement: dict[tuple[int, int], float] = {}

    # --- building ----------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        findings: list[str],
        impressions: list[str],
        report_ids: list[int],
        params: Params,
        *,
        tokenize: Any = rouge_tokens,
        info: dict[str, Any] | None = None,
    ) -> ImpressionIndex:
        """Index training reports. ``tokenize`` turns an impression into ROUGE tokens (pass rouge-score's)."""
        bags = [_bags(normalise_findings(text)) for text in findings]
        document_frequency: Counter[str] = Counter()
        for word_bag, char_bag in bags:
            document_frequency.update(word_bag.keys())
            document_frequency.update(char_bag.keys())
        terms = sorted(t for t, df in document_frequency.items() if df >= params.min_df)
        vocabulary = {t: i for i, t in enumerate(terms)}
        count = len(findings)
        idf = np.array([math.log((1 + count) / (1 + document_frequency[t])) + 1.0 for t in terms], np.float32)
        term_list: list[int] = []
        doc_list: list[int] = []
        value_list: list[float] = []
        for doc, (word_bag, char_bag) in enumerate(bags):
            vector = _vector(word_bag, char_bag, vocabulary, idf, params.word_weight)
            term_list.extend(vector.keys())
            value_list.extend(vector.values())
            doc_list.extend([doc] * len(vector))
        terms_of = np.array(term_list, np.int64)
        order = np.argsort(terms_of, kind="stable")  # postings by term, documents ascending within a term
        terms_of = terms_of[order]
        indptr = np.searchsorted(terms_of, np.arange(len(terms) + 1)).astype(np.int64)
        keys: dict[str, int] = {}
        candidate_of = np.zeros(count, np.int32)
        candidate_text: list[str] = []
        for doc, impression in enumerate(impressions):
            key = impression_key(impression)
            if key not in keys:
                keys[key] = len(candidate_text)
                candidate_text.append(impression)
            candidate_of[doc] = keys[key]
        token_ids: dict[str, int] = {}
        candidate_tokens = [
            tuple(token_ids.setdefault(t, len(token_ids)) for t in tokenize(text)) for text in candidate_text
        ]
        return cls(
            vocabulary=vocabulary,
            idf=idf,
            postings_indptr=indptr,
            postings_docs=np.array(doc_list, np.int32)[order],
            postings_values=np.array(value_list, np.float32)[order],
            findings=list(findings),
            impressions=list(impressions),
            report_ids=list(report_ids),
            candidate_of=candidate_of,
            candidate_tokens=candidate_tokens,
            params=params,
            info=info,
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(
            folder / INDEX_ARRAYS,
            idf=self.idf,
            indptr=self.indptr,
            docs=self.docs,
            values=self.values,
            candidate_of=self.candidate_of,
        )
        meta = {
            "format": FORMAT,
            "params": asdict(self.params),
            "info": self.info,
            "vocabulary": list(self.vocabulary),
            "findings": self.findings,
            "impressions": self.impressions,
            "report_ids": self.report_ids,
            "candidate_tokens": [list(t) for t in self.candidate_tokens],
        }
        (folder / INDEX_META).write_text(json.dumps(meta, separators=(",", ":")))

    @classmethod
    def load(cls, folder: Path) -> ImpressionIndex:
        meta = json.loads((folder / INDEX_META).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{folder / INDEX_META}: format {meta.get('format')} is not {FORMAT}; rebuild the index")
        with np.load(folder / INDEX_ARRAYS, allow_pickle=False) as arrays:
            return cls(
                vocabulary={t: i for i, t in enumerate(meta["vocabulary"])},
                idf=arrays["idf"],
                postings_indptr=arrays["indptr"],
                postings_docs=arrays["docs"],
                postings_values=arrays["values"],
                findings=meta["findings"],
                impressions=meta["impressions"],
                report_ids=meta["report_ids"],
                candidate_of=arrays["candidate_of"],
                candidate_tokens=[tuple(t) for t in meta["candidate_tokens"]],
                params=Params(**meta["params"]),
                info=meta.get("info", {}),
            )

    # --- answering ---------------------------------------------------------------------------

    def similarities(self, findings: str) -> np.ndarray:
        """Cosine similarity of ``findings`` to every training report's findings."""
        word_bag, char_bag = _bags(normalise_findings(findings))
        scores = np.zeros(len(self.findings), np.float32)
        for term, weight in _vector(word_bag, char_bag, self.vocabulary, self.idf, self.params.word_weight).items():
            start, stop = self.indptr[term], self.indptr[term + 1]
            scores[self.docs[start:stop]] += weight * self.values[start:stop]
        return scores

    def coverage(self, findings: str) -> float:
        """Share of the normalised words of ``findings`` that occur in the training findings (0 for no words)."""
        words = normalise_findings(findings).split()
        return sum(f"w:{w}" in self.vocabulary for w in words) / len(words) if words else 0.0

    def neighbours(self, similarities: np.ndarray, k: int, *, exclude: int | None = None) -> list[Neighbour]:
        scores = similarities
        if exclude is not None:
            scores = similarities.copy()
            scores[exclude] = -1.0
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]  # by similarity, ties by index: deterministic
        return [Neighbour(int(i), float(scores[i])) for i in top]

    def _rouge(self, a: int, b: int) -> float:
        if a == b:
            return 1.0
        key = (a, b) if a < b else (b, a)
        value = self._agreement.get(key)
        if value is None:
            value = rouge_l(self.candidate_tokens[a], self.candidate_tokens[b])
            if len(self._agreement) > 1_000_000:
                self._agreement.clear()
            self._agreement[key] = value
        return value

    def consensus(self, neighbours: list[Neighbour], power: float) -> tuple[int, float]:
        """(report index of the chosen impression, its weighted ROUGE-L agreement with the neighbours, 0..1)."""
        weights: dict[int, float] = {}
        first: dict[int, int] = {}
        for n in neighbours:
            candidate = int(self.candidate_of[n.index])
            weights[candidate] = weights.get(candidate, 0.0) + max(n.similarity, 0.0) ** power
            first.setdefault(candidate, n.index)
        total = sum(weights.values())
        if total <= 0.0:
            return neighbours[0].index, 0.0
        best, best_utility = -1, -1.0
        for candidate in first:  # in neighbour order, so ties go to the nearer report
            utility = sum(w * self._rouge(candidate, other) for other, w in weights.items())
            if utility > best_utility + 1e-12:
                best, best_utility = candidate, utility
        return first[best], best_utility / total

    def answer(
        self, findings: str, *, k: int | None = None, power: float | None = None, exclude: int | None = None
    ) -> Answer:
        k = k or self.params.k
        power = self.params.power if power is None else power
        similarities = self.similarities(findings)
        neighbours = self.neighbours(similarities, k, exclude=exclude)
        chosen, agreement = self.consensus(neighbours, power)
        top = max(neighbours[0].similarity, 0.0)
        coverage = self.coverage(findings)
        return Answer(
            impression=self.impressions[chosen],
            score=float(min(1.0, agreement * top * coverage)),
            agreement=float(agreement),
            top_similarity=float(top),
            coverage=float(coverage),
            neighbours=neighbours,
        )

    def evidence(self, answer: Answer, count: int | None = None) -> list[dict[str, Any]]:
        """The nearest training reports behind an answer (findings, impression, similarity, report id)."""
        count = self.params.evidence if count is None else count
        return [
            {
                "report_id": self.report_ids[n.index],
                "similarity": round(n.similarity, 4),
                "findings": self.findings[n.index],
                "impression": self.impressions[n.index],
            }
            for n in answer.neighbours[:count]
        ]


def _bags(normalised: str) -> tuple[Counter[str], Counter[str]]:
    words, chars = features(normalised)
    return Counter(words), Counter(chars)


def _vector(
    word_bag: Counter[str], char_bag: Counter[str], vocabulary: dict[str, int], idf: np.ndarray, word_weight: float
) -> dict[int, float]:
    """Sublinear-TF x IDF per block, each block L2-normalised, joined as sqrt(w)*word + sqrt(1-w)*char."""
    vector: dict[int, float] = {}
    for bag, share in ((word_bag, word_weight), (char_bag, 1.0 - word_weight)):
        block = {}
        for term, count in bag.items():
            index = vocabulary.get(term)
            if index is not None:
                block[index] = (1.0 + math.log(count)) * float(idf[index])
        norm = math.sqrt(sum(v * v for v in block.values()))
        if norm > 0 and share > 0:
            scale = math.sqrt(share) / norm
            for index, value in block.items():
                vector[index] = vector.get(index, 0.0) + value * scale
    return vector

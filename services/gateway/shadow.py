"""Shadow a role's candidate version: a sampled share of live answers is computed again by it, off the caller's path.

The caller's answer is built from the serving version and returned before the candidate is asked; the shadow
call runs as a background task with its own deadline (``versions.shadow_timeout_s``), at most
``versions.shadow_max_in_flight`` at once per worker (a request beyond that is counted ``skipped``, never
queued), and its failure is only counted. Each comparison goes to Prometheus
(``medgate_shadow_comparisons{role, serving, candidate, outcome}``) and one JSON line of counts and scores to
``versions.shadow_report_file`` (no image, no patient data), which ``medgate models shadow-report`` sums up.

Agreement: a classification agrees when both versions give the same top class; a detection agrees when every
box scoring at least ``shadow_min_score`` on either side has a partner on the other side at IoU >=
``shadow_iou`` (the boxes a reviewer would see).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.imaging.boxes import box_iou
from services.metrics import SHADOW_COMPARISONS
from services.settings import VersionSettings

log = logging.getLogger("medgate.gateway.shadow")


@dataclass(frozen=True)
class Comparison:
    agree: bool
    serving_count: int
    candidate_count: int
    matched: int
    serving_top: float
    candidate_top: float


def compare_detections(
    serving: tuple[np.ndarray, np.ndarray], candidate: tuple[np.ndarray, np.ndarray], *, iou: float, min_score: float
) -> Comparison:
    """Greedy one-to-one matching of the boxes each side scores at least ``min_score``, highest score first."""
    (sb, ss), (cb, cs) = serving, candidate
    sb, cb = sb[ss >= min_score].reshape(-1, 4), cb[cs >= min_score].reshape(-1, 4)
    matched = 0
    if len(sb) and len(cb):
        overlaps = box_iou(sb, cb)
        used = np.zeros(len(cb), dtype=bool)
        for row in overlaps:
            row = np.where(used, -1.0, row)
            best = int(np.argmax(row))
            if row[best] >= iou:
                used[best] = True
                matched += 1
    return Comparison(
        agree=matched == len(sb) == len(cb),
        serving_count=len(sb),
        candidate_count=len(cb),
        matched=matched,
        serving_top=float(ss.max()) if len(ss) else 0.0,
        candidate_top=float(cs.max()) if len(cs) else 0.0,
    )


def compare_classes(serving: np.ndarray, candidate: np.ndarray) -> Comparison:
    same = int(np.argmax(serving)) == int(np.argmax(candidate))
    return Comparison(
        agree=same,
        serving_count=1,
        candidate_count=1,
        matched=int(same),
        serving_top=float(np.max(serving)),
        candidate_top=float(np.max(candidate[int(np.argmax(serving))])),
    )


def append_line(path: Path, record: dict[str, Any]) -> None:
    """One JSON line, appended in one write (O_APPEND), so several workers' lines never interleave."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


class Shadow:
    """Sends a sampled share of one gateway worker's classify/detect images to the role's candidate version."""

    def __init__(
        self,
        models: Any,  # services.triton.client.TritonModels (typed loosely: this module never imports grpc)
        settings: VersionSettings,
        *,
        sample: Callable[[], float] | None = None,
    ) -> None:
        self.models = models
        self.settings = settings
        self._sample = sample or random.Random().random
        self._tasks: set[asyncio.Task[None]] = set()

    def _candidate(self, role: str) -> str:
        versions = getattr(self.models, "versions", None)
        if versions is None or self.settings.shadow_fraction <= 0:
            return ""
        return str(versions.candidate(role))

    def _start(self, role: str, name: str, serving: str, candidate: str, work: Coroutine[Any, Any, None]) -> None:
        if len(self._tasks) >= self.settings.shadow_max_in_flight:
            work.close()
            SHADOW_COMPARISONS.labels(role=role, serving=serving, candidate=candidate, outcome="skipped").inc()
            return
        task = asyncio.get_running_loop().create_task(work, name=f"shadow {name} v{candidate}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def offer_detection(
        self, image: np.ndarray, name: str, serving: str, boxes: np.ndarray, scores: np.ndarray
    ) -> None:
        """After the answer is built: maybe compare the candidate's detections on ``image`` with these."""
        candidate = self._candidate("detector")
        if not candidate or self._sample() >= self.settings.shadow_fraction:
            return
        answer = (boxes.copy(), scores.copy())

        async def run(deadline: float) -> Comparison:
            theirs, their_scores, _ = await self.models.detect(image, deadline=deadline, version=candidate)
            return compare_detections(
                answer,
                (theirs, their_scores),
                iou=self.settings.shadow_iou,
                min_score=self.settings.shadow_min_score,
            )

        self._start("detector", name, serving, candidate, self._compare("detector", name, serving, candidate, run))

    def offer_classification(self, image: np.ndarray, name: str, serving: str, probabilities: np.ndarray) -> None:
        candidate = self._candidate("classifier")
        if not candidate or self._sample() >= self.settings.shadow_fraction:
            return
        answer = probabilities.copy()

        async def run(deadline: float) -> Comparison:
            theirs = await self.models.classify(image, deadline=deadline, version=candidate)
            return compare_classes(answer, theirs)

        self._start("classifier", name, serving, candidate, self._compare("classifier", name, serving, candidate, run))

    async def _compare(
        self,
        role: str,
        name: str,
        serving: str,
        candidate: str,
        run: Callable[[float], Coroutine[Any, Any, Comparison]],
    ) -> None:
        started = time.perf_counter()
        record: dict[str, Any] = {"time": round(time.time(), 3), "role": role, "model": name}
        record |= {"serving": serving, "candidate": candidate}
        try:
            comparison = await run(time.monotonic() + self.settings.shadow_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the candidate failed: counted, never the caller's problem
            outcome = "error"
            record |= {"outcome": outcome, "error": type(exc).__name__}
        else:
            outcome = "agree" if comparison.agree else "disagree"
            record |= {"outcome": outcome, **comparison.__dict__}
        record["ms"] = round((time.perf_counter() - started) * 1000.0, 1)
        SHADOW_COMPARISONS.labels(role=role, serving=serving, candidate=candidate, outcome=outcome).inc()
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, append_line, self.settings.shadow_report_file, record
            )
        except OSError as exc:
            log.warning("shadow report %s cannot be written: %s", self.settings.shadow_report_file, exc.strerror)

    async def drain(self) -> None:
        """Wait for the shadow calls in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)


def summarize(path: Path, role: str) -> dict[str, Any]:
    """The report file's comparisons of ``role`` per (serving, candidate): counts, agreement, latency."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        lines = []
    for text in lines:
        try:
            record = json.loads(text)
        except ValueError:
            continue
        if record.get("role") != role:
            continue
        key = (str(record.get("serving", "")), str(record.get("candidate", "")))
        entry = pairs.setdefault(key, {"compared": 0, "agree": 0, "disagree": 0, "error": 0, "ms": []})
        outcome = record.get("outcome", "error")
        entry[outcome if outcome in ("agree", "disagree") else "error"] += 1
        entry["compared"] += 1
        entry["ms"].append(float(record.get("ms", 0.0)))
    out = {}
    for (serving, candidate), entry in pairs.items():
        judged = entry["agree"] + entry["disagree"]
        out[f"{serving}->{candidate}"] = {
            "serving": serving,
            "candidate": candidate,
            "compared": entry["compared"],
            "agree": entry["agree"],
            "disagree": entry["disagree"],
            "error": entry["error"],
            "agreement": round(entry["agree"] / judged, 4) if judged else None,
            "median_ms": round(float(np.median(entry["ms"])), 1) if entry["ms"] else None,
        }
    return out

"""Triton Python-backend model ``impression``: radiology findings -> impression, score and evidence.

Self-contained: numpy, the standard library and ``medgate_model_base.py`` at the repository root
(``engine.py`` beside this file holds the method).  ``index.npz`` and ``index.json`` beside it are
built from the training split of the Indiana University reports by ``python -m training.build_impression``
(CC BY-NC-ND 4.0 data: built at set-up, never committed).

Contract (see config.pbtxt): findings BYTES [B,1] -> impression BYTES [B,1], score FP32 [B,1],
evidence BYTES [B,1] (JSON). Every request gets exactly one response; a bad request gets an error
naming the problem (never the text, which is patient data) and the rest of the batch is served.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# The shared base sits at the repository root, which the stub does not put on sys.path; a __pycache__ folder
# there would be a model Triton cannot load (see medgate_model_base's docstring).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
from medgate_model_base import CANCELLED, Cancelled, Failed, Outputs, RequestError, TritonModel, input_array  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _load_engine(folder: str) -> ModuleType:
    """engine.py from the version folder, by path, under a name of its own (the builder loads it the same way)."""
    spec = importlib.util.spec_from_file_location("medgate_impression_engine", os.path.join(folder, "engine.py"))
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {os.path.join(folder, 'engine.py')}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class TritonPythonModel(TritonModel[list[str]]):
    default_name = "impression"
    default_max_batch = 16

    index: Any

    def setup(self, args: dict[str, str]) -> None:
        self.evidence_count = self.int_param("evidence_count", 10)
        self.max_chars = self.int_param("max_findings_chars", 20000)
        version_dir = self.version_dir
        engine = _load_engine(version_dir if os.path.isfile(os.path.join(version_dir, "engine.py")) else HERE)
        self.require_files(
            [engine.INDEX_ARRAYS, engine.INDEX_META], "run `python -m training.build_impression` (make setup does)"
        )
        self.index = engine.ImpressionIndex.load(Path(version_dir))
        info = self.index.info
        pb_utils.Logger.log_info(
            f"{self.name}: index of {len(self.index.findings)} training reports "
            f"(split: {info.get('split', '?')}), k={self.index.params.k}"
        )

    def parse(self, request: pb_utils.InferenceRequest) -> list[str]:
        values = input_array(request, "findings").reshape(-1)
        if values.size < 1:
            raise RequestError("input 'findings' has no elements")
        texts = []
        for position, value in enumerate(values):
            text = value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)
            if not text.strip():
                raise RequestError(f"findings {position} is empty")
            if len(text) > self.max_chars:
                raise RequestError(f"findings {position} is longer than {self.max_chars} characters")
            texts.append(text)
        return texts

    def _answer(self, text: str) -> tuple[str, float, str]:
        answer = self.index.answer(text)
        evidence = {
            "agreement": round(answer.agreement, 4),
            "top_similarity": round(answer.top_similarity, 4),
            "coverage": round(answer.coverage, 4),
            "k": len(answer.neighbours),
            "neighbours": self.index.evidence(answer, self.evidence_count),
        }
        return answer.impression, answer.score, json.dumps(evidence, ensure_ascii=False)

    def infer(self, batch: list[list[str]]) -> list[Outputs | Failed]:
        results: list[Outputs | Failed] = []
        for n, texts in enumerate(batch):
            try:
                answers = []
                for text in texts:  # one report is the unit of work: a request its client gave up stops here
                    self.check(n)
                    answers.append(self._answer(text))
            except Cancelled:
                results.append(CANCELLED)
                continue
            except Exception as exc:
                results.append(Failed(f"inference failed ({type(exc).__name__})"))
                continue
            impressions = np.array([[a[0].encode("utf-8")] for a in answers], dtype=np.object_)
            scores = np.array([[a[1]] for a in answers], dtype=np.float32)
            evidence = np.array([[a[2].encode("utf-8")] for a in answers], dtype=np.object_)
            results.append(
                [
                    pb_utils.Tensor("impression", impressions),
                    pb_utils.Tensor("score", scores),
                    pb_utils.Tensor("evidence", evidence),
                ]
            )
        return results

    def finalize(self) -> None:
        self.index = None

"""Triton Python-backend model ``impression``: radiology findings -> impression, score and evidence.

Self-contained: numpy and the standard library (``engine.py`` beside this file holds the method).
``index.npz`` and ``index.json`` beside it are built from the training split of the Indiana
University reports by ``python -m training.build_impression`` (CC BY-NC-ND 4.0 data: built at
set-up, never committed).

Contract (see config.pbtxt): findings BYTES [B,1] -> impression BYTES [B,1], score FP32 [B,1],
evidence BYTES [B,1] (JSON). Every request gets exactly one response; a bad request gets an error
naming the problem (never the text, which is patient data) and the rest of the batch is served.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))


class RequestError(ValueError):
    """A problem with one request; answered with an error response for that request only."""


def _load_engine(folder):
    """engine.py from the version folder, by path: Triton does not put model folders on sys.path."""
    spec = importlib.util.spec_from_file_location("medgate_impression_engine", os.path.join(folder, "engine.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


class TritonPythonModel:
    def initialize(self, args):
        self.name = args.get("model_name", "impression")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.evidence_count = int(params.get("evidence_count", "10") or 10)
        self.max_chars = int(params.get("max_findings_chars", "20000") or 20000)

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isdir(version_dir):
            version_dir = HERE
        engine = _load_engine(version_dir if os.path.isfile(os.path.join(version_dir, "engine.py")) else HERE)
        for required in (engine.INDEX_ARRAYS, engine.INDEX_META):
            if not os.path.isfile(os.path.join(version_dir, required)):
                raise RuntimeError(
                    f"{self.name}: missing {os.path.join(version_dir, required)}; "
                    "run `python -m training.build_impression` (make setup does)"
                )
        from pathlib import Path

        self.index = engine.ImpressionIndex.load(Path(version_dir))
        info = self.index.info
        pb_utils.Logger.log_info(
            f"{self.name}: index of {len(self.index.findings)} training reports "
            f"(split: {info.get('split', '?')}), k={self.index.params.k}"
        )

    def _parse(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, "findings")
        if tensor is None:
            raise RequestError("missing input 'findings'")
        values = tensor.as_numpy().reshape(-1)
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

    def _answer(self, text):
        answer = self.index.answer(text)
        evidence = {
            "agreement": round(answer.agreement, 4),
            "top_similarity": round(answer.top_similarity, 4),
            "coverage": round(answer.coverage, 4),
            "k": len(answer.neighbours),
            "neighbours": self.index.evidence(answer, self.evidence_count),
        }
        return answer.impression, answer.score, json.dumps(evidence, ensure_ascii=False)

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                if hasattr(request, "is_cancelled") and request.is_cancelled():
                    responses.append(_error(f"{self.name}: request cancelled", cancelled=True))
                    continue
                texts = self._parse(request)
            except RequestError as exc:
                responses.append(_error(f"{self.name}: {exc}", invalid=True))
                continue
            except Exception as exc:  # never let one request take the batch down
                responses.append(_error(f"{self.name}: could not read the request ({type(exc).__name__})"))
                continue
            try:
                answers = [self._answer(text) for text in texts]
            except Exception as exc:
                responses.append(_error(f"{self.name}: inference failed ({type(exc).__name__})"))
                continue
            impressions = np.array([[a[0].encode("utf-8")] for a in answers], dtype=np.object_)
            scores = np.array([[a[1]] for a in answers], dtype=np.float32)
            evidence = np.array([[a[2].encode("utf-8")] for a in answers], dtype=np.object_)
            responses.append(
                pb_utils.InferenceResponse(
                    output_tensors=[
                        pb_utils.Tensor("impression", impressions),
                        pb_utils.Tensor("score", scores),
                        pb_utils.Tensor("evidence", evidence),
                    ]
                )
            )
        return responses

    def finalize(self):
        self.index = None


def _error(message, invalid=False, cancelled=False):
    code = None
    if invalid:
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    elif cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)

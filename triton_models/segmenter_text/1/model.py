"""Triton Python-backend model ``segmenter_text``: MedImageParse-style text-prompt segmentation.

Self-contained: numpy, onnxruntime, the standard library and ``medgate_model_base.py`` at the repository root.
``model.onnx`` next to this file is built by ``python -m training.train_segmenter``: uint8 image
[B,1,1024,1024] -> masks uint8 [B,4,1024,1024] (0/1), scores fp32 [B,4] (mean probability inside each
mask, 0 if empty), areas fp32 [B,4] and peaks fp32 [B,4] (each channel's highest probability, added by
``training.segmenter_outputs``), for four channels: 0 = patient's left lung (image right on a PA
radiograph), 1 = patient's right lung (image left), 2 = heart, 3 = lesion.  The network runs once per
image whatever the prompts; each prompt then picks its channel(s) (a union for "lungs").

Scores: ``calibration.json`` beside the graph (``python -m training.fit_calibration``, fitted on the calibration
seed split) maps each channel's raw statistics to the probability that the prompt's mask is right (Dice >= 0.5;
an empty mask is right when there is nothing to find). The lesion channel's probabilities stay within 0.5..0.56,
so its raw mean sat at ~0.545 on every image; its score head reads the mean on the logit scale, the mask's area,
whether it is empty, and for an empty mask the channel's peak (``medgate_calibration.mask_features``). Channels
without a map keep the raw mean probability.

Contract (see config.pbtxt): image uint8 [B,1024,1024], prompts bytes [B,N] -> masks uint8
[B,N,1024,1024], scores fp32 [B,N], categories bytes [B,N].  Every request gets exactly one response;
all images of valid requests run as one ONNX Runtime call (chunks of max_batch_size); a bad request
(wrong shape, no prompts, a blank or unknown prompt) gets an error response naming the problem
(never image content) and the rest are still served.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

# The shared base sits at the repository root, which the stub does not put on sys.path; a __pycache__ folder
# there would be a model Triton cannot load (see medgate_model_base's docstring).
sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
from medgate_calibration import Calibration, mask_features  # noqa: E402
from medgate_model_base import (  # noqa: E402
    MODEL_SIZE,
    ImageBatchModel,
    Outputs,
    RequestError,
    check_images,
    input_array,
)

LEFT_LUNG, RIGHT_LUNG, HEART, LESION = 0, 1, 2, 3
CHANNEL_SCORES = ("left_lung", "right_lung", "heart", "lesion")  # calibration.json's names; a union is "lungs"
UNION_SCORE = "lungs"

# normalised prompt -> (channels, MedImageParse category)
_LUNG = "lung"
_HEART = "heart anatomies"
VOCABULARY: dict[str, tuple[tuple[int, ...], str]] = {
    "left lung": ((LEFT_LUNG,), _LUNG),
    "right lung": ((RIGHT_LUNG,), _LUNG),
    "lung": ((LEFT_LUNG, RIGHT_LUNG), _LUNG),
    "lungs": ((LEFT_LUNG, RIGHT_LUNG), _LUNG),
    "both lungs": ((LEFT_LUNG, RIGHT_LUNG), _LUNG),
    "lung fields": ((LEFT_LUNG, RIGHT_LUNG), _LUNG),
    "heart": ((HEART,), _HEART),
    "cardiac silhouette": ((HEART,), _HEART),
    "opacity": ((LESION,), "other lesion"),
    "opacities": ((LESION,), "other lesion"),
}
for _word in ("lesion", "nodule", "mass", "tumor", "tumour"):
    VOCABULARY[_word] = ((LESION,), "tumor")
    VOCABULARY["masses" if _word == "mass" else _word + "s"] = ((LESION,), "tumor")


Plan = list[list[tuple[tuple[int, ...], str]]]  # per image, per prompt: (channels, category)
Masks = tuple[np.ndarray, np.ndarray, np.ndarray]  # one image's masks [N,S,S], scores [N], categories [N]


def normalise_prompt(raw: object) -> str:
    if isinstance(raw, bytes | np.bytes_):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("a prompt is not valid UTF-8") from None
    return " ".join(str(raw).split()).lower()


class TritonPythonModel(ImageBatchModel[Plan, Masks]):
    default_name = "segmenter_text"
    default_max_batch = 4
    graph_outputs = ("masks", "scores", "areas", "peaks")
    rebuild = "python -m training.train_segmenter"

    def setup(self, args: dict[str, str]) -> None:
        self.max_prompts = self.int_param("max_prompts_per_image", 16)
        self.calibration = Calibration.load(self.version_dir)
        super().setup(args)

    def details(self) -> str:
        return f", {len(VOCABULARY)} prompt forms, {self.calibration.describe()}"

    def parse(self, request: pb_utils.InferenceRequest) -> tuple[np.ndarray, Plan]:
        image = input_array(request, "image")
        prompts = input_array(request, "prompts")
        check_images(image)
        if prompts.ndim != 2:
            raise RequestError(f"input 'prompts' must have shape [batch, N], got {list(prompts.shape)}")
        b = image.shape[0]
        if prompts.shape[0] != b:
            raise RequestError(f"input 'prompts' has batch {prompts.shape[0]} but 'image' has batch {b}")
        n = prompts.shape[1]
        if n == 0:
            raise RequestError("no prompts: 'prompts' must hold at least one text prompt per image")
        if n > self.max_prompts:
            raise RequestError(f"too many prompts: {n} per image, at most {self.max_prompts}")
        plan: Plan = []
        for k in range(b):
            row = []
            for j in range(n):
                text = normalise_prompt(prompts[k, j])
                if not text:
                    raise RequestError(f"prompts[{k}][{j}] is empty or blank")
                entry = VOCABULARY.get(text)
                if entry is None:
                    raise RequestError(
                        f"unknown prompt at prompts[{k}][{j}] (prompts are free text and never quoted back); "
                        "known prompts: " + ", ".join(sorted(VOCABULARY))
                    )
                row.append(entry)
            plan.append(row)
        return image, plan

    def _assemble(
        self,
        masks4: np.ndarray,
        scores4: np.ndarray,
        areas4: np.ndarray,
        peaks4: np.ndarray,
        row: list[tuple[tuple[int, ...], str]],
    ) -> Masks:
        """One image's four channels -> [N,1024,1024] masks, [N] scores, [N] categories."""
        n = len(row)
        masks = np.empty((n, MODEL_SIZE, MODEL_SIZE), np.uint8)
        scores = np.zeros((n,), np.float32)
        categories = np.empty((n,), dtype=np.object_)
        raw4 = np.where(areas4 > 0, scores4, 0.0)
        features4 = mask_features(raw4, areas4, peaks4)
        for j, (channels, category) in enumerate(row):
            if len(channels) == 1:
                c = channels[0]
                masks[j] = masks4[c]
                one = {k: v[c : c + 1] for k, v in features4.items()}
                scores[j] = self.calibration(CHANNEL_SCORES[c], raw4[c : c + 1], one)[0]
            else:
                np.maximum.reduce([masks4[c] for c in channels], out=masks[j])
                area = float(sum(areas4[c] for c in channels))
                # area-weighted mean of the channels' mean probabilities = mean over the union
                raw = float(sum(raw4[c] * areas4[c] for c in channels)) / area if area > 0 else 0.0
                peak = np.array([max(peaks4[c] for c in channels)])
                union = mask_features(np.array([raw]), np.array([area]), peak)
                scores[j] = self.calibration(UNION_SCORE, np.array([raw]), union)[0]
            categories[j] = category.encode("utf-8")
        return masks, scores, categories

    def run_images(self, images: np.ndarray, rows: list[tuple[Plan, int]]) -> list[Masks]:
        assert self.session is not None
        masks, scores, areas, peaks = self.session.run(list(self.graph_outputs), {"image": images})
        return [
            self._assemble(masks[idx], scores[idx], areas[idx], peaks[idx], plan[k])
            for idx, (plan, k) in enumerate(rows)
        ]

    def respond(self, extra: Plan, results: list[Masks]) -> Outputs:
        return [
            pb_utils.Tensor("masks", np.stack([r[0] for r in results])),
            pb_utils.Tensor("scores", np.stack([r[1] for r in results])),
            pb_utils.Tensor("categories", np.stack([r[2] for r in results])),
        ]

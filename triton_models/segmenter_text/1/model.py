"""Triton Python-backend model ``segmenter_text``: MedImageParse-style text-prompt segmentation.

Self-contained: numpy, onnxruntime and the standard library only.  ``model.onnx`` next to this file
is built by ``python -m training.train_segmenter``: uint8 image [B,1,1024,1024] -> masks uint8
[B,4,1024,1024] (0/1), scores fp32 [B,4] (mean probability inside each mask, 0 if empty) and areas
fp32 [B,4], for four channels: 0 = patient's left lung (image right on a PA radiograph),
1 = patient's right lung (image left), 2 = heart, 3 = lesion.  The network runs once per image
whatever the prompts; each prompt then picks its channel(s) (a union for "lungs").

Contract (see config.pbtxt): image uint8 [B,1024,1024], prompts bytes [B,N] -> masks uint8
[B,N,1024,1024], scores fp32 [B,N], categories bytes [B,N].  Every request gets exactly one response;
all images of valid requests run as one ONNX Runtime call (chunks of max_batch_size); a bad request
(wrong shape, no prompts, a blank or unknown prompt) gets an error response naming the problem
(never image content) and the rest are still served.
"""

from __future__ import annotations

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils

MODEL_SIZE = 1024
ONNX_FILE = "model.onnx"
LEFT_LUNG, RIGHT_LUNG, HEART, LESION = 0, 1, 2, 3

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


class RequestError(ValueError):
    """A problem with one request; answered with an error response for that request only."""


def normalise_prompt(raw) -> str:
    if isinstance(raw, bytes | np.bytes_):
        try:
            raw = bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise RequestError("a prompt is not valid UTF-8") from None
    return " ".join(str(raw).split()).lower()


def _show(prompt: str) -> str:
    return repr(prompt if len(prompt) <= 64 else prompt[:61] + "...")


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        self.name = args.get("model_name", "segmenter_text")
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        threads = int(params.get("intra_op_threads", "2") or 2)
        self.max_prompts = int(params.get("max_prompts_per_image", "16") or 16)
        self.max_batch = max(1, int(config.get("max_batch_size", 4) or 4))

        version_dir = os.path.join(args["model_repository"], args["model_version"])
        if not os.path.isdir(version_dir):
            version_dir = os.path.dirname(os.path.abspath(__file__))
        path = os.path.join(version_dir, ONNX_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"{self.name}: missing {path}; run `python -m training.train_segmenter`")

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
            device_id = int(args.get("model_instance_device_id", 0) or 0)
            providers = [("CUDAExecutionProvider", {"device_id": device_id}), "CPUExecutionProvider"]
        self.session = ort.InferenceSession(path, opts, providers=providers)
        inputs = {i.name: i for i in self.session.get_inputs()}
        outputs = {o.name for o in self.session.get_outputs()}
        if "image" not in inputs or inputs["image"].type != "tensor(uint8)" or not {
            "masks",
            "scores",
            "areas",
        } <= outputs:
            raise RuntimeError(
                f"{self.name}: {path} must take uint8 'image' and give 'masks', 'scores' and 'areas'; "
                "re-run `python -m training.train_segmenter`"
            )
        pb_utils.Logger.log_info(
            f"{self.name}: loaded {path} with {self.session.get_providers()[0]}, {threads} intra-op threads, "
            f"{len(VOCABULARY)} prompt forms"
        )

    def _parse(self, request):
        image_t = pb_utils.get_input_tensor_by_name(request, "image")
        prompts_t = pb_utils.get_input_tensor_by_name(request, "prompts")
        if image_t is None:
            raise RequestError("missing input 'image'")
        if prompts_t is None:
            raise RequestError("missing input 'prompts'")
        image = image_t.as_numpy()
        if image.dtype != np.uint8:
            raise RequestError(f"input 'image' must be UINT8, got {image.dtype}")
        if image.ndim != 3 or image.shape[1:] != (MODEL_SIZE, MODEL_SIZE) or image.shape[0] < 1:
            raise RequestError(
                f"input 'image' must have shape [batch, {MODEL_SIZE}, {MODEL_SIZE}], got {list(image.shape)}"
            )
        prompts = prompts_t.as_numpy()
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
        plan = []  # per image: list of (channels, category)
        for k in range(b):
            row = []
            for j in range(n):
                text = normalise_prompt(prompts[k, j])
                if not text:
                    raise RequestError(f"prompts[{k}][{j}] is empty or blank")
                entry = VOCABULARY.get(text)
                if entry is None:
                    raise RequestError(
                        f"unknown prompt {_show(text)} at prompts[{k}][{j}]; known prompts: "
                        + ", ".join(sorted(VOCABULARY))
                    )
                row.append(entry)
            plan.append(row)
        return image, plan

    def _assemble(self, masks4, scores4, areas4, row):
        """One image's four channels -> [N,1024,1024] masks, [N] scores, [N] categories."""
        n = len(row)
        masks = np.empty((n, MODEL_SIZE, MODEL_SIZE), np.uint8)
        scores = np.zeros((n,), np.float32)
        categories = np.empty((n,), dtype=np.object_)
        for j, (channels, category) in enumerate(row):
            if len(channels) == 1:
                c = channels[0]
                masks[j] = masks4[c]
                scores[j] = scores4[c] if areas4[c] > 0 else 0.0
            else:
                np.maximum.reduce([masks4[c] for c in channels], out=masks[j])
                area = float(sum(areas4[c] for c in channels))
                # area-weighted mean of the channels' mean probabilities = mean over the union
                scores[j] = float(sum(scores4[c] * areas4[c] for c in channels)) / area if area > 0 else 0.0
            categories[j] = category.encode("utf-8")
        return masks, scores, categories

    def execute(self, requests):
        responses = [None] * len(requests)
        parsed = []  # (request index, image [b,1024,1024], plan)
        for i, request in enumerate(requests):
            try:
                if hasattr(request, "is_cancelled") and request.is_cancelled():
                    responses[i] = _error(f"{self.name}: request cancelled", cancelled=True)
                    continue
                image, plan = self._parse(request)
                parsed.append((i, image, plan))
            except RequestError as exc:
                responses[i] = _error(f"{self.name}: {exc}", invalid=True)
            except Exception as exc:  # never let one request take the batch down
                responses[i] = _error(f"{self.name}: could not read the request ({type(exc).__name__})")

        flat = [(i, k) for i, image, _ in parsed for k in range(image.shape[0])]
        images = {i: image for i, image, _ in parsed}
        plans = {i: plan for i, _, plan in parsed}
        results: dict[int, list] = {i: [None] * image.shape[0] for i, image, _ in parsed}
        failed: dict[int, str] = {}
        for s in range(0, len(flat), self.max_batch):
            part = flat[s : s + self.max_batch]
            try:
                if len(part) == 1:
                    i, k = part[0]
                    batch = images[i][k : k + 1, None]
                else:
                    batch = np.stack([images[i][k] for i, k in part])[:, None]
                masks, scores, areas = self.session.run(
                    ["masks", "scores", "areas"], {"image": np.ascontiguousarray(batch)}
                )
                for idx, (i, k) in enumerate(part):
                    results[i][k] = self._assemble(masks[idx], scores[idx], areas[idx], plans[i][k])
            except Exception as exc:
                for i, _ in part:
                    failed[i] = f"{self.name}: inference failed ({type(exc).__name__})"

        for i, _image, _plan in parsed:
            if i in failed:
                responses[i] = _error(failed[i])
                continue
            rows = results[i]
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("masks", np.stack([r[0] for r in rows])),
                    pb_utils.Tensor("scores", np.stack([r[1] for r in rows])),
                    pb_utils.Tensor("categories", np.stack([r[2] for r in rows])),
                ]
            )
        return responses

    def finalize(self):
        self.session = None


def _error(message: str, invalid: bool = False, cancelled: bool = False):
    code = None
    if invalid:
        code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    elif cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)
    error = pb_utils.TritonError(message, code) if code is not None else pb_utils.TritonError(message)
    return pb_utils.InferenceResponse(error=error)

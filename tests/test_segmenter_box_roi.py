"""Box prompts on small lesions through the real Triton: LiteMedSAM zoomed on the region finds the nodule."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as triton_grpc

from training.phantoms import generate, model_space

# Phantoms (not the held-out seeds) with lesions 15-20 pixels across in the 1024 model space:
# at LiteMedSAM's 256x256 view of the whole image these are 4-5 pixels, where it often found nothing.
SMALL_LESIONS = [(502, 1), (504, 1), (506, 1), (506, 2), (508, 0), (513, 2)]


def _tight_box(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_small_lesion_boxes_give_the_lesion(triton_url: str) -> None:
    client = triton_grpc.InferenceServerClient(triton_url)
    dices, outside = [], []
    for seed in sorted({s for s, _ in SMALL_LESIONS}):
        sample = model_space(generate(np.random.default_rng(seed), lesion_probability=1.0))
        lesions = [sample["lesions"][j] for s, j in SMALL_LESIONS if s == seed]
        boxes = np.stack([_tight_box(t) for t in lesions])[None]
        image = triton_grpc.InferInput("image", [1, 1024, 1024], "UINT8")
        image.set_data_from_numpy(sample["image"][None])
        prompt = triton_grpc.InferInput("boxes", list(boxes.shape), "FP32")
        prompt.set_data_from_numpy(boxes)
        result = client.infer("segmenter_box", [image, prompt])
        masks, scores = result.as_numpy("masks")[0], result.as_numpy("scores")[0]
        for mask, truth, box, score in zip(masks, lesions, boxes[0], scores, strict=True):
            dices.append(_dice(mask, truth))
            x0, y0, x1, y1 = (int(v) for v in box)
            near = np.zeros_like(mask, dtype=bool)
            near[max(0, y0 - 8) : y1 + 8, max(0, x0 - 8) : x1 + 8] = True
            outside.append(float(mask[~near].sum()) / max(1.0, float(mask.sum())))
            assert 0.0 <= score <= 1.0
    client.close()
    assert min(outside) == 0.0 and max(outside) < 0.05, outside  # the mask stays on the prompt
    assert np.mean(dices) >= 0.88 and min(dices) >= 0.75, dices  # 0.93 / 0.84 when written


def test_zoomed_and_whole_image_boxes_in_one_request(triton_url: str) -> None:
    """A lung box (whole-image path) beside lesion boxes (zoomed path): each mask as if asked alone."""
    client = triton_grpc.InferenceServerClient(triton_url)
    sample = model_space(generate(np.random.default_rng(506), lesion_probability=1.0))
    lung = sample["left_lung"] if sample["left_lung"].sum() > sample["right_lung"].sum() else sample["right_lung"]
    targets = [lung, *sample["lesions"]]
    boxes = np.stack([_tight_box(t) for t in targets])

    def ask(prompts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image = triton_grpc.InferInput("image", [1, 1024, 1024], "UINT8")
        image.set_data_from_numpy(sample["image"][None])
        prompt = triton_grpc.InferInput("boxes", [1, *prompts.shape], "FP32")
        prompt.set_data_from_numpy(prompts[None])
        result = client.infer("segmenter_box", [image, prompt])
        return result.as_numpy("masks")[0], result.as_numpy("scores")[0]

    together, scores = ask(boxes)
    lesions_alone, _ = ask(boxes[1:])
    lung_alone, _ = ask(boxes[:1])
    client.close()
    assert max(boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]) > 400  # the whole-image path
    assert np.array_equal(together[1:], lesions_alone)
    assert np.array_equal(together[:1], lung_alone)
    assert _dice(together[0], lung) >= 0.85
    assert all(_dice(m, t) >= 0.8 for m, t in zip(together[1:], targets[1:], strict=True))
    assert np.all((scores >= 0.0) & (scores <= 1.0))

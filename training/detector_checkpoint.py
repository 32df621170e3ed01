"""The detector's torch weights from its shipped ONNX graph, exactly, so fine-tuning starts from what Triton serves.

``train_detector.py`` exports ``Serving(Detector)`` to ONNX and keeps no checkpoint; retraining from scratch
to get one back would take minutes to an hour and would not give the same weights. The export folds each
BatchNorm into the convolution before it (eval mode), so every Conv node of the graph carries the fused
weight and bias. :func:`detector_from_onnx` puts those into a fresh :class:`Detector`: each folded pair gets
the fused weight in the convolution and an identity BatchNorm (mean 0, variance 1 - eps, scale 1) whose shift
is the fused bias. Fine-tuning then keeps BatchNorm in eval mode (frozen statistics), so the network is a
plain convolution stack that starts exactly where the served model is; :func:`max_difference` checks it
against ONNX Runtime on real phantoms.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from training import common
from training.train_detector import Detector, Serving


def _conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
    """Every convolution in the order the forward pass runs it, with the BatchNorm that follows it (if any)."""
    following: dict[int, nn.BatchNorm2d] = {}
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            children = list(module.children())
            for first, second in itertools.pairwise(children):
                if isinstance(first, nn.Conv2d) and isinstance(second, nn.BatchNorm2d):
                    following[id(first)] = second
    order: list[nn.Conv2d] = []
    hooks = [
        m.register_forward_hook(lambda mod, *_: order.append(mod))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, 1, 512, 512))
    finally:
        for hook in hooks:
            hook.remove()
    return [(conv, following.get(id(conv))) for conv in order]


def detector_from_onnx(path: Path) -> Detector:
    """A :class:`Detector` whose forward pass equals the ONNX graph's at ``path`` (BatchNorm folded, frozen)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    model = Detector()
    pairs = _conv_bn_pairs(model)
    if len(nodes) != len(pairs):
        raise ValueError(f"{path}: {len(nodes)} Conv nodes, the Detector has {len(pairs)} convolutions")
    with torch.no_grad():
        for node, (conv, bn) in zip(nodes, pairs, strict=True):
            weight = initializers[node.input[1]]
            bias = initializers[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
            if tuple(weight.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{path}: {node.name} has weight {weight.shape}, expected {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(weight.copy()))
            if bn is None:
                if conv.bias is None:
                    raise ValueError(f"{path}: {node.name} has a bias the Detector's convolution lacks")
                conv.bias.copy_(torch.from_numpy(bias.copy()))
                continue
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(bias.copy()))
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    model.eval()
    return model


def load_detector(version_dir: Path) -> tuple[Detector, str]:
    """The detector of a version folder: its ``model.pt`` when fine-tuning saved one, else from ``model.onnx``."""
    checkpoint = version_dir / "model.pt"
    if checkpoint.is_file():
        model = Detector()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        model.eval()
        return model, "model.pt"
    return detector_from_onnx(version_dir / "model.onnx"), "model.onnx (BatchNorm folded)"


def max_difference(model: Detector, onnx_path: Path, images: np.ndarray) -> float:
    """Largest absolute difference of the scores between ``model`` and the ONNX graph on ``images`` [N,1024,1024]."""
    session = common.ort_session(onnx_path)
    _, onnx_scores = common.ort_run(session, images)
    serving = Serving(model).eval()
    with torch.no_grad():
        _, torch_scores = serving(torch.from_numpy(images[:, None]))
    return float(np.abs(torch_scores.numpy() - onnx_scores).max())

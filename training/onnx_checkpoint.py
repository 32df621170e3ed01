"""A reference model's torch weights from its shipped ONNX graph, exactly: fine-tuning starts from what Triton serves.

The training scripts export ``Serving(model)`` to ONNX and keep no checkpoint; retraining from scratch to get
one back would take minutes to an hour and would not give the same weights. The export folds each BatchNorm
into the convolution before it (eval mode), so every Conv node of the graph carries the fused weight and bias.
:func:`weights_from_onnx` puts those into a fresh model of the same architecture: each folded pair gets the fused
weight in the convolution and an identity BatchNorm (mean 0, variance 1 - eps, scale 1) whose shift is the fused
bias. Fine-tuning then keeps BatchNorm in eval mode (frozen statistics), so the network is a plain convolution
stack that starts exactly where the served model is. Used for the detector (:mod:`training.detector_checkpoint`)
and the classifier (:mod:`training.retrain_classifier`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d | None]]:
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
        m.register_forward_hook(lambda mod, *_: order.append(mod)) for m in model.modules() if isinstance(m, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.eval()
            model(torch.zeros(1, 1, 512, 512))
    finally:
        for hook in hooks:
            hook.remove()
    return [(conv, following.get(id(conv))) for conv in order]


def weights_from_onnx(model: M, path: Path) -> M:
    """``model`` (fresh, float [B,1,512,512] in) with the weights of the ONNX graph at ``path`` (BatchNorm folded)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    initializers = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    nodes = [node for node in graph.node if node.op_type == "Conv"]
    pairs = conv_bn_pairs(model)
    kind = type(model).__name__
    if len(nodes) != len(pairs):
        raise ValueError(f"{path}: {len(nodes)} Conv nodes, the {kind} has {len(pairs)} convolutions")
    with torch.no_grad():
        for node, (conv, bn) in zip(nodes, pairs, strict=True):
            weight = initializers[node.input[1]]
            bias = initializers[node.input[2]] if len(node.input) > 2 else np.zeros(weight.shape[0], np.float32)
            if tuple(weight.shape) != tuple(conv.weight.shape):
                raise ValueError(f"{path}: {node.name} has weight {weight.shape}, expected {tuple(conv.weight.shape)}")
            conv.weight.copy_(torch.from_numpy(weight.copy()))
            if bn is None:
                if conv.bias is None:
                    raise ValueError(f"{path}: {node.name} has a bias the {kind}'s convolution lacks")
                conv.bias.copy_(torch.from_numpy(bias.copy()))
                continue
            bn.weight.fill_(1.0)
            bn.bias.copy_(torch.from_numpy(bias.copy()))
            assert bn.running_mean is not None and bn.running_var is not None
            bn.running_mean.zero_()
            bn.running_var.fill_(1.0 - bn.eps)
    model.eval()
    return model


def load_version(version_dir: Path, factory: Callable[[], M]) -> tuple[M, str]:
    """The model of a version folder: its ``model.pt`` when fine-tuning saved one, else from ``model.onnx``."""
    checkpoint = version_dir / "model.pt"
    if checkpoint.is_file():
        model = factory()
        model.load_state_dict(torch.load(checkpoint, map_location="cpu", weights_only=True))
        model.eval()
        return model, "model.pt"
    return weights_from_onnx(factory(), version_dir / "model.onnx"), "model.onnx (BatchNorm folded)"


def max_difference(serving: nn.Module, onnx_path: Path, images: np.ndarray, output: int = -1) -> float:
    """Largest absolute difference of output ``output`` of ``serving`` and of the ONNX graph on uint8 [N,1024,1024]."""
    from training import common

    onnx_out = common.ort_run(common.ort_session(onnx_path), images)[output]
    serving.eval()
    with torch.no_grad():
        torch_out = serving(torch.from_numpy(images[:, None]))
    if isinstance(torch_out, tuple | list):
        torch_out = torch_out[output]
    return float(np.abs(torch_out.numpy() - onnx_out).max())

"""The classifier's and the detector's networks in PyTorch, with the weights of the served ``model.onnx``.

For config.pbtxt parameter ``runtime: torch`` (medgate_model_base.ImageBatchModel): a GPU host whose image has
PyTorch with CUDA but no onnxruntime-gpu and no TensorRT runs the same models on CUDA.  Nothing is stored beside
the ONNX graph: at load time the Conv nodes' weights and biases (the export folds each BatchNorm into the
convolution before it) are read from ``model.onnx`` with the small protobuf reader below, so neither ``onnx``
nor the ``training`` package is needed, and there is no second weights file that could drift from the graph.
Strides, paddings and which convolutions a ReLU follows are taken from the graph too, and every weight's shape
is checked against the architecture below (``training/common.py``'s Encoder/Decoder, ``train_classifier`` /
``train_detector``'s Serving); a graph of another architecture is refused at load.  tests/test_torch_runtime.py
checks the answers against ONNX Runtime's through tritonserver.

A plain file at the model repository's root like medgate_model_base.py (see its docstring); imported only when
``runtime: torch`` is chosen, so ONNX Runtime serving never needs torch.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

CHANNELS = (16, 24, 32, 48, 64)  # training/train_classifier.py and train_detector.py
STRIDE = 8  # detector: model pixels per heatmap cell
GRID = 1024 // STRIDE
TOP_K = 32


# ---------------------------------------------------------------------------------------------------------------
# A minimal reader of the ONNX protobuf: the graph's nodes and float initializers, nothing else.


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one message: an int for a varint, else a memoryview of the bytes."""
    pos, end = 0, len(buf)
    value: Any
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _ints(wire: int, value: Any) -> list[int]:
    """A repeated int64 field's entries (packed or not)."""
    if wire == 0:
        return [value]
    out, pos = [], 0
    while pos < len(value):
        item, pos = _varint(value, pos)
        out.append(item - (1 << 64) if item >= 1 << 63 else item)
    return out


@dataclass
class Node:
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    ints: dict[str, list[int]] = field(default_factory=dict)  # int and ints attributes


def _tensor(buf: memoryview) -> tuple[str, np.ndarray | None]:
    """An initializer's name and value; None for a value that is not float32 stored in the file."""
    name, dims, dtype, raw, floats, external = "", [], 0, None, [], False
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _ints(wire, value)
        elif number == 2:
            dtype = value
        elif number == 4:
            floats.append(np.frombuffer(bytes(value), "<f4"))  # packed (wire 2) or one value (wire 5)
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = bytes(value)
        elif number == 14:
            external = value == 1
    if dtype != 1 or external:  # only FLOAT stored inline is read: Conv weights and biases
        return name, None
    data = np.frombuffer(raw, "<f4") if raw is not None else np.concatenate(floats or [np.zeros(0, np.float32)])
    return name, data.astype(np.float32).reshape(dims)


def _node(buf: memoryview) -> Node:
    node = Node("")
    for number, _, value in _fields(buf):
        if number == 1:
            node.inputs.append(bytes(value).decode())
        elif number == 2:
            node.outputs.append(bytes(value).decode())
        elif number == 4:
            node.op_type = bytes(value).decode()
        elif number == 5:
            attr_name, ints = "", []
            for a_number, a_wire, a_value in _fields(value):
                if a_number == 1:
                    attr_name = bytes(a_value).decode()
                elif a_number == 3 and a_wire == 0:
                    ints.append(a_value - (1 << 64) if a_value >= 1 << 63 else a_value)
                elif a_number == 8:
                    ints += _ints(a_wire, a_value)
            node.ints[attr_name] = ints
    return node


def read_graph(path: str) -> tuple[list[Node], dict[str, np.ndarray]]:
    """The nodes (in graph order) and the float32 initializers of the ONNX model at ``path``."""
    with open(path, "rb") as f:
        model = memoryview(f.read())
    graph = next((value for number, wire, value in _fields(model) if number == 7 and wire == 2), None)
    if graph is None:
        raise ValueError(f"{path}: no graph in this ONNX file")
    nodes: list[Node] = []
    initializers: dict[str, np.ndarray] = {}
    for number, _, value in _fields(graph):
        if number == 1:
            nodes.append(_node(value))
        elif number == 5:
            name, array = _tensor(value)
            if array is not None:
                initializers[name] = array
    return nodes, initializers


# ---------------------------------------------------------------------------------------------------------------
# The networks.


@dataclass(frozen=True)
class ConvSpec:
    """What the architecture expects of one convolution, in the order the forward pass runs them."""

    out_ch: int
    in_ch: int
    kernel: int


def _cbr(cout: int, cin: int) -> ConvSpec:
    return ConvSpec(cout, cin, 3)


def backbone_specs(neck: int) -> list[ConvSpec]:
    """Encoder (stem + 4 downs), decoder (per level from the coarsest: up, lateral, fuse) and the neck."""
    c = CHANNELS
    specs = [_cbr(c[0], 4), _cbr(c[0], c[0])]
    for i in range(len(c) - 1):
        specs += [_cbr(c[i + 1], c[i]), _cbr(c[i + 1], c[i + 1])]
    for i in range(len(c) - 2, -1, -1):
        specs += [_cbr(c[i], c[i + 1]), ConvSpec(c[i], c[i], 1), _cbr(c[i], c[i])]
    return [*specs, _cbr(neck, c[0])]


ARCHITECTURES: Mapping[str, list[ConvSpec]] = {
    "classifier": [*backbone_specs(16), ConvSpec(1, 16, 1)],
    "detector": [*backbone_specs(32), ConvSpec(1, 32, 1), ConvSpec(4, 32, 1)],
}
OUTPUTS: Mapping[str, tuple[str, ...]] = {"classifier": ("probabilities",), "detector": ("boxes", "scores")}


@dataclass
class Conv:
    weight: Any  # torch.Tensor [out, in, k, k], BatchNorm folded in
    bias: Any  # torch.Tensor [out]
    stride: int
    padding: int
    relu: bool


def graph_convs(path: str, kind: str) -> list[tuple[np.ndarray, np.ndarray, int, int, bool]]:
    """(weight, bias, stride, padding, followed by ReLU) of each Conv node of ``path``; ValueError when the graph
    is not ``kind``'s architecture."""
    specs = ARCHITECTURES[kind]
    nodes, initializers = read_graph(path)
    relu_inputs = {node.inputs[0] for node in nodes if node.op_type == "Relu" and node.inputs}
    convs = [node for node in nodes if node.op_type == "Conv"]
    if len(convs) != len(specs):
        raise ValueError(f"{path}: {len(convs)} Conv nodes, the {kind} has {len(specs)} convolutions")
    out = []
    for n, (node, spec) in enumerate(zip(convs, specs, strict=True)):
        if len(node.inputs) < 2 or node.inputs[1] not in initializers:
            raise ValueError(f"{path}: Conv node {n} has no float32 weight initializer")
        weight = initializers[node.inputs[1]]
        expected = (spec.out_ch, spec.in_ch, spec.kernel, spec.kernel)
        if weight.shape != expected:
            raise ValueError(f"{path}: Conv node {n} has weight {weight.shape}, the {kind} expects {expected}")
        if len(node.inputs) > 2 and node.inputs[2]:
            if node.inputs[2] not in initializers:
                raise ValueError(f"{path}: Conv node {n} has no float32 bias initializer")
            bias = initializers[node.inputs[2]]
        else:
            bias = np.zeros(spec.out_ch, np.float32)
        strides = node.ints.get("strides", [1, 1])
        pads = node.ints.get("pads", [0, 0, 0, 0])
        if (
            len(set(strides)) != 1
            or len(set(pads)) != 1
            or node.ints.get("group", [1]) != [1]
            or set(node.ints.get("dilations", [1])) != {1}
        ):
            raise ValueError(f"{path}: Conv node {n} has strides {strides}, pads {pads}: not this architecture")
        out.append((weight, bias.reshape(spec.out_ch), strides[0], pads[0], node.outputs[0] in relu_inputs))
    return out


class Net:
    """``kind``'s Serving network on ``device``: uint8 images [B,1,1024,1024] (numpy) -> its graph's outputs."""

    def __init__(self, kind: str, onnx_path: str, device: Any) -> None:
        import torch

        if kind not in ARCHITECTURES:
            raise ValueError(f"no torch network for {kind!r} (known: {', '.join(ARCHITECTURES)})")
        self.kind = kind
        self.outputs = OUTPUTS[kind]
        self.device = device
        self.torch = torch
        self.convs = [
            Conv(torch.from_numpy(w.copy()).to(device), torch.from_numpy(b.copy()).to(device), s, p, r)
            for w, b, s, p, r in graph_convs(onnx_path, kind)
        ]

    def _conv(self, n: int, x: Any) -> Any:
        import torch.nn.functional as F

        conv = self.convs[n]
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        return F.relu(y) if conv.relu else y

    def _backbone(self, image: Any) -> Any:
        """uint8 [B,1,1024,1024] -> the neck's features [B,C,128,128] (training/common.py's layers)."""
        import torch.nn.functional as F

        x = F.avg_pool2d(image.to(self.torch.float32) * (1.0 / 255.0), 2)
        x = F.pixel_unshuffle(x - 0.5, 2)
        x = self._conv(1, self._conv(0, x))
        feats, n = [x], 2
        for _ in range(len(CHANNELS) - 1):
            x = self._conv(n + 1, self._conv(n, x))
            feats.append(x)
            n += 2
        y = feats[-1]
        for i in range(len(CHANNELS) - 2, -1, -1):
            y = F.interpolate(self._conv(n, y), scale_factor=2.0, mode="nearest")
            y = self._conv(n + 2, y + self._conv(n + 1, feats[i]))
            n += 3
        return self._conv(n, y)

    def forward(self, image: Any) -> tuple[Any, ...]:
        """The graph's outputs as torch tensors for a uint8 [B,1,1024,1024] tensor on the device."""
        import torch.nn.functional as F

        torch = self.torch
        y = self._backbone(image)
        last = len(self.convs) - 1
        if self.kind == "classifier":
            p = torch.sigmoid(self._conv(last, y).amax(dim=(1, 2, 3)))
            return (torch.stack([1.0 - p, p], dim=1),)
        heat = torch.sigmoid(self._conv(last - 1, y))
        reg = self._conv(last, y)
        peaks = heat * (F.max_pool2d(heat, 3, 1, 1) == heat).to(heat.dtype)
        b = heat.shape[0]
        scores, index = torch.topk(peaks.reshape(b, GRID * GRID), TOP_K, dim=1)
        picked = torch.gather(reg.reshape(b, 4, GRID * GRID), 2, index[:, None, :].expand(b, 4, TOP_K))
        iy = torch.div(index, GRID, rounding_mode="floor")
        ix = (index - iy * GRID).to(torch.float32)
        cx = (ix + 0.5 + picked[:, 0]) * STRIDE
        cy = (iy.to(torch.float32) + 0.5 + picked[:, 1]) * STRIDE
        w = torch.exp(picked[:, 2].clamp(-3.0, 5.0)) * STRIDE
        h = torch.exp(picked[:, 3].clamp(-3.0, 5.0)) * STRIDE
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=2).clamp(0.0, 1024.0)
        return boxes, scores

    def __call__(self, images: np.ndarray, outputs: Sequence[str]) -> list[np.ndarray]:
        """``outputs`` (names of the graph's outputs) for uint8 ``images`` [B,1,1024,1024], as float32 numpy."""
        torch = self.torch
        with torch.inference_mode():
            got = dict(zip(self.outputs, self.forward(torch.from_numpy(images).to(self.device)), strict=True))
            return [got[name].float().cpu().numpy() for name in outputs]


def device_for(args: Mapping[str, str], threads: int) -> tuple[Any, str]:
    """CUDA when torch sees a GPU (Triton's device id for a KIND_GPU instance, else the first), else the CPU with
    ``threads`` threads; and a description for the load log."""
    import torch

    if torch.cuda.is_available():
        index = int(args.get("model_instance_device_id", 0) or 0) if args.get("model_instance_kind") == "GPU" else 0
        device = torch.device("cuda", index)
        # Full float32 convolutions and matmuls: TF32 would move the scores by about 1e-3 against the graph the
        # calibration was fitted on.
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        return device, f"torch {torch.__version__} on {torch.cuda.get_device_name(device)} ({device})"
    torch.set_num_threads(max(1, threads))
    return torch.device("cpu"), f"torch {torch.__version__} on the CPU, {threads} threads"


def load_net(kind: str, onnx_path: str, args: Mapping[str, str], *, threads: int, spin: bool) -> tuple[Net, str]:
    """``kind``'s network with the weights of ``onnx_path``, on the device :func:`device_for` picks, run once on a
    blank image (kernels chosen and memory taken before the first request); and the load log's description.

    ``spin`` (config.pbtxt ``intra_op_spinning``, as for ONNX Runtime): unless asked for, torch's OpenMP threads
    sleep between work instead of busy-waiting, set before torch loads and where the environment does not say.
    With other processes on the cores, busy-waiting made one 1024x1024 classifier pass on 2 threads take 750-780
    ms instead of 22 ms here (2 cores, load average 3.5; 1 thread: 19 ms); with two busy loops beside it, 342 ms
    spinning and 61 ms not, the policy set this way.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE" if spin else "PASSIVE")
    import torch

    device, described = device_for(args, threads)
    net = Net(kind, onnx_path, device)
    net(np.zeros((1, 1, 1024, 1024), np.uint8), net.outputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return net, described

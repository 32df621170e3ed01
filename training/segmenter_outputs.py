"""Give the text segmenter's graph a ``peaks`` output: each channel's highest probability anywhere in the image.

    python -m training.segmenter_outputs [triton_models/segmenter_text/1/model.onnx]

Why: an empty lesion mask carries no statistic of its own (mean probability 0, area 0), so its calibrated score
could only be "how often empty masks were right", the same for a clean chest and for a nodule the model just
missed. The peak of the lesion channel tells those apart (a missed nodule still lifts the probability towards
0.5). ``train_segmenter`` applies this after every export; run on the committed graph it gives the same bytes
(one ReduceMax node over the graph's sigmoid, appended; the weights are untouched). Idempotent.
"""

from __future__ import annotations

import sys
from pathlib import Path

OUTPUT = "peaks"
DEFAULT = Path(__file__).resolve().parents[1] / "triton_models" / "segmenter_text" / "1" / "model.onnx"


def add_peaks(path: Path) -> bool:
    """Append ``peaks`` [B, 4] = ReduceMax over H, W of the graph's only Sigmoid; False when it is there already."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path))
    if any(o.name == OUTPUT for o in model.graph.output):
        return False
    sigmoids = [n for n in model.graph.node if n.op_type == "Sigmoid"]
    if len(sigmoids) != 1:
        raise ValueError(f"{path}: expected one Sigmoid node (the per-pixel probabilities), found {len(sigmoids)}")
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18 on
        axes = helper.make_tensor("peaks_axes", TensorProto.INT64, [2], [2, 3])
        model.graph.initializer.append(axes)
        node = helper.make_node("ReduceMax", [sigmoids[0].output[0], "peaks_axes"], [OUTPUT], keepdims=0, name="peaks")
    else:
        node = helper.make_node("ReduceMax", [sigmoids[0].output[0]], [OUTPUT], axes=[2, 3], keepdims=0, name="peaks")
    model.graph.node.append(node)
    model.graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", 4]))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0]) if args else DEFAULT
    print(f"{path}: {'added' if add_peaks(path) else 'already has'} output {OUTPUT!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

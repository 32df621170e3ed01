"""The Triton models' shared base (triton_models/medgate_model_base.py) without tritonserver: a fake pb_utils."""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from collections.abc import Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from services.imaging import preprocess
from services.settings import PROJECT_ROOT
from services.triton import client
from tests import fake_triton_python_backend_utils as fake_pb

REPOSITORY = PROJECT_ROOT / "triton_models"
MODELS = ("classifier", "detector", "segmenter_text", "segmenter_box", "impression")
S = preprocess.MODEL_SIZE


@pytest.fixture
def isolated_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The fake in place of Triton's module; sys.path, bytecode writing and imported modules restored after."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # model.py sets it; no __pycache__ in the repository
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name == "medgate_model_base" or name.startswith("medgate_test_model_"):
            del sys.modules[name]


@pytest.fixture
def base(isolated_imports: None) -> ModuleType:
    sys.path.insert(0, str(REPOSITORY))
    return importlib.import_module("medgate_model_base")


def _load_model(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"medgate_test_model_{name}", REPOSITORY / name / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _args(name: str, parameters: dict[str, str] | None = None, max_batch: int = 8) -> dict[str, str]:
    config = {
        "name": name,
        "max_batch_size": max_batch,
        "parameters": {k: {"string_value": v} for k, v in (parameters or {}).items()},
    }
    return {
        "model_name": name,
        "model_config": json.dumps(config),
        "model_repository": str(REPOSITORY / name),
        "model_version": "1",
        "model_instance_kind": "CPU",
    }


def _request(cancelled: bool = False, **inputs: np.ndarray) -> fake_pb.InferenceRequest:
    return fake_pb.InferenceRequest(inputs, cancelled=cancelled)


def _images(batch: int, value: int = 0) -> np.ndarray:
    return np.full((batch, S, S), value, np.uint8)


class _NotCancellable:
    """A request as a Python backend older than 23.10 hands it: no is_cancelled()."""

    def __init__(self, image: np.ndarray) -> None:
        self._tensor = fake_pb.Tensor("image", image)

    def inputs(self) -> list[fake_pb.Tensor]:
        return [self._tensor]


def _toy(base: ModuleType, fail_when: int | None = None) -> Any:
    """An image model whose "graph" gives each image's first pixel; it records every call's batch size."""

    image_model: Any = base.ImageBatchModel  # imported at run time, under the fake

    class Toy(image_model):
        default_name = "toy"

        def setup(self, args: dict[str, str]) -> None:
            self.calls: list[int] = []

        def parse(self, request: Any) -> tuple[np.ndarray, None]:
            return base.check_images(base.input_array(request, "image")), None

        def run_images(self, images: np.ndarray, rows: list[tuple[None, int]]) -> list[int]:
            self.calls.append(len(images))
            if fail_when is not None and fail_when in images[:, 0, 0, 0]:
                raise ZeroDivisionError
            return [int(image[0, 0, 0]) for image in images]

        def respond(self, extra: None, results: list[int]) -> Sequence[Any]:
            return [fake_pb.Tensor("first", np.array(results, np.int32))]

    model = Toy()
    model.initialize(_args("toy", max_batch=4))
    return model


def _error(response: fake_pb.InferenceResponse) -> tuple[int, str]:
    error = response.error()
    assert error is not None
    return error.code(), error.message()


def test_each_request_gets_one_answer_and_the_valid_ones_run_together(base: ModuleType) -> None:
    model = _toy(base)
    requests = [
        _request(image=_images(2, 7)),
        _request(image=np.zeros((1, S, S), np.float32)),
        _request(),
        _request(cancelled=True, image=_images(1, 9)),
        _request(image=np.zeros((1, 512, 512), np.uint8)),
        _request(image=_images(1, 5)),
    ]
    responses = model.execute(requests)
    assert len(responses) == len(requests)
    assert model.calls == [3]  # both valid requests' three images in one call; the cancelled one never ran
    assert responses[0].output_tensors()[0].as_numpy().tolist() == [7, 7]
    assert responses[5].output_tensors()[0].as_numpy().tolist() == [5]
    assert _error(responses[1]) == (fake_pb.TritonError.INVALID_ARG, "toy: input 'image' must be UINT8, got float32")
    assert _error(responses[2]) == (fake_pb.TritonError.INVALID_ARG, "toy: missing input 'image'")
    assert _error(responses[3]) == (fake_pb.TritonError.CANCELLED, "toy: request cancelled")
    assert _error(responses[4]) == (
        fake_pb.TritonError.INVALID_ARG,
        "toy: input 'image' must have shape [batch, 1024, 1024], got [1, 512, 512]",
    )


def test_a_failed_call_fails_only_the_requests_in_it(base: ModuleType) -> None:
    model = _toy(base, fail_when=3)
    # max_batch 4: images 1,1,1,4 | 3 -> the second call fails, so request 2 fails and requests 0 and 1 are served.
    requests = [_request(image=_images(3, 1)), _request(image=_images(1, 4)), _request(image=_images(1, 3))]
    responses = model.execute(requests)
    assert model.calls == [4, 1]
    assert responses[0].output_tensors()[0].as_numpy().tolist() == [1, 1, 1]
    assert responses[1].output_tensors()[0].as_numpy().tolist() == [4]
    assert _error(responses[2]) == (fake_pb.TritonError.INTERNAL, "toy: inference failed (ZeroDivisionError)")


def test_a_request_spanning_a_failed_call_fails_whole(base: ModuleType) -> None:
    model = _toy(base, fail_when=3)
    images = _images(5, 1)
    images[4] = 3  # the fifth image lands in the second call, which fails
    responses = model.execute([_request(image=images), _request(image=_images(1, 2))])
    assert model.calls == [4, 2]
    assert _error(responses[0])[1] == "toy: inference failed (ZeroDivisionError)"
    assert responses[1].has_error()  # it shared the failed call


def test_a_crash_outside_the_calls_is_answered_per_request(base: ModuleType) -> None:
    model = _toy(base)
    model.respond = lambda extra, results: 1 / 0
    responses = model.execute([_request(image=_images(1)), _request()])
    assert _error(responses[0])[1] == "toy: could not build the response (ZeroDivisionError)"
    assert _error(responses[1])[1] == "toy: missing input 'image'"

    model.infer = lambda batch: []  # a wrong number of answers is a bug: every valid request fails, none is lost
    responses = model.execute([_request(image=_images(1)), _request(image=_images(1))])
    assert [_error(r)[1] for r in responses] == ["toy: inference failed (RuntimeError)"] * 2


def test_an_exception_while_reading_a_request_is_named_by_type_only(base: ModuleType) -> None:
    model = _toy(base)

    class Broken(fake_pb.InferenceRequest):
        def inputs(self) -> list[fake_pb.Tensor]:
            raise KeyError("patient name")

    responses = model.execute([Broken({}), _request(image=_images(1, 4))])
    assert _error(responses[0]) == (fake_pb.TritonError.INTERNAL, "toy: could not read the request (KeyError)")
    assert responses[1].output_tensors()[0].as_numpy().tolist() == [4]


def test_backends_without_cancellation_or_error_codes_are_still_served(
    base: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = _toy(base)
    responses = model.execute([_NotCancellable(_images(1, 6))])
    assert responses[0].output_tensors()[0].as_numpy().tolist() == [6]
    monkeypatch.delattr(fake_pb.TritonError, "INVALID_ARG")
    response = model.execute([_request(image=_images(1, 6).astype(np.int16))])[0]
    assert _error(response) == (fake_pb.TritonError.INTERNAL, "toy: input 'image' must be UINT8, got int16")


def test_parameters_and_version_folder(base: ModuleType, tmp_path: Any) -> None:
    triton_model: Any = base.TritonModel

    class Plain(triton_model):
        def setup(self, args: dict[str, str]) -> None:
            pass

    model = Plain()
    args = _args("plain", {"threads": "3", "empty": "", "ratio": "0.25", "word": "x"}, max_batch=0)
    args["model_repository"] = str(tmp_path)  # no version folder there: the model file's own folder is used
    model.initialize(args)
    assert model.max_batch == 8
    assert model.int_param("threads", 2) == 3
    assert model.int_param("empty", 2) == 2
    assert model.int_param("absent", 2) == 2
    assert model.float_param("ratio", 0.5, 0.0, 1.0) == 0.25
    with pytest.raises(RuntimeError, match=r"plain: parameter word='x' is not an integer"):
        model.int_param("word", 1)
    with pytest.raises(RuntimeError, match=r"must be within \[0.5, 1.0\]"):
        model.float_param("ratio", 0.7, 0.5, 1.0)
    assert model.version_dir == str(PROJECT_ROOT / "tests")
    with pytest.raises(RuntimeError, match=r"plain: missing .*nothing.onnx; run `make nothing`"):
        model.require_files(["nothing.onnx"], "run `make nothing`")


def test_model_size_is_defined_once_per_side_and_the_sides_agree(base: ModuleType) -> None:
    assert base.MODEL_SIZE == preprocess.MODEL_SIZE == 1024
    assert client.MODEL_SIZE is preprocess.MODEL_SIZE


@pytest.mark.parametrize("name", MODELS)
def test_every_model_builds_on_the_base_and_leaves_no_bytecode_in_the_repository(
    isolated_imports: None, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # While the stub imports model.py, pb_utils has its functions but not yet its classes (Tensor, TritonError,
    # ...): it attaches those afterwards, so the model and its base must not touch them at import time.
    bare = ModuleType("triton_python_backend_utils")
    bare.get_input_tensor_by_name = fake_pb.get_input_tensor_by_name  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", bare)
    module = _load_model(name)
    base = sys.modules["medgate_model_base"]
    assert issubclass(module.TritonPythonModel, base.TritonModel)
    assert not hasattr(module, "MODEL_SIZE") or module.MODEL_SIZE is base.MODEL_SIZE
    assert not (REPOSITORY / "__pycache__").exists()  # Triton would take it for a model and refuse to start


def test_the_real_classifier_through_the_base(isolated_imports: None) -> None:
    """The shipped classifier's model.py and ONNX graph, driven as Triton would, one bad request in the batch."""
    model = _load_model("classifier").TritonPythonModel()
    model.initialize(_args("classifier", {"intra_op_threads": "1"}))
    try:
        responses = model.execute(
            [_request(image=np.zeros((1, 3, S, S), np.uint8)), _request(image=_images(1, 40))]
        )
    finally:
        model.finalize()
    assert _error(responses[0])[0] == fake_pb.TritonError.INVALID_ARG
    probabilities = responses[1].output_tensors()[0].as_numpy()
    assert probabilities.shape == (1, 2) and probabilities.dtype == np.float32
    assert abs(float(probabilities.sum()) - 1.0) < 1e-4

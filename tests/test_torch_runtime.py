"""The classifier and detector with ``runtime: torch`` answer as with ONNX Runtime, in the real tritonserver.

One tritonserver (the wheel's, the venv's python3 for the stubs) on a scratch repository: the shipped classifier
and detector version folders and shared modules linked in, once with ``runtime: torch`` (PyTorch, on the CPU here:
medgate_torch_nets.py with the weights read from the same model.onnx) and once as shipped under another name
(ONNX Runtime); the same phantoms go to both. A model asking for a runtime it does not have fails to load and its
reason names the parameter (about 10 s here, most of it the stubs starting and importing torch). Without
tritonserver: the protobuf reader gives the ONNX files' weights exactly, another architecture is refused, the
model base imports no torch for ONNX Runtime, and the torch runtime keeps the base's cancellation and request
checks (the shipped detector's model.py driven through a fake pb_utils).
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from bench.gpu import diagnose
from services.triton.embedded import TritonStartError, pytriton_server_dir
from tests import fake_triton_python_backend_utils as fake_pb
from tests.fixtures import phantom, unavailable
from training.phantoms import model_space

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "triton_models"
SEEDS = (1, 2, 3, 4)


def torch_nets() -> ModuleType:
    """triton_models/medgate_torch_nets.py, imported without writing bytecode into the model repository."""
    spec = importlib.util.spec_from_file_location("medgate_torch_nets", MODELS / "medgate_torch_nets.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    before, sys.dont_write_bytecode = sys.dont_write_bytecode, True
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = before
    return module


def test_weights_are_the_onnx_files_and_another_architecture_is_refused() -> None:
    import onnx
    from onnx import numpy_helper

    nets = torch_nets()
    for kind in ("classifier", "detector"):
        path = MODELS / kind / "1" / "model.onnx"
        _, read = nets.read_graph(str(path))
        expected = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        assert read.keys() == {name for name, value in expected.items() if value.dtype == np.float32}
        for name, value in read.items():
            np.testing.assert_array_equal(value, expected[name])
        assert len(nets.graph_convs(str(path), kind)) == len(nets.ARCHITECTURES[kind])
    with pytest.raises(ValueError, match="Conv nodes, the classifier has 24"):
        nets.graph_convs(str(MODELS / "detector" / "1" / "model.onnx"), "classifier")
    with pytest.raises(ValueError, match="23 Conv nodes, the detector has 25"):
        nets.graph_convs(str(MODELS / "segmenter_text" / "1" / "model.onnx"), "detector")


def test_onnx_runtime_serving_does_not_import_torch() -> None:
    code = (
        "import sys, types; sys.dont_write_bytecode = True; sys.path.insert(0, sys.argv[1]);"
        "sys.modules['triton_python_backend_utils'] = types.ModuleType('triton_python_backend_utils');"
        "import medgate_model_base; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code, str(MODELS)], check=True, timeout=60)


@pytest.fixture
def model_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The fake pb_utils in place of Triton's; sys.path, bytecode writing, OpenMP's policy and modules restored."""
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    before = set(sys.modules)
    yield monkeypatch
    for name in set(sys.modules) - before:
        if name.startswith("medgate_"):
            del sys.modules[name]


def _model_py(kind: str, runtime: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The shipped ``kind`` model.py, initialised as Triton would (a fake pb_utils) with ``runtime``, one image per
    call."""
    spec = importlib.util.spec_from_file_location(f"medgate_torch_test_{kind}", MODELS / kind / "1" / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    parameters = {"runtime": runtime, "intra_op_threads": "1", "min_score": "0.05", "nms_iou_threshold": "0.5"}
    config = {"name": kind, "max_batch_size": 1, "parameters": {k: {"string_value": v} for k, v in parameters.items()}}
    model.initialize(
        {
            "model_name": kind,
            "model_config": json.dumps(config),
            "model_repository": str(MODELS / kind),
            "model_version": "1",
            "model_instance_kind": "CPU",
        }
    )
    return model


def test_torch_runtime_keeps_the_cancellation_and_request_checks(model_imports: pytest.MonkeyPatch) -> None:
    """A request cancelled before, one cancelled while another is computed, and a bad one, as with ONNX Runtime."""
    images = np.stack([model_space(phantom(seed))["image"] for seed in (1, 4)])
    torch_model = _model_py("detector", "torch", model_imports)
    onnx_model = _model_py("detector", "onnxruntime", model_imports)
    assert torch_model.net is not None and torch_model.session is None and onnx_model.net is None
    later = fake_pb.InferenceRequest({"image": images[:1]})
    net = torch_model.net

    def first_pass_cancels_later(batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        later.cancelled = True  # its client gives up while the first image is computed
        return list(net(batch, outputs))

    torch_model.net = first_pass_cancels_later
    requests = [
        fake_pb.InferenceRequest({"image": images[:1]}, cancelled=True),
        fake_pb.InferenceRequest({"image": np.zeros((1, 3, 1024, 1024), np.uint8)}),
        fake_pb.InferenceRequest({"image": images}),
        later,
    ]
    try:
        got = torch_model.execute(requests)
        expected = onnx_model.execute([fake_pb.InferenceRequest({"image": images})])[0]
    finally:
        torch_model.finalize()
        onnx_model.finalize()
    codes = [r.error().code() if r.error() is not None else None for r in got]
    assert codes == [
        fake_pb.TritonError.CANCELLED,
        fake_pb.TritonError.INVALID_ARG,
        None,
        fake_pb.TritonError.CANCELLED,
    ]
    answer = {t.name(): t.as_numpy() for t in got[2].output_tensors()}
    reference = {t.name(): t.as_numpy() for t in expected.output_tensors()}
    np.testing.assert_array_equal(answer["count"], reference["count"])
    assert reference["count"].max() >= 1
    np.testing.assert_allclose(answer["boxes"], reference["boxes"], atol=0.5)
    np.testing.assert_allclose(answer["scores"], reference["scores"], atol=1e-4)


def model_copy(repository: Path, source: str, name: str, runtime: str) -> None:
    """``source``'s config (renamed ``name``, ``runtime`` set) and labels, its version folder linked."""
    folder = repository / name
    folder.mkdir()
    (folder / "labels.txt").symlink_to(MODELS / source / "labels.txt")
    (folder / "1").symlink_to(MODELS / source / "1")
    config = (MODELS / source / "config.pbtxt").read_text()
    shipped = 'key: "runtime"\n  value: { string_value: "onnxruntime" }'
    assert shipped in config and f'name: "{source}"' in config
    config = config.replace(f'name: "{source}"', f'name: "{name}"')
    config = config.replace(shipped, f'key: "runtime"\n  value: {{ string_value: "{runtime}" }}')
    config = config.replace(
        'key: "intra_op_threads"\n  value: { string_value: "2" }',
        'key: "intra_op_threads"\n  value: { string_value: "1" }',
    )
    (folder / "config.pbtxt").write_text(config)


@pytest.mark.triton
def test_torch_runtime_answers_as_onnx_runtime(tmp_path: Path) -> None:
    import tritonclient.grpc as triton_grpc

    try:
        server_dir = pytriton_server_dir()
    except TritonStartError as exc:
        unavailable(str(exc), "tests/test_torch_runtime.py")
    repository = tmp_path / "models"
    repository.mkdir()
    for module in MODELS.glob("medgate_*.py"):  # the shared modules at the root, as training/model_repository.py
        (repository / module.name).symlink_to(module)
    for source in ("classifier", "detector"):
        model_copy(repository, source, source, "torch")
        model_copy(repository, source, f"{source}_onnx", "onnxruntime")
    model_copy(repository, "classifier", "classifier_bad", "tensorrt")
    models = ("classifier", "detector", "classifier_onnx", "detector_onnx", "classifier_bad")

    images = np.stack([model_space(phantom(seed))["image"] for seed in SEEDS])
    python_bin = Path(sys.executable).parent
    backends = diagnose.backend_dir(server_dir, diagnose.python_version(python_bin), tmp_path / "backend")
    log = tmp_path / "triton.log"
    answers: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    with diagnose.tritonserver(
        server_dir, repository, backends, diagnose.server_env(python_bin), log, models=models, timeout_s=120
    ) as server:
        states = server.states
        client = triton_grpc.InferenceServerClient(server.grpc)
        try:
            for name in models[:4]:
                assert states[name]["state"] == "READY", (name, states[name], log.read_text()[-3000:])
                image = triton_grpc.InferInput("image", list(images.shape), "UINT8")
                image.set_data_from_numpy(images)
                outputs = ("probabilities",) if name.startswith("classifier") else ("boxes", "scores", "count")
                result = client.infer(name, [image])
                answers[name] = {o: result.as_numpy(o) for o in outputs}
                one = triton_grpc.InferInput("image", [1, *images.shape[1:]], "UINT8")
                one.set_data_from_numpy(images[:1])
                started = time.perf_counter()
                client.infer(name, [one])
                seconds[name] = time.perf_counter() - started
        finally:
            client.close()
    print({name: f"{s * 1000:.0f} ms" for name, s in seconds.items()})  # one image, CPU; for the record only

    text = log.read_text()
    for name in ("classifier", "detector"):  # the load lines name the runtime
        assert re.search(rf"{name} \(torch \S+ on the CPU, 1 threads\): loaded \S+", text), text[-3000:]
        assert re.search(rf"{name}_onnx: loaded \S+ with CPUExecutionProvider", text), text[-3000:]
    bad = states["classifier_bad"]
    assert bad["state"] == "UNAVAILABLE" and "runtime='tensorrt'" in bad["reason"], bad

    torch_p, onnx_p = answers["classifier"]["probabilities"], answers["classifier_onnx"]["probabilities"]
    assert torch_p.shape == (len(SEEDS), 2) and torch_p.dtype == np.float32
    assert onnx_p[:, 1].max() > 0.5 > onnx_p[:, 1].min()  # both classes among the phantoms
    np.testing.assert_allclose(torch_p, onnx_p, atol=1e-5)

    torch_d, onnx_d = answers["detector"], answers["detector_onnx"]
    np.testing.assert_array_equal(torch_d["count"], onnx_d["count"])
    assert onnx_d["count"].max() >= 1  # lesions found on some phantom
    for n, (count,) in enumerate(onnx_d["count"]):
        np.testing.assert_allclose(torch_d["boxes"][n, :count], onnx_d["boxes"][n, :count], atol=0.5)
        np.testing.assert_allclose(torch_d["scores"][n, :count], onnx_d["scores"][n, :count], atol=1e-4)

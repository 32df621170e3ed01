"""The classifier and detector with ``runtime: torch`` answer as with ONNX Runtime, in the real tritonserver.

One tritonserver (the wheel's, the venv's python3 for the stubs) on a scratch repository: the shipped classifier
and detector version folders and shared modules linked in, once with ``runtime: torch`` (PyTorch, on the CPU here:
medgate_torch_nets.py with the weights read from the same model.onnx) and once as shipped under another name
(ONNX Runtime); the same phantoms go to both. A model asking for a runtime it does not have fails to load and its
reason names the parameter. About 20-30 s, most of it the stubs starting and importing torch.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from bench.gpu import diagnose
from services.triton.embedded import TritonStartError, pytriton_server_dir
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


@pytest.mark.triton
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

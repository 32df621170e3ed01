"""The GPU-machine check's diagnosis (bench/gpu/run.sh, issue 15 item 7) run here against the real tritonserver.

``run.sh --cpu-smoke --steps diagnose`` starts the wheel's tritonserver on the two diagnostic models with the
project's venv first on PATH, and, where a python3 with numpy 2 of the same version sits beside it on PATH, again
with that one: the fault seen on the lent H100 (DESIGN.md §7) then shows here as well, and the report must say so.
About 15 s; the scaling step is not run here (a benchmark).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from services.triton.embedded import TritonStartError, pytriton_server_dir
from tests.fixtures import unavailable

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.triton


def test_diagnosis_reports_which_python_gives_correct_tensors(tmp_path: Path) -> None:
    try:
        pytriton_server_dir()
    except TritonStartError as exc:
        unavailable(str(exc), "tests/test_gpu_check.py")
    run = subprocess.run(
        ["bash", "bench/gpu/run.sh", "--cpu-smoke", str(tmp_path), "--steps", "diagnose"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "all steps passed" in (tmp_path / "run.log").read_text()
    assert (tmp_path / "logs.tar.gz").stat().st_size > 0

    report = json.loads((tmp_path / "diagnose.json").read_text())
    variants = {v["variant"]: v for v in report["variants"]}
    venv = variants["venv"]
    assert venv["working"] == ["numpy_probe", "dlpack_probe"], venv
    numpy_probe = venv["models"]["numpy_probe"]
    assert numpy_probe["outputs"] == {"y": [3.0, 5.0, 7.0, 9.0], "x_seen": [1.0, 2.0, 3.0, 4.0]}
    # The model reports the interpreter the stub embedded: the venv's, with the venv's numpy.
    seen = numpy_probe["model_report"]
    assert seen["numpy_version"] == np.__version__
    assert Path(seen["sys_executable"]).parent == Path(sys.executable).parent
    dlpack_probe = venv["models"]["dlpack_probe"]
    assert dlpack_probe["outputs"] == {"y": [3.0, 5.0, 7.0, 9.0], "x_seen": [1.0, 2.0, 3.0, 4.0]}
    assert dlpack_probe["model_report"]["torch"]["version"]
    assert report["working"]["venv"] == ["numpy_probe", "dlpack_probe"]

    if "numpy2" in variants:  # the fault, reproduced: numpy 2 under the 2.51 stub misreads tensors both ways
        broken = variants["numpy2"]["models"]["numpy_probe"]
        assert broken["model_report"]["numpy_version"].startswith("2.")
        assert not broken["ok"]
        assert broken["verdicts"]["input_read"].startswith("wrong")
        assert broken["verdicts"]["y"] != "correct"
        assert "numpy2: numpy_probe [numpy 2." in report["summary"]

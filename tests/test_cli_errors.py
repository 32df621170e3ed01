"""The command line's answer to a mistyped path: one line naming it and exit code 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.cli import main as medgate


def test_infer_on_a_missing_file_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "RG1_UNCI.dcm"
    assert medgate(["infer", str(missing), "--task", "classify", "--target", "127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: no such file: {missing}"


def test_infer_on_a_folder_points_to_batch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert medgate(["infer", str(tmp_path), "--task", "classify", "--target", "127.0.0.1:1"]) == 2
    assert "medgate batch" in capsys.readouterr().err

"""Model versions in a Triton repository: the next number, landing a version whole, evaluation reports, overlays.

A version lands as ``<repository>/<model>/<n>/``: built in a hidden folder beside it (Triton ignores names that
are not numbers), then renamed into place in one step, so a Triton polling the repository never loads half a
version. Everything else the serving version's folder holds (model.py, its files) is copied, so the new version
serves with the same code; ``medgate train`` then refits its ``calibration.json`` on the calibration seed split
(or keeps the parent's, saying so), and its evaluation report (``evaluation.json``) travels inside it.

For production the repository is outside the source tree (``medgate models init-repository var/models`` and
``triton.model_repository`` pointing there): an overlay whose model folders link the shipped configs and
versions, so trained versions never land in a checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

REPORT_FILE = "evaluation.json"
# Files of a version folder that are the model itself (replaced by the new version's), not serving code.
MODEL_FILES = {"model.onnx", "model.pt", REPORT_FILE}


def versions(repository: Path, model: str) -> list[int]:
    """The numeric version folders of ``model``, ascending."""
    folder = repository / model
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and int(p.name) > 0 and p.is_dir())


def served_versions(repository: Path, model: str, policy_latest: int) -> list[int]:
    """The versions Triton loads under ``version_policy: { latest { num_versions: policy_latest } }``."""
    return versions(repository, model)[-policy_latest:]


def latest_policy(repository: Path, model: str) -> int:
    """num_versions of the model's ``latest`` version policy; 1 (Triton's default) when the config has none."""
    text = (repository / model / "config.pbtxt").read_text()
    import re

    match = re.search(r"version_policy\s*:?\s*\{\s*latest\s*\{\s*num_versions\s*:\s*(\d+)", text)
    if match:
        return int(match.group(1))
    if re.search(r"version_policy\s*:?\s*\{\s*all\s*\{", text):
        return 1 << 30
    return 1


def read_report(repository: Path, model: str, version: str) -> dict[str, Any] | None:
    path = repository / model / version / REPORT_FILE
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return None


def ensure_base(repository: Path, source: Path) -> None:
    """The shared modules at the repository's root (where each model.py looks for them): links to the shipped ones."""
    if repository.resolve() == source.resolve():
        return
    for module in source.glob("*.py"):
        target = repository / module.name
        if not target.exists() and not target.is_symlink():
            target.symlink_to(module.resolve())


def init_repository(repository: Path, source: Path, models: list[str] | None = None) -> list[str]:
    """An overlay repository: per model of ``source`` (or of ``models``), a real folder linking its config,
    labels and versions; trained versions then land there as real folders."""
    repository.mkdir(parents=True, exist_ok=True)
    ensure_base(repository, source)
    made: list[str] = []
    for model in sorted(p for p in source.iterdir() if p.is_dir() and (p / "config.pbtxt").is_file()):
        if models is not None and model.name not in models:
            continue
        folder = repository / model.name
        folder.mkdir(exist_ok=True)
        for item in model.iterdir():
            if item.name == "__pycache__":
                continue
            link = folder / item.name
            if not link.exists() and not link.is_symlink():
                link.symlink_to(item.resolve())
        made.append(model.name)
    return made


def unloads(repository: Path, model: str, keep: str) -> bool:
    """Whether one more version would push ``keep`` out of the versions the model's policy loads."""
    latest = latest_policy(repository, model)
    numbers = versions(repository, model)
    return int(keep) not in [*numbers, (numbers or [0])[-1] + 1][-latest:]


def land_version(
    repository: Path, model: str, parent: str, files: dict[str, Path], report: dict[str, Any]
) -> str:
    """Copy the parent version's serving code and ``files`` into the next version folder, atomically; its number."""
    folder = repository / model
    number = str((versions(repository, model) or [0])[-1] + 1)
    staging = folder / f".{number}.{uuid.uuid4().hex}.tmp"
    staging.mkdir(parents=True)
    try:
        for item in (folder / parent).iterdir():
            if item.name in MODEL_FILES or item.name == "__pycache__" or not item.is_file():
                continue
            shutil.copy2(item.resolve(), staging / item.name)
        for name, path in files.items():
            shutil.copy2(path, staging / name)
        (staging / REPORT_FILE).write_text(json.dumps({**report, "version": number}, indent=2) + "\n")
        for path in staging.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        os.rename(staging, folder / number)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return number

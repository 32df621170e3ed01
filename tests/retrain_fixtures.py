"""What the retrain-loop tests share (tests/test_retrain_loop.py: detector; tests/test_retrain_classifier.py):
the real servers on one event loop (embedded Triton polling an overlay repository outside the checkout, review
service, gateway with shadowing), the `medgate` CLI in child processes, a ground-truth file for the scripted
reviewer, and waiting for a condition.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import tritonclient.grpc as triton_grpc

from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.review.server import ReviewServer
from services.settings import ENV_PREFIX, PROJECT_ROOT, Settings, load_settings
from services.triton.embedded import EmbeddedTriton
from tests.conftest import free_port
from training import model_repository

ROLES = ("classifier", "detector", "segmenter_text", "segmenter_box")
RELOAD_INTERVAL_S = 0.2


def medgate_env(**settings: Any) -> dict[str, str]:
    """The environment of a `medgate` subprocess: these settings (section_field=value) on top of ours."""
    env = dict(os.environ)
    for name, value in settings.items():
        env[ENV_PREFIX + name.upper()] = str(value)
    return env


async def medgate(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process; awaited, so the servers on this test's event loop keep serving it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "clients.cli", *args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    return subprocess.CompletedProcess(args, process.returncode or 0, out.decode(), err.decode())


def metric(port: int, prefix: str) -> float:
    """The sum of the Prometheus samples whose line starts with ``prefix``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


async def until(check: Any, timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)


def flow_toml(name: str, task_type: str, categories: list[str], condition: dict[str, Any]) -> str:
    """A flows file with one flow: an hour to answer each case, output.json under ``output/`` beside the file."""
    settings = {"name": name, "task_type": task_type, "categories": categories, "task_count": 1}
    settings |= {"task_availability_lifetime_s": 3600, "task_time_limit_s": 600, "output_dir": "output"}
    lines = [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    conditions = f"activation_conditions = '''{json.dumps(condition)}'''"
    return "\n".join(["[[flows]]", *lines, conditions, ""])


def write_truths(path: Path, cases: Iterable[tuple[np.ndarray, dict[str, Any]]]) -> Path:
    """A ground-truth file for ``medgate reviewer --auto truth:FILE``: (model-space image, answer) per case."""
    path.write_text(
        "".join(
            json.dumps({"image_sha256": hashlib.sha256(image.tobytes()).hexdigest(), **answer}) + "\n"
            for image, answer in cases
        )
    )
    return path


@dataclass
class Servers:
    """The running servers of one loop test, the files the CLI shares with them, and the CLI's environment."""

    repository: Path
    versions_file: Path
    shadow_report: Path
    audit_dir: Path
    settings: Settings
    env: dict[str, str]
    triton: EmbeddedTriton
    review: ReviewServer
    gateway: GatewayServer
    stub: pb_grpc.InferenceStub

    async def medgate(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return await medgate(*args, env=self.env, timeout=timeout)

    async def answer_all(self, flow: str, truth_file: Path, count: int) -> None:
        """``medgate reviewer --auto truth:FILE`` answers ``count`` cases of ``flow`` (a scripted reviewer)."""
        done = await self.medgate(
            "reviewer",
            "--reviewer-id",
            "scripted",
            "--flow",
            flow,
            "--auto",
            f"truth:{truth_file}",
            "--limit",
            str(count),
            "--target",
            f"127.0.0.1:{self.review.port}",
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("submitted: loop COMPLETED") == count, done.stdout[-3000:]

    async def export(self, flow: str, out: Path) -> Path:
        """``medgate review export-manifest``: the manifest path."""
        done = await self.medgate("review", "export-manifest", "--flow", flow, "--out", str(out), timeout=60)
        assert done.returncode == 0, done.stderr
        return out / "output.manifest"

    async def train(self, role: str, manifest: Path, **options: int) -> dict[str, Any]:
        """``medgate train --role ROLE`` with ``options`` (``phantom_heldout=100`` -> ``--phantom-heldout 100``);
        the evaluation.json of the version it landed (the role's model's next version)."""
        model = getattr(self.settings.models, role)
        number = str((model_repository.versions(self.repository, model) or [0])[-1] + 1)
        flags = [item for key, value in options.items() for item in (f"--{key.replace('_', '-')}", str(value))]
        done = await self.medgate("train", "--role", role, "--manifest", str(manifest), *flags, timeout=400)
        assert done.returncode == 0, done.stdout + done.stderr
        print(done.stdout)
        return dict(json.loads((self.repository / model / number / "evaluation.json").read_text()))

    async def loaded(self, model: str, *versions: str) -> None:
        """Wait until Triton has every one of ``versions`` of ``model`` READY (it polls the repository)."""
        client = triton_grpc.InferenceServerClient(self.triton.settings.grpc_url)
        try:
            await until(
                lambda: all(client.is_model_ready(model, v) for v in versions), 60, f"{model} {versions} loaded"
            )
        finally:
            client.close()


@asynccontextmanager
async def loop_servers(tmp_path: Path, role: str, flows_toml: str) -> AsyncIterator[Servers]:
    """Triton serving only ``role``'s model from an overlay repository in ``tmp_path`` (poll mode, so landed
    versions load without a restart), the review service with ``flows_toml``, and a gateway that shadows the
    role's candidate on every request; the audit trail in ``tmp_path/audit``."""
    import grpc

    model = getattr(load_settings(None).models, role)
    repository = tmp_path / "models"
    model_repository.init_repository(repository, PROJECT_ROOT / "triton_models", [model])
    versions_file, shadow_report, audit_dir = tmp_path / "versions.json", tmp_path / "shadow.jsonl", tmp_path / "audit"
    flows = tmp_path / "flows.toml"
    flows.write_text(flows_toml)
    sections: dict[str, dict[str, Any]] = dict(
        triton={
            "url": "",
            "model_repository": repository,
            "repository_poll_s": 1.0,
            "http_port": free_port(),
            "grpc_port": free_port(),
            "metrics_port": free_port(),
        },
        models={other: "" for other in ROLES if other != role},
        report={"enabled": False},
        review={
            "store_path": tmp_path / "review.sqlite3",
            "flows_file": flows,
            "port": 0,
            "housekeeping_interval_s": 0.2,
            "outbox_dir": tmp_path / "outbox",
        },
        gateway={"port": 0, "metrics_port": 0},
        versions={
            "file": versions_file,
            "reload_interval_s": RELOAD_INTERVAL_S,
            "shadow_fraction": 1.0,
            "shadow_report_file": shadow_report,
            # More than the tests send: on a loaded machine the candidate's answers lag the caller's, and a
            # comparison beyond the limit is skipped (by design, never queued), which the tests do not count.
            "shadow_max_in_flight": 16,
        },
        security={"audit_dir": audit_dir},
    )
    settings = load_settings(None, **sections)
    env = medgate_env(
        triton_model_repository=repository,
        triton_grpc_port=settings.triton.grpc_port,
        review_store_path=settings.review.store_path,
        review_flows_file=flows,
        versions_file=versions_file,
        versions_shadow_report_file=shadow_report,
        security_audit_dir=audit_dir,
    )
    with EmbeddedTriton(settings.triton) as triton:
        review = ReviewServer(settings.review, settings.security)
        await review.start(port=0)
        sections["review"]["url"] = f"127.0.0.1:{review.port}"
        gateway = GatewayServer(load_settings(None, **sections), triton.settings.grpc_url)
        await gateway.start(port=0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                yield Servers(
                    repository,
                    versions_file,
                    shadow_report,
                    audit_dir,
                    settings,
                    env,
                    triton,
                    review,
                    gateway,
                    pb_grpc.InferenceStub(channel),
                )
        finally:
            await gateway.stop()
            await review.stop()


def mask_png(mask: np.ndarray) -> str:
    """A ground-truth mask for ``medgate reviewer --auto truth:FILE`` (``"masks": {prompt: this}``): base64 PNG."""
    ok, png = cv2.imencode(".png", mask.astype(np.uint8) * 255)
    assert ok
    return base64.b64encode(png.tobytes()).decode()

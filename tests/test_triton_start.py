"""Start-up against an external Triton: a wrong URL fails in bounded time with a message that says so."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from services.settings import load_settings
from services.triton.embedded import TritonStartError, triton_for
from tests.conftest import free_port


def test_an_unreachable_external_triton_is_reported_within_the_timeout() -> None:
    settings = dataclasses.replace(load_settings().triton, url=f"127.0.0.1:{free_port()}", startup_timeout_s=1.5)
    started = time.monotonic()
    with pytest.raises(TritonStartError, match="was not ready within 2 s"), triton_for(settings, ["classifier"]):
        pass
    assert time.monotonic() - started < 10


def test_medgate_serve_says_what_is_wrong_without_a_traceback() -> None:
    env = dict(
        os.environ,
        MEDGATE_TRITON_URL=f"127.0.0.1:{free_port()}",
        MEDGATE_TRITON_STARTUP_TIMEOUT_S="1",
        MEDGATE_REVIEW_ENABLED="false",
    )
    done = subprocess.run(
        [str(Path(sys.executable).parent / "medgate"), "serve", "--port", str(free_port())],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "error: external Triton at 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr
    assert "waiting for Triton" in done.stderr  # it said what it was waiting for

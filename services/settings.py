"""One settings object for every limit, port and path; read from the environment and an optional TOML file."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ENV_PREFIX = "MEDGATE_"


@dataclass(frozen=True)
class TritonSettings:
    """Where Triton runs: embedded (our child process) unless ``url`` names an external server."""

    url: str = ""  # host:port of an external Triton's gRPC endpoint; empty = start the embedded one
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    model_repository: Path = PROJECT_ROOT / "triton_models"
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 15.0
    # The Python backend moves tensors through shared memory; masks are 1 MiB each, so start big
    # rather than grow a megabyte at a time.
    python_shm_default_bytes: int = 64 * 1024 * 1024
    python_shm_growth_bytes: int = 64 * 1024 * 1024
    log_verbose: int = 0

    @property
    def grpc_url(self) -> str:
        return self.url or f"{self.host}:{self.grpc_port}"

    @property
    def embedded(self) -> bool:
        return not self.url


@dataclass(frozen=True)
class Settings:
    triton: TritonSettings = field(default_factory=TritonSettings)


def _coerce(value: str, like: Any) -> Any:
    if isinstance(like, bool):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    if isinstance(like, Path):
        return Path(value)
    return value


def _apply(section: Any, prefix: str, overrides: dict[str, Any]) -> Any:
    """Return ``section`` with fields replaced from ``overrides`` (a TOML table) and then the environment."""
    changes: dict[str, Any] = {}
    for item in dataclasses.fields(section):
        current = getattr(section, item.name)
        if dataclasses.is_dataclass(current):
            changes[item.name] = _apply(current, f"{prefix}{item.name.upper()}_", overrides.get(item.name, {}))
            continue
        if item.name in overrides:
            changes[item.name] = _coerce(str(overrides[item.name]), current)
        env_value = os.environ.get(f"{prefix}{item.name.upper()}")
        if env_value is not None:
            changes[item.name] = _coerce(env_value, current)
    return dataclasses.replace(section, **changes)


def load_settings(path: Path | None = None, **section_overrides: Any) -> Settings:
    """Defaults, then the TOML file (``MEDGATE_CONFIG`` or ``path``), then ``MEDGATE_<SECTION>_<FIELD>``.

    Example: ``MEDGATE_TRITON_GRPC_PORT=9001`` or ``[triton] grpc_port = 9001`` in the file.
    """
    config_path = path or (Path(os.environ[f"{ENV_PREFIX}CONFIG"]) if f"{ENV_PREFIX}CONFIG" in os.environ else None)
    table: dict[str, Any] = tomllib.loads(config_path.read_text()) if config_path else {}
    settings = _apply(Settings(), ENV_PREFIX, table)
    if section_overrides:
        settings = dataclasses.replace(
            settings,
            **{name: dataclasses.replace(getattr(settings, name), **values) for name, values in section_overrides.items()},
        )
    return settings

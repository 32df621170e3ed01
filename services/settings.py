"""One settings object for every limit, port and path; read from the environment and an optional TOML file."""

from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.imaging.limits import IngestLimits
from services.report.limits import ReportLimits

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
    # More tritonserver flags for the embedded server, as one shell-quoted string.
    extra_args: str = ""
    # Tensors through /dev/shm instead of the gRPC message: "auto" (when Triton is on loopback and can
    # map the regions), "on" or "off". The bound is per gateway worker.
    shared_memory: str = "auto"
    shared_memory_max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.shared_memory not in {"auto", "on", "off"}:
            raise ValueError(f"triton.shared_memory must be auto, on or off, not {self.shared_memory!r}")

    @property
    def grpc_url(self) -> str:
        return self.url or f"{self.host}:{self.grpc_port}"

    @property
    def embedded(self) -> bool:
        return not self.url


MIB = 1024 * 1024


@dataclass(frozen=True)
class ModelNames:
    """Which Triton model plays each role; point a role at your own model with the same contract."""

    classifier: str = "classifier"
    detector: str = "detector"
    segmenter_text: str = "segmenter_text"
    segmenter_box: str = "segmenter_box"

    def as_dict(self) -> dict[str, str]:
        """Configured roles only: an empty name turns a role off (its RPCs answer UNIMPLEMENTED)."""
        return {item.name: getattr(self, item.name) for item in dataclasses.fields(self) if getattr(self, item.name)}


@dataclass(frozen=True)
class GatewaySettings:
    """The inference gateway: address, workers and every per-request limit."""

    host: str = "127.0.0.1"
    port: int = 50051
    # Worker processes sharing the port (SO_REUSEPORT): CPU work scales with cores across connections.
    workers: int = 1
    # Threads per worker for decode and letterbox, so the event loop never blocks on pixels.
    cpu_threads: int = 2
    max_receive_message_bytes: int = 64 * MIB
    max_send_message_bytes: int = 64 * MIB
    # Beyond this many RPCs in flight per worker, gRPC answers RESOURCE_EXHAUSTED at once.
    max_concurrent_rpcs: int = 64
    max_prompts: int = 16
    max_boxes: int = 16
    max_prompt_chars: int = 200
    # Used when the caller sets no deadline; a caller's shorter deadline always wins.
    default_deadline_s: float = 60.0
    triton_retry_backoff_s: float = 0.05
    health_poll_interval_s: float = 2.0
    grace_period_s: float = 5.0
    # Prometheus /metrics (0 = any free port, negative = off); one port for all workers.
    metrics_port: int = 9464
    # glibc allocator: buffers under this size are reused from the heap rather than mapped and
    # unmapped per request (glibc's cap is 32 MiB); 0 leaves glibc's defaults. See tune_allocator.
    malloc_mmap_threshold_bytes: int = 32 * MIB
    malloc_trim_threshold_bytes: int = 256 * MIB
    # "text" for a terminal, "json" (one object a line, with request_id, rpc, code, timings) for a pipeline.
    log_format: str = "text"

    def __post_init__(self) -> None:
        if self.log_format not in {"text", "json"}:
            raise ValueError(f"gateway.log_format must be text or json, not {self.log_format!r}")


@dataclass(frozen=True)
class ReviewSettings:
    """The review service: its address, store, flow definitions, and how the gateway reaches it."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 50052
    # host:port of a review service the gateway routes to; empty = this machine's host:port above.
    url: str = ""
    store_path: Path = PROJECT_ROOT / "var" / "review.sqlite3"
    flows_file: Path = PROJECT_ROOT / "config" / "flows.toml"
    # How often leases and loops are checked for expiry and pending output.json files are written.
    housekeeping_interval_s: float = 1.0
    # Per StreamCases subscriber; more would let one reviewer hoard cases.
    max_in_flight_per_reviewer: int = 10
    # Routing a case to review must not hold up the inference answer for longer than this.
    route_timeout_s: float = 5.0
    # Cases the gateway could not hand to the review service wait here, sent again every
    # outbox_retry_interval_s; past outbox_max_bytes a case is answered unrouted (and logged).
    outbox_dir: Path = PROJECT_ROOT / "var" / "review-outbox"
    outbox_retry_interval_s: float = 2.0
    outbox_max_bytes: int = 4 * 1024 * MIB
    grace_period_s: float = 5.0

    @property
    def target(self) -> str:
        return self.url or f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ReportSettings(ReportLimits):
    """The Report service (findings -> impression): its Triton model and per-request limits.

    ``max_findings_chars`` (characters of one findings text; more is RESOURCE_EXHAUSTED),
    ``default_evidence`` and ``max_evidence`` (nearest training reports returned) come from ReportLimits.
    """

    # Serve medgate.v1.Report; off (or an empty model) for a Triton without the impression model.
    enabled: bool = True
    model: str = "impression"  # the Triton model; point it at your own with the same contract
    # Stream items answered at once on one ImpressionStream.
    stream_in_flight: int = 8


@dataclass(frozen=True)
class Settings:
    triton: TritonSettings = field(default_factory=TritonSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    models: ModelNames = field(default_factory=ModelNames)
    ingest: IngestLimits = field(default_factory=IngestLimits)
    review: ReviewSettings = field(default_factory=ReviewSettings)
    report: ReportSettings = field(default_factory=ReportSettings)


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
            **{
                name: dataclasses.replace(getattr(settings, name), **values)
                for name, values in section_overrides.items()
            },
        )
    return settings

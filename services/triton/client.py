"""The gateway's view of Triton: model contracts checked at start-up, typed calls, deadlines, one retry rule.

Images go to Triton as uint8 [1024, 1024] (DESIGN.md §4: 12x less than float32 and 5-10x faster);
every model normalises inside. A call gets the caller's remaining deadline twice: as its gRPC timeout
and as Triton's request timeout, which the models read (``request.timeout()``) to stop work nobody waits
for. A call the caller gives up (cancelled, or its deadline passed) cancels its gRPC call, and Triton
passes that on to the model (``request.is_cancelled()``, checked between units of work).

While the watch (:mod:`services.triton.watch`) says Triton is down, a call is answered UNAVAILABLE at
once. When a call finds Triton UNAVAILABLE, one probe decides: no answer, and the call (and every call
after it, until Triton is back) is answered UNAVAILABLE; an answer, and the call is tried once more.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.gateway.versions import ServingVersions
from services.imaging.preprocess import MODEL_SIZE
from services.metrics import TRITON_SECONDS
from services.settings import Settings, TritonSettings
from services.triton.embedded import admin_headers
from services.triton.shm import SharedMemoryPool, needed_bytes, remove_stale_regions
from services.triton.watch import TritonDown, TritonWatch, channel_args

log = logging.getLogger("medgate.triton.client")

ANY = -1
# Defaults of the keyword arguments below; a server passes its own settings (TritonModels.from_settings).
_DEFAULTS = TritonSettings()


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # without the batch dimension; ANY matches any size


@dataclass(frozen=True)
class Contract:
    """What a model must look like for the gateway to use it in a role."""

    role: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


_IMAGE = TensorSpec("image", "UINT8", (MODEL_SIZE, MODEL_SIZE))
_MASKS = TensorSpec("masks", "UINT8", (ANY, MODEL_SIZE, MODEL_SIZE))

CONTRACTS: dict[str, Contract] = {
    "classifier": Contract("classifier", (_IMAGE,), (TensorSpec("probabilities", "FP32", (ANY,)),)),
    "detector": Contract(
        "detector",
        (_IMAGE,),
        (
            TensorSpec("boxes", "FP32", (ANY, 4)),
            TensorSpec("scores", "FP32", (ANY,)),
            TensorSpec("labels", "INT32", (ANY,)),
            TensorSpec("count", "INT32", (1,)),
        ),
    ),
    "segmenter_text": Contract(
        "segmenter_text",
        (_IMAGE, TensorSpec("prompts", "BYTES", (ANY,))),
        (_MASKS, TensorSpec("scores", "FP32", (ANY,)), TensorSpec("categories", "BYTES", (ANY,))),
    ),
    "segmenter_box": Contract(
        "segmenter_box",
        (_IMAGE, TensorSpec("boxes", "FP32", (ANY, 4))),
        (_MASKS, TensorSpec("scores", "FP32", (ANY,))),
    ),
}


class ContractError(RuntimeError):
    """A model in Triton does not match the contract of its role (names, dtypes, shapes)."""


class TritonUnavailable(RuntimeError):
    """Triton or the model cannot be reached or is not ready (maps to UNAVAILABLE)."""


class TritonRejected(ValueError):
    """Triton or the model refused the request as invalid (maps to INVALID_ARGUMENT); the message is the model's."""


class ModelFailed(RuntimeError):
    """The model raised while running a valid request (maps to INTERNAL; details go to the log only)."""


class RoleNotServed(LookupError):
    """No model is configured for a role (its name is empty in settings.models); maps to UNIMPLEMENTED."""


class TritonDeadline(TimeoutError):
    """The caller's deadline ran out while waiting for Triton (maps to DEADLINE_EXCEEDED)."""


def domain_error(exc: InferenceServerException, model: str) -> Exception | None:
    """The domain error for a failed Triton call, or None when Triton was UNAVAILABLE (worth a retry).

    Model messages for INVALID_ARG name positions and sizes, never image content or report text,
    so they pass through; any other failure is logged and answered without details.
    """
    status, message = exc.status() or "", exc.message() or ""
    if "UNAVAILABLE" in status:
        return None
    if "DEADLINE_EXCEEDED" in status or "CANCELLED" in status:
        # CANCELLED: the model gave the request up at its timeout (our deadline) a moment before gRPC did.
        return TritonDeadline(f"deadline exceeded while model {model!r} was running")
    if "NOT_FOUND" in status or "not found" in message or "not ready" in message:
        return TritonUnavailable(f"model {model!r} is not loaded or not ready")
    if "INVALID_ARG" in status:
        return TritonRejected(f"model {model!r} refused the request: {message}")
    log.error("model %s failed with %s", model, status)
    return ModelFailed(f"model {model!r} failed while running the request")


@dataclass
class ModelInfo:
    role: str
    name: str
    version: str
    max_batch_size: int
    labels: list[str] = field(default_factory=list)
    parameters: dict[str, str] = field(default_factory=dict)


def _dims_match(expected: tuple[int, ...], actual: list[int]) -> bool:
    if len(expected) != len(actual):
        return False
    return all(ANY in (e, a) or e == a for e, a in zip(expected, actual, strict=True))


def check_contract(contract: Contract, metadata: dict[str, Any], config: dict[str, Any]) -> None:
    """Raise ContractError naming every mismatch between a model's metadata and its role's contract."""
    batched = int(config.get("max_batch_size", 0)) > 0
    problems: list[str] = []
    for kind, expected_specs in (("input", contract.inputs), ("output", contract.outputs)):
        actual = {t["name"]: t for t in metadata.get(f"{kind}s", [])}
        for spec in expected_specs:
            tensor = actual.get(spec.name)
            if tensor is None:
                problems.append(f"missing {kind} {spec.name!r}")
                continue
            shape = [int(n) for n in tensor.get("shape", [])]
            if batched:
                shape = shape[1:]
            if tensor.get("datatype") != spec.datatype:
                problems.append(f"{kind} {spec.name!r} is {tensor.get('datatype')}, expected {spec.datatype}")
            if not _dims_match(spec.dims, shape):
                problems.append(f"{kind} {spec.name!r} has dims {shape}, expected {list(spec.dims)}")
    if problems:
        raise ContractError(f"model {metadata.get('name')!r} does not fit role {contract.role}: " + "; ".join(problems))


class TritonModels:
    """Async calls to the four model roles on one Triton, with contracts checked by :meth:`connect`."""

    def __init__(
        self,
        url: str,
        model_names: dict[str, str],
        *,
        retry_backoff_s: float = 0.05,
        shared_memory: str = _DEFAULTS.shared_memory,
        shared_memory_max_bytes: int = _DEFAULTS.shared_memory_max_bytes,
        shared_memory_min_tensor_bytes: int = _DEFAULTS.shared_memory_min_tensor_bytes,
        connect_timeout_s: float = _DEFAULTS.connect_timeout_s,
        ready_timeout_s: float = _DEFAULTS.ready_timeout_s,
        warmup_timeout_s: float = _DEFAULTS.warmup_timeout_s,
        keepalive_time_ms: int = _DEFAULTS.keepalive_time_ms,
        reconnect_backoff_max_ms: int = _DEFAULTS.reconnect_backoff_max_ms,
        probe_interval_s: float = _DEFAULTS.probe_interval_s,
        probe_timeout_s: float = _DEFAULTS.probe_timeout_s,
        probe_failures: int = _DEFAULTS.probe_failures,
        watch_models: list[str] | None = None,
    ) -> None:
        """``watch_models``: every model the watch needs READY before Triton counts as back (default: the roles')."""
        self.url = url
        self.model_names = model_names
        self.retry_backoff_s = retry_backoff_s
        self.reconnect_backoff_max_ms = reconnect_backoff_max_ms
        self.connect_timeout_s = connect_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.warmup_timeout_s = warmup_timeout_s
        self.keepalive_time_ms = keepalive_time_ms
        self._shm_min_bytes = shared_memory_min_tensor_bytes
        self.models: dict[str, ModelInfo] = {}
        # Which version each role's calls name (settings pins, the versions file); None: the highest at connect.
        self.versions: ServingVersions | None = None
        self._client: triton_aio.InferenceServerClient | None = None
        self._shared_memory = shared_memory
        self._shm_max_bytes = shared_memory_max_bytes
        self._shm: SharedMemoryPool | None = None
        # Sent with the calls of Triton's restricted protocols (shared memory) and model config/metadata.
        self.admin_headers = admin_headers()
        self.watch = TritonWatch(
            url,
            list(model_names.values()) if watch_models is None else watch_models,
            probe_interval_s=probe_interval_s,
            probe_timeout_s=probe_timeout_s,
            probe_failures=probe_failures,
            keepalive_time_ms=keepalive_time_ms,
            reconnect_backoff_max_ms=reconnect_backoff_max_ms,
        )
        self.watch.add_recovery_hook(self._recover)

    @classmethod
    def from_settings(cls, url: str, settings: Settings) -> TritonModels:
        """The image roles of ``settings.models`` on the Triton at ``url``, with every Triton limit from settings."""
        triton = settings.triton
        models = cls(
            url,
            settings.models.as_dict(),
            retry_backoff_s=settings.gateway.triton_retry_backoff_s,
            shared_memory=triton.shared_memory,
            shared_memory_max_bytes=triton.shared_memory_max_bytes,
            shared_memory_min_tensor_bytes=triton.shared_memory_min_tensor_bytes,
            connect_timeout_s=triton.connect_timeout_s,
            ready_timeout_s=triton.ready_timeout_s,
            warmup_timeout_s=triton.warmup_timeout_s,
            keepalive_time_ms=triton.keepalive_time_ms,
            reconnect_backoff_max_ms=triton.reconnect_backoff_max_ms,
            probe_interval_s=triton.probe_interval_s,
            probe_timeout_s=triton.probe_timeout_s,
            probe_failures=triton.probe_failures,
            watch_models=[
                *settings.models.as_dict().values(),
                *([settings.report.model] if settings.report.enabled and settings.report.model else []),
            ],
        )
        v = settings.versions
        models.versions = ServingVersions(v.file, v.pins(), reload_interval_s=v.reload_interval_s)
        return models

    @property
    def uses_shared_memory(self) -> bool:
        return self._shm is not None and self._shm.enabled

    @property
    def shared_memory_regions(self) -> list[str]:
        return self._shm.names if self._shm is not None else []

    def _wants_shared_memory(self) -> bool:
        if self._shared_memory == "on":
            return True
        if self._shared_memory != "auto":
            return False
        host = self.url.rsplit(":", 1)[0].strip("[]").lower()
        return host in {"127.0.0.1", "localhost", "::1"}

    @property
    def client(self) -> triton_aio.InferenceServerClient:
        if self._client is None:
            self._client = triton_aio.InferenceServerClient(
                self.url,
                channel_args=channel_args(
                    keepalive_time_ms=self.keepalive_time_ms, reconnect_backoff_max_ms=self.reconnect_backoff_max_ms
                ),
            )
        return self._client

    async def connect(self, *, timeout_s: float | None = None) -> dict[str, ModelInfo]:
        """Load each role's metadata and config and check its contract; raises ContractError or TritonUnavailable.

        ``timeout_s`` bounds each call (default: ``connect_timeout_s``).
        """
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        models: dict[str, ModelInfo] = {}
        for role, name in self.model_names.items():
            contract = CONTRACTS[role]
            try:
                metadata = await self.client.get_model_metadata(
                    name, headers=self.admin_headers, as_json=True, client_timeout=timeout_s
                )
                config = (
                    await self.client.get_model_config(
                        name, headers=self.admin_headers, as_json=True, client_timeout=timeout_s
                    )
                )["config"]
            except InferenceServerException as exc:
                raise TritonUnavailable(f"Triton at {self.url}: model {name!r} ({role}): {exc.message()}") from None
            check_contract(contract, metadata, config)
            parameters = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
            versions = metadata.get("versions") or ["1"]
            info = ModelInfo(
                role=role,
                name=name,
                version=str(max(versions, key=lambda v: int(v) if str(v).isdigit() else 0)),
                max_batch_size=int(config.get("max_batch_size", 0)),
                parameters=parameters,
            )
            info.labels = [s.strip() for s in parameters.get("labels", "").split(",") if s.strip()]
            models[role] = info
        self.models = models
        if self.versions is not None:
            self.versions.loaded = {role: info.version for role, info in models.items()}
        if self._wants_shared_memory() and self._shm is None:
            remove_stale_regions()
            self._shm = SharedMemoryPool(self.client, max_bytes=self._shm_max_bytes, headers=self.admin_headers)
        if "classifier" in models and not models["classifier"].labels:
            models["classifier"].labels = await self._classifier_labels()
        self.watch.start()
        return models

    async def _recover(self) -> None:
        """Before the watch turns up again: this channel answers, and our shared-memory regions are registered.

        A restarted Triton has forgotten every registration; the pool registers its regions again (and turns
        itself back on if a call had turned it off for a lost registration meanwhile).
        """
        if not await self.client.is_server_live(client_timeout=self.watch.probe_timeout_s):
            raise TritonUnavailable(f"Triton at {self.url} is not live on the calls' channel yet")
        if self._shm is not None:
            await self._shm.reregister()

    async def _classifier_labels(self) -> list[str]:
        """Class names through Triton's classification extension (the model's label_filename)."""
        info = self._role("classifier")
        probe = np.zeros((1, MODEL_SIZE, MODEL_SIZE), np.uint8)
        deadline = time.monotonic() + self.warmup_timeout_s
        plain = await self._infer(info, [("image", probe)], ["probabilities"], deadline=deadline)
        count = int(plain["probabilities"].shape[-1])
        output = triton_grpc.InferRequestedOutput("probabilities", class_count=count)
        inputs = [self._input("image", probe)]
        result = await self.client.infer(info.name, inputs, outputs=[output], client_timeout=self.warmup_timeout_s)
        labels = [""] * count
        for entry in result.as_numpy("probabilities").reshape(-1):
            parts = entry.decode().split(":", 2)
            if len(parts) == 3:
                labels[int(parts[1])] = parts[2]
        return [label or f"class_{i}" for i, label in enumerate(labels)]

    async def ready(self) -> dict[str, bool]:
        """Per-role readiness, for gRPC health; every role not ready, without asking, while Triton is down."""
        if not self.watch.up:
            return dict.fromkeys(self.model_names, False)
        states: dict[str, bool] = {}
        for role, name in self.model_names.items():
            try:
                states[role] = bool(await self.client.is_model_ready(name, client_timeout=self.ready_timeout_s))
            except InferenceServerException:
                states[role] = False
        return states

    async def close(self) -> None:
        await self.watch.stop()
        if self._shm is not None:
            await self._shm.close()
            self._shm = None
        if self._client is not None:
            await self._client.close()
            self._client = None

    @staticmethod
    def _datatype(array: np.ndarray) -> str:
        if array.dtype == np.object_:
            return "BYTES"
        return {np.dtype(np.uint8): "UINT8", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}[array.dtype]

    @classmethod
    def _input(cls, name: str, array: np.ndarray) -> triton_grpc.InferInput:
        tensor = triton_grpc.InferInput(name, list(array.shape), cls._datatype(array))
        tensor.set_data_from_numpy(array)
        return tensor

    async def _infer(
        self,
        info: ModelInfo,
        arrays: list[tuple[str, np.ndarray]],
        outputs: list[str],
        *,
        deadline: float,
        sized_outputs: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] | None = None,
        priority: int = 0,
    ) -> dict[str, np.ndarray]:
        """Run one request; ``sized_outputs`` (shape, dtype known in advance) may come back through shared memory.

        ``priority``: Triton's priority level (1 = highest; 0 or a level the model lacks = its default level).
        """
        tried = False
        while True:
            if not self.watch.up:
                raise TritonUnavailable(f"model {info.name!r} is unavailable: Triton is down ({self.watch.reason})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TritonDeadline(f"deadline exceeded before model {info.name!r} answered")
            region = await self._region_for(arrays, sized_outputs or {})
            try:
                inputs, requested, placed = self._request(arrays, outputs, sized_outputs or {}, region)
                started = time.perf_counter()
                result = await self.watch.guard(
                    self.client.infer(
                        info.name,
                        inputs,
                        model_version=info.version,
                        outputs=requested,
                        client_timeout=remaining,
                        timeout=request_timeout_us(remaining),
                        priority=priority,
                    )
                )
                TRITON_SECONDS.labels(model=info.name).observe(time.perf_counter() - started)
                answer: dict[str, np.ndarray] = {}
                for name in outputs:
                    if name in placed and region is not None:
                        shape = tuple(int(n) for n in result.get_output(name).shape)
                        answer[name] = region.read(placed[name], shape, (sized_outputs or {})[name][1])
                    else:
                        answer[name] = np.asarray(result.as_numpy(name))
                return answer
            except TritonDown:
                raise TritonUnavailable(f"model {info.name!r} is unavailable: Triton went down mid-call") from None
            except InferenceServerException as exc:
                if region is not None and "shared memory" in (exc.message() or "").lower() and self._shm is not None:
                    # Triton lost our registrations (restarted) or cannot map them: go over the wire.
                    await self._shm.disable("Triton refused a registered region", lost=True)
                    region = None
                    continue
                error = domain_error(exc, info.name)
                if error is not None:
                    raise error from None
                # UNAVAILABLE: one probe decides whether one more try is worth it (no retry spin, no log per call).
                no_time = deadline - time.monotonic() <= self.retry_backoff_s
                if tried or no_time or not await self.watch.confirm(deadline):
                    raise TritonUnavailable(f"model {info.name!r} is unavailable") from None
                tried = True
                await asyncio.sleep(self.retry_backoff_s)
            finally:
                if region is not None and self._shm is not None:
                    self._shm.release(region)

    async def _region_for(
        self, arrays: list[tuple[str, np.ndarray]], sized_outputs: dict[str, tuple[tuple[int, ...], np.dtype[Any]]]
    ) -> Any:
        if self._shm is None or not self._shm.enabled:
            return None
        sizes = [a.nbytes for _, a in arrays if a.dtype != np.object_ and a.nbytes >= self._shm_min_bytes]
        sizes += [int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in sized_outputs.values()]
        if not sizes:
            return None
        return await self._shm.acquire(needed_bytes(sizes))

    def _request(
        self,
        arrays: list[tuple[str, np.ndarray]],
        outputs: list[str],
        sized_outputs: dict[str, tuple[tuple[int, ...], np.dtype[Any]]],
        region: Any,
    ) -> tuple[list[triton_grpc.InferInput], list[triton_grpc.InferRequestedOutput], dict[str, int]]:
        inputs: list[triton_grpc.InferInput] = []
        for name, array in arrays:
            if region is not None and array.dtype != np.object_ and array.nbytes >= self._shm_min_bytes:
                tensor = triton_grpc.InferInput(name, list(array.shape), self._datatype(array))
                tensor.set_shared_memory(region.name, array.nbytes, offset=region.write(array))
                inputs.append(tensor)
            else:
                inputs.append(self._input(name, array))
        requested: list[triton_grpc.InferRequestedOutput] = []
        placed: dict[str, int] = {}
        for name in outputs:
            output = triton_grpc.InferRequestedOutput(name)
            if region is not None and name in sized_outputs:
                shape, dtype = sized_outputs[name]
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                placed[name] = region.reserve(nbytes)
                output.set_shared_memory(region.name, nbytes, offset=placed[name])
            requested.append(output)
        return inputs, requested, placed

    # --- the four roles ------------------------------------------------------------------------

    def _role(self, role: str, version: str = "") -> ModelInfo:
        """The role's model as a call names it: ``version``, else the serving one (:meth:`served`)."""
        info = self.served(role)
        return dataclasses.replace(info, version=version) if version and version != info.version else info

    def served(self, role: str) -> ModelInfo:
        """The role's model with the version its calls name now: pinned in settings, in the versions file, or the
        highest Triton had loaded at connect (so a version landing later never answers until it is promoted)."""
        info = self.models.get(role)
        if info is None:
            raise RoleNotServed(f"this server has no {role} model (settings.models.{role} is empty)")
        version = self.versions.serving(role) if self.versions is not None else ""
        return dataclasses.replace(info, version=version) if version and version != info.version else info

    async def classify(self, image: np.ndarray, *, deadline: float, version: str = "") -> np.ndarray:
        """Probabilities [C] for one letterboxed uint8 image (``version``: that one instead of the serving one)."""
        info = self._role("classifier", version)
        result = await self._infer(info, [("image", image[None])], ["probabilities"], deadline=deadline)
        return result["probabilities"][0]

    async def detect(
        self, image: np.ndarray, *, deadline: float, version: str = ""
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Boxes [K, 4] (model space), scores [K], label indices [K], highest score first (``version``: as classify)."""
        info = self._role("detector", version)
        result = await self._infer(
            info, [("image", image[None])], ["boxes", "scores", "labels", "count"], deadline=deadline
        )
        count = int(result["count"].reshape(-1)[0])
        return result["boxes"][0][:count], result["scores"][0][:count], result["labels"][0][:count]

    async def segment_text(
        self, image: np.ndarray, prompts: list[str], *, deadline: float
    ) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """Masks [N, 1024, 1024] uint8, scores [N], categories [N] for N text prompts."""
        info = self._role("segmenter_text")
        encoded = np.array([[p.encode("utf-8") for p in prompts]], dtype=np.object_)
        result = await self._infer(
            info,
            [("image", image[None]), ("prompts", encoded)],
            ["masks", "scores", "categories"],
            deadline=deadline,
            sized_outputs={"masks": _masks_shape(len(prompts))},
        )
        categories = [c.decode() if isinstance(c, bytes) else str(c) for c in result["categories"][0]]
        return result["masks"][0], result["scores"][0], categories

    async def segment_boxes(
        self, image: np.ndarray, boxes: np.ndarray, *, deadline: float, priority: int = 0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Masks [N, 1024, 1024] uint8 and predicted IoU [N] for N model-space boxes (``priority``: see _infer)."""
        info = self._role("segmenter_box")
        result = await self._infer(
            info,
            [("image", image[None]), ("boxes", boxes.astype(np.float32)[None])],
            ["masks", "scores"],
            deadline=deadline,
            sized_outputs={"masks": _masks_shape(len(boxes))},
            priority=priority,
        )
        return result["masks"][0], result["scores"][0]


def request_timeout_us(remaining_s: float) -> int:
    """The caller's remaining deadline as Triton's request timeout (microseconds, at least 1: 0 means none)."""
    return max(1, int(remaining_s * 1e6))


def _masks_shape(count: int) -> tuple[tuple[int, ...], np.dtype[Any]]:
    return (1, count, MODEL_SIZE, MODEL_SIZE), np.dtype(np.uint8)

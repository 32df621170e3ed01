"""The gateway's view of the ``impression`` model: its contract, readiness and typed, deadline-bound calls.

Kept apart from :class:`services.triton.client.TritonModels` (the image roles) so the Report service has
its own channel and lifecycle; the error classes, the deadlines (gRPC timeout and Triton's request timeout)
and the retry rule are the same: answered UNAVAILABLE at once while the watch (the gateway shares the image
roles' :class:`~services.triton.watch.TritonWatch`) says Triton is down, and tried once more after an
UNAVAILABLE only when a probe finds Triton answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import tritonclient.grpc as triton_grpc
import tritonclient.grpc.aio as triton_aio
from tritonclient.utils import InferenceServerException

from services.metrics import TRITON_SECONDS
from services.settings import Settings, TritonSettings
from services.triton.client import (
    Contract,
    ModelInfo,
    TensorSpec,
    TritonDeadline,
    TritonUnavailable,
    check_contract,
    domain_error,
    request_timeout_us,
)
from services.triton.watch import TritonDown, TritonWatch, channel_args

log = logging.getLogger("medgate.triton.impression")

# Defaults of the keyword arguments below; a server passes its own settings (ImpressionModel.from_settings).
_DEFAULTS = TritonSettings()

ROLE = "impression"
CONTRACT = Contract(
    ROLE,
    (TensorSpec("findings", "BYTES", (1,)),),
    (TensorSpec("impression", "BYTES", (1,)), TensorSpec("score", "FP32", (1,)), TensorSpec("evidence", "BYTES", (1,))),
)


@dataclass(frozen=True)
class ImpressionAnswer:
    """One report's answer; ``evidence`` holds the nearest training reports, nearest first."""

    impression: str
    score: float
    agreement: float
    top_similarity: float
    coverage: float
    evidence: list[dict[str, Any]] = field(default_factory=list)


def parse_answer(impression: bytes, score: float, evidence: bytes) -> ImpressionAnswer:
    details = json.loads(evidence.decode("utf-8")) if evidence else {}
    return ImpressionAnswer(
        impression=impression.decode("utf-8"),
        score=float(score),
        agreement=float(details.get("agreement", 0.0)),
        top_similarity=float(details.get("top_similarity", 0.0)),
        coverage=float(details.get("coverage", 0.0)),
        evidence=list(details.get("neighbours", [])),
    )


class ImpressionModel:
    """Calls to one Triton model with the impression contract, checked by :meth:`connect`."""

    def __init__(
        self,
        url: str,
        name: str = ROLE,
        *,
        retry_backoff_s: float = 0.05,
        connect_timeout_s: float = _DEFAULTS.connect_timeout_s,
        ready_timeout_s: float = _DEFAULTS.ready_timeout_s,
        keepalive_time_ms: int = _DEFAULTS.keepalive_time_ms,
        reconnect_backoff_max_ms: int = _DEFAULTS.reconnect_backoff_max_ms,
        watch: TritonWatch | None = None,
    ) -> None:
        """``watch``: the gateway's watch on this Triton (None: no fast failure, an UNAVAILABLE is final)."""
        self.url = url
        self.name = name
        self.retry_backoff_s = retry_backoff_s
        self.connect_timeout_s = connect_timeout_s
        self.ready_timeout_s = ready_timeout_s
        self.keepalive_time_ms = keepalive_time_ms
        self.reconnect_backoff_max_ms = reconnect_backoff_max_ms
        self.watch = watch
        self.info: ModelInfo | None = None
        self._client: triton_aio.InferenceServerClient | None = None
        if watch is not None:
            watch.add_recovery_hook(self._recover)

    @classmethod
    def from_settings(cls, url: str, settings: Settings, *, watch: TritonWatch | None = None) -> ImpressionModel:
        """``settings.report.model`` on the Triton at ``url``, with the Triton timeouts from settings."""
        return cls(
            url,
            settings.report.model,
            retry_backoff_s=settings.gateway.triton_retry_backoff_s,
            connect_timeout_s=settings.triton.connect_timeout_s,
            ready_timeout_s=settings.triton.ready_timeout_s,
            keepalive_time_ms=settings.triton.keepalive_time_ms,
            reconnect_backoff_max_ms=settings.triton.reconnect_backoff_max_ms,
            watch=watch,
        )

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

    async def _recover(self) -> None:
        """Before the watch turns up again: this model's own channel answers too."""
        if not await self.client.is_server_live(client_timeout=self.ready_timeout_s):
            raise TritonUnavailable(f"Triton at {self.url} is not live on the report channel yet")

    async def connect(self, *, timeout_s: float | None = None) -> ModelInfo:
        """Check the model's metadata against the contract; raises ContractError or TritonUnavailable.

        ``timeout_s`` bounds each call (default: ``connect_timeout_s``).
        """
        timeout_s = self.connect_timeout_s if timeout_s is None else timeout_s
        try:
            metadata = await self.client.get_model_metadata(self.name, as_json=True, client_timeout=timeout_s)
            config = (await self.client.get_model_config(self.name, as_json=True, client_timeout=timeout_s))["config"]
        except InferenceServerException as exc:
            raise TritonUnavailable(f"Triton at {self.url}: model {self.name!r} ({ROLE}): {exc.message()}") from None
        check_contract(CONTRACT, metadata, config)
        versions = metadata.get("versions") or ["1"]
        self.info = ModelInfo(
            role=ROLE,
            name=self.name,
            version=str(max(versions, key=lambda v: int(v) if str(v).isdigit() else 0)),
            max_batch_size=int(config.get("max_batch_size", 0)),
        )
        return self.info

    async def ready(self) -> bool:
        if self.watch is not None and not self.watch.up:
            return False
        try:
            return bool(await self.client.is_model_ready(self.name, client_timeout=self.ready_timeout_s))
        except InferenceServerException:
            return False

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def predict(self, findings: list[str], *, deadline: float) -> list[ImpressionAnswer]:
        """One answer per findings text, in order; all texts go to Triton as one request."""
        data = np.array([[text.encode("utf-8")] for text in findings], dtype=np.object_)
        tensor = triton_grpc.InferInput("findings", list(data.shape), "BYTES")
        tensor.set_data_from_numpy(data)
        outputs = [triton_grpc.InferRequestedOutput(n) for n in ("impression", "score", "evidence")]
        tried = False
        while True:
            if self.watch is not None and not self.watch.up:
                raise TritonUnavailable(f"model {self.name!r} is unavailable: Triton is down ({self.watch.reason})")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TritonDeadline(f"deadline exceeded before model {self.name!r} answered")
            try:
                started = time.perf_counter()
                call = self.client.infer(
                    self.name,
                    [tensor],
                    outputs=outputs,
                    client_timeout=remaining,
                    timeout=request_timeout_us(remaining),
                )
                result = await (call if self.watch is None else self.watch.guard(call))
                TRITON_SECONDS.labels(model=self.name).observe(time.perf_counter() - started)
                break
            except TritonDown:
                raise TritonUnavailable(f"model {self.name!r} is unavailable: Triton went down mid-call") from None
            except InferenceServerException as exc:
                error = domain_error(exc, self.name)
                if error is not None:
                    raise error from None
                no_time = deadline - time.monotonic() <= self.retry_backoff_s
                if tried or no_time or self.watch is None or not await self.watch.confirm(deadline):
                    raise TritonUnavailable(f"model {self.name!r} is unavailable") from None
                tried = True
                await asyncio.sleep(self.retry_backoff_s)
        impressions = result.as_numpy("impression").reshape(-1)
        scores = result.as_numpy("score").reshape(-1)
        evidence = result.as_numpy("evidence").reshape(-1)
        return [parse_answer(i, s, e) for i, s, e in zip(impressions, scores, evidence, strict=True)]

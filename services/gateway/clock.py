"""Per-request stage timings of the Inference servicer: laps of one stopwatch that add up to the total."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from medgate.v1 import inference_pb2 as pb
from services.imaging.prepare import PreparedImage
from services.metrics import observe_stages


@dataclass
class Clock:
    """Per-request stage timings in milliseconds that add up to the total.

    The stages are laps of one stopwatch on the caller's path: each begins where the one before ended, so a
    wait for a CPU thread, the event loop or the GIL counts in the stage it delays, and nothing falls between
    stages (what is left is the answer's last fields, well under a millisecond). Model calls that run side by
    side (Analyze's tasks) are one lap: ``triton`` is its wall time, less the mask encoding done inside it.
    """

    started: float
    decode_ms: float = 0.0
    preprocess_ms: float = 0.0
    triton_ms: float = 0.0
    encode_ms: float = 0.0
    dicom_ms: float = 0.0
    route_ms: float = 0.0
    models: set[str] = field(default_factory=set)  # the Triton models this request used
    _mark: float | None = None
    _total_ms: float | None = None

    def lap(self) -> float:
        """Milliseconds since the previous lap ended (or the request began); the next lap begins now."""
        now = time.perf_counter()
        elapsed = (now - (self.started if self._mark is None else self._mark)) * 1000.0
        self._mark = now
        return elapsed

    def models_lap(self, encode_before_ms: float) -> None:
        """The model stage just ended: its lap, less the encoding done inside it (``encode_ms`` grew), is triton."""
        self.triton_ms += max(0.0, self.lap() - (self.encode_ms - encode_before_ms))

    def stop(self) -> float:
        """The total (ms), fixed at the first call: the answer's timings and the histograms then agree."""
        if self._total_ms is None:
            self._total_ms = (time.perf_counter() - self.started) * 1000.0
        return self._total_ms

    def observe(self, rpc: str, prepared: PreparedImage) -> None:
        """Record this request's stages in the Prometheus histograms."""
        stages = {
            "decode": self.decode_ms / 1000.0,
            "preprocess": self.preprocess_ms / 1000.0,
            "triton": self.triton_ms / 1000.0,
            "encode": self.encode_ms / 1000.0,
            "total": self.stop() / 1000.0,
        }
        if self.dicom_ms:
            stages["dicom"] = self.dicom_ms / 1000.0
        if self.route_ms:
            stages["route"] = self.route_ms / 1000.0
        observe_stages(rpc, "+".join(sorted(self.models)) or "none", prepared.decoded.kind.value, stages)

    def to_proto(self) -> pb.StageTimings:
        return pb.StageTimings(
            decode_ms=self.decode_ms,
            preprocess_ms=self.preprocess_ms,
            triton_ms=self.triton_ms,
            encode_ms=self.encode_ms,
            total_ms=self.stop(),
            dicom_ms=self.dicom_ms,
            route_ms=self.route_ms,
        )

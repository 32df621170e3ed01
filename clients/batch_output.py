"""``medgate batch``, the files it writes: the resume state, each answer's JSON/NPZ/overlay, the summary.

Every file is written under a temporary name, fsynced and renamed, so an interrupted run leaves
either a file's complete outputs or none; ``state.jsonl`` is appended and fsynced per file.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
from google.protobuf import json_format

from clients.batch_scan import Item
from clients.infer import array_of, dicom_result_path
from medgate.v1 import inference_pb2 as pb

log = logging.getLogger("medgate.batch")

STATE_FILE = "state.jsonl"
SUMMARY_FILE = "summary.csv"
PARTIAL_SUFFIX = ".partial"
SUMMARY_COLUMNS = (
    "study",
    "series",
    "file",
    "status",
    "top_label",
    "top_score",
    "detections",
    "routed_to_review",
    "review_flows",
    "error",
    "output",
)


def load_state(out: Path) -> dict[str, dict[str, Any]]:
    """The last record per key; a torn last line (a crash mid-append) is ignored."""
    records: dict[str, dict[str, Any]] = {}
    path = out / STATE_FILE
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "key" in record:
            records[str(record["key"])] = record
    return records


def is_done(record: dict[str, Any] | None, out: Path) -> bool:
    return bool(record and record.get("status") == "ok" and all((out / o).exists() for o in record.get("outputs", [])))


class StateLog:
    """OUT/state.jsonl: one JSON line per finished file, appended and fsynced before the next."""

    def __init__(self, out: Path) -> None:
        self.path = out / STATE_FILE
        self._handle: IO[str] = self.path.open("a", encoding="utf-8")
        # A line torn by a crash mid-append must not glue itself to the next record.
        if self._handle.tell() > 0 and not self.path.read_bytes().endswith(b"\n"):
            self._handle.write("\n")

    def append(self, record: dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()


def _write_atomic(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write to a temporary name beside ``path``, fsync, then rename over it.

    Not :func:`services.durable.write_durable`: ``write`` streams (``np.savez_compressed``), the fixed name
    is what :func:`sweep_partials` clears, and no folder fsync per file (a rename lost to a power cut only
    makes :func:`is_done` redo that file, since its state line names outputs that are then missing).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}{PARTIAL_SUFFIX}")
    with temporary.open("wb") as handle:
        write(handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def sweep_partials(out: Path) -> int:
    """Remove temporary files an interrupted run left behind."""
    removed = 0
    for leftover in out.rglob(f".*{PARTIAL_SUFFIX}"):
        with contextlib.suppress(OSError):
            leftover.unlink()
            removed += 1
    return removed


# ---------------------------------------------------------------------------------------------
# One answer -> files and a record


def _strip_array(document: dict[str, Any], field: str, npz_name: str, npz_key: str) -> None:
    """Replace an NDArray's base64 data in the JSON form by a pointer to the NPZ member."""
    value = document.get(field)
    if isinstance(value, dict):
        value.pop("data", None)
        value.pop("encoding", None)  # the NPZ holds decoded arrays, whatever the wire encoding
        value["npz"] = npz_name
        value["npz_key"] = npz_key


def write_outputs(
    out: Path, item: Item, response: pb.AnalyzeResponse, *, overlay: bool, dicom_out: Path | None = None
) -> list[str]:
    """The response as JSON (masks stripped), masks as NPZ, optionally an overlay PNG and the DICOM results
    (``dicom_out/<SOPInstanceUID>.dcm``, their bytes stripped from the JSON); returns the paths."""
    stem = out / item.output
    npz_path = stem.with_name(stem.name + ".npz")
    written: list[str] = []
    arrays: dict[str, np.ndarray] = {}
    document = json_format.MessageToDict(response, preserving_proto_field_name=True)
    if response.HasField("segmentation"):
        segmentation = response.segmentation
        if segmentation.HasField("image_features"):
            arrays["masks"] = array_of(segmentation.image_features)
        if segmentation.HasField("original_masks"):
            arrays["original_masks"] = array_of(segmentation.original_masks)
        section = document.get("segmentation", {})
        _strip_array(section, "image_features", npz_path.name, "masks")
        _strip_array(section, "original_masks", npz_path.name, "original_masks")
        arrays["prompts"] = np.array([p.prompt for p in segmentation.prompts], dtype=str)
        arrays["categories"] = np.array(list(segmentation.text_features), dtype=str)
    if arrays:

        def save(handle: IO[bytes]) -> None:
            np.savez_compressed(handle, **arrays)

        _write_atomic(npz_path, save)
        written.append(npz_path.relative_to(out).as_posix())
    if dicom_out is not None and response.dicom_results:
        for obj, entry in zip(response.dicom_results, document.get("dicom_results", []), strict=True):
            path = dicom_result_path(dicom_out, obj)
            _write_atomic(path, _writer(obj.data))
            entry.pop("data", None)
            entry["file"] = _relative(path, out)
            written.append(_relative(path, out))
    if overlay:
        png = _overlay_png(item, response, arrays.get("masks"))
        if png is not None:
            overlay_path = stem.with_name(stem.name + ".overlay.png")
            _write_atomic(overlay_path, lambda handle: handle.write(png))
            written.append(overlay_path.relative_to(out).as_posix())
    json_path = stem.with_name(stem.name + ".json")
    text = json.dumps(document, indent=1).encode()
    _write_atomic(json_path, lambda handle: handle.write(text))
    written.append(json_path.relative_to(out).as_posix())
    return written


def _writer(data: bytes) -> Callable[[IO[bytes]], object]:
    return lambda handle: handle.write(data)


def _relative(path: Path, out: Path) -> str:
    """``path`` relative to OUT when inside it, else absolute (``out / entry`` finds it either way)."""
    try:
        return path.resolve().relative_to(out.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _overlay_png(item: Item, response: pb.AnalyzeResponse, masks: np.ndarray | None) -> bytes | None:
    import cv2

    from clients.infer import draw_overlay, model_image_of

    try:
        image = model_image_of(item.path.read_bytes())
    except Exception as exc:  # the gateway read it; a local decode failure costs the overlay only
        log.warning("%s: no overlay (%s)", item.name, type(exc).__name__)
        return None
    ok, encoded = cv2.imencode(".png", draw_overlay(image, response, masks=masks))
    return encoded.tobytes() if ok else None


def record_for(item: Item) -> dict[str, Any]:
    return {
        "key": item.key,
        "file": item.name,
        "kind": item.kind,
        "study": item.study,
        "series": item.series,
        "output": item.output,
    }


def ok_record(item: Item, response: pb.AnalyzeResponse, outputs: list[str]) -> dict[str, Any]:
    record = record_for(item)
    classification = response.classification if response.HasField("classification") else None
    detection = response.detection if response.HasField("detection") else None
    flows = sorted({r.flow_definition for r in response.review if r.routed or r.queued})
    record.update(
        status="ok",
        top_label=classification.top_label if classification else "",
        top_score=round(float(classification.top_score), 4) if classification else None,
        detections=len(detection.detections) if detection else None,
        best_detection=round(float(detection.detections[0].score), 4) if detection and detection.detections else None,
        routed_to_review=bool(flows),
        review_flows=flows,
        outputs=outputs,
        finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )
    return record


def failed_record(item: Item, code: str, message: str) -> dict[str, Any]:
    record = record_for(item)
    record.update(
        status="failed", error_code=code, error=message, outputs=[], finished=time.strftime("%Y-%m-%dT%H:%M:%S%z")
    )
    return record


def summary_rows(
    items: list[Item], duplicates: list[tuple[Item, Item]], state: dict[str, dict[str, Any]]
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for item in items:
        record = state.get(item.key) or {}
        status = record.get("status", "pending")
        error = f"{record.get('error_code')}: {record.get('error')}" if status == "failed" else ""
        json_output = next((o for o in record.get("outputs", []) if o.endswith(".json")), "")
        rows.append(
            {
                "study": item.study,
                "series": item.series,
                "file": item.name,
                "status": status,
                "top_label": record.get("top_label", ""),
                "top_score": "" if record.get("top_score") is None else record["top_score"],
                "detections": "" if record.get("detections") is None else record["detections"],
                "routed_to_review": "yes" if record.get("routed_to_review") else ("no" if status == "ok" else ""),
                "review_flows": " ".join(record.get("review_flows", [])),
                "error": error,
                "output": json_output,
            }
        )
    for duplicate, first in duplicates:
        rows.append(
            {
                **dict.fromkeys(SUMMARY_COLUMNS, ""),
                "study": duplicate.study,
                "series": duplicate.series,
                "file": duplicate.name,
                "status": "duplicate",
                "error": f"same {duplicate.key.split(':')[0]} as {first.name}",
            }
        )
    rows.sort(key=lambda r: (r["study"], r["series"], r["file"]))
    return rows


def write_summary(out: Path, rows: list[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    path = out / SUMMARY_FILE
    data = buffer.getvalue().encode()
    _write_atomic(path, lambda handle: handle.write(data))
    return path


def format_tables(rows: list[dict[str, Any]]) -> str:
    """Per study: counts, top findings, cases sent to review and failures."""
    studies: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        studies.setdefault(row["study"], []).append(row)
    lines: list[str] = []
    header = f"{'images':>6} {'series':>6} {'ok':>4} {'failed':>6} {'pending':>7} {'review':>6} {'detections':>10}"
    for study, members in studies.items():
        status = Counter(r["status"] for r in members)
        routed = [r for r in members if r["routed_to_review"] == "yes"]
        detections = sum(int(r["detections"]) for r in members if r["detections"] != "")
        series = len({r["series"] for r in members})
        lines.append(f"study {study}")
        lines.append("  " + header)
        lines.append(
            f"  {len(members):>6} {series:>6} {status['ok']:>4} {status['failed']:>6} {status['pending']:>7}"
            f" {len(routed):>6} {detections:>10}"
        )
        findings = Counter(r["top_label"] for r in members if r["top_label"])
        if findings:
            lines.append("  top findings: " + ", ".join(f"{label} {count}" for label, count in findings.most_common()))
        for row in routed:
            lines.append(f"  to review: {row['file']} ({row['review_flows']})")
        for row in members:
            if row["status"] == "failed":
                lines.append(f"  failed: {row['file']}: {row['error']}")
            elif row["status"] == "duplicate":
                lines.append(f"  skipped: {row['file']}: {row['error']}")
        lines.append("")
    return "\n".join(lines)

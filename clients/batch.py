"""``medgate batch``: folders of studies through ``AnalyzeStream``, resumable, with JSON, NPZ and overlay outputs.

Files are recognised by content (DICOM preamble or a parseable data set, PNG and JPEG magic),
never by extension, and grouped by StudyInstanceUID/SeriesInstanceUID read from the header
alone; PNG and JPEG files form one pseudo-study per folder. Each file is one stream item whose
request_id is a stable key (``sop:<SOPInstanceUID>`` for DICOM, ``sha256:<digest>`` otherwise);
``OUT/state.jsonl`` records every finished file (appended and fsynced), so a second run skips
what is done and retries what failed. Outputs are written under temporary names and renamed, so
Ctrl-C or a kill leaves either a file's complete outputs or none. A multi-frame object is one
image (the gateway takes its middle frame).

Exit status: 0 when every file is done, 1 when a file failed or the stream broke, 2 when there is
nothing to do, 130 after Ctrl-C.

Layout of OUT::

    state.jsonl                       one line per finished file (the last line per key wins)
    summary.csv                       one row per input image
    <study>/<series>/<SOPInstanceUID>.json|.npz|.overlay.png   DICOM with UIDs
    files/<path relative to the input root>.json|.npz|...      PNG, JPEG and DICOM without UIDs

Nothing here prints or logs patient names, IDs or dates: files are named by their paths and UIDs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import hashlib
import io
import json
import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from google.protobuf import json_format

from clients.infer import MASK_SPACES, MAX_MESSAGE_BYTES, TASKS, array_of
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc

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
DEFAULT_PROMPTS = "left lung & right lung & heart & lesion"
# The gateway works on 4 items of one stream at a time; more in flight only queue there.
DEFAULT_CONCURRENCY = 4
# Enough of the file to sniff every supported magic number (NIfTI's header is 348 bytes).
_HEAD_BYTES = 512
_DEFLATED_TS = "1.2.840.10008.1.2.1.99"
_HEADER_TAGS = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# Local failures get names in the spirit of the gRPC codes the gateway uses for its own.
UNREADABLE = "UNREADABLE"
NOT_AN_IMAGE = "INVALID_ARGUMENT"


# ---------------------------------------------------------------------------------------------
# Finding files


@dataclass(frozen=True)
class Item:
    """One input file: how it was recognised, its stable key, its group and where its outputs go."""

    path: Path
    name: str  # relative to the batch root, POSIX separators: what reports show
    kind: str  # "DICOM", "PNG" or "JPEG"
    key: str  # request_id and resume key
    study: str
    series: str
    output: str  # output stem relative to OUT, POSIX separators
    error: tuple[str, str] | None = None  # (code, message) when the file failed before sending


@dataclass
class Discovery:
    items: list[Item]
    duplicates: list[tuple[Item, Item]]  # (duplicate, the first file with the same key)
    ignored: int  # files that are neither DICOM, PNG nor JPEG (folder scans only)


def _sniff_kind(head: bytes) -> str | None:
    """DICOM, PNG or JPEG from the first bytes; "BARE?" when it may be a DICOM data set without preamble."""
    from services.imaging.ingest import InputKind, _may_be_bare_dicom, _sniff

    kind = _sniff(head)
    if kind is InputKind.DICOM:
        return "DICOM"
    if kind is InputKind.PNG:
        return "PNG"
    if kind is InputKind.JPEG:
        return "JPEG"
    if kind is None and _may_be_bare_dicom(head):
        return "BARE?"
    return None


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom's warnings and log records can quote header values (names, birth dates): keep them out."""
    logger = logging.getLogger("pydicom")
    previous = logger.disabled
    logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.disabled = previous


def _read_header(path: Path, *, bare: bool) -> dict[str, str] | None:
    """The grouping UIDs from the header alone (no pixels), or None when it does not parse as DICOM.

    A Deflated data set is not inflated here (pydicom would inflate all of it, without a bound);
    the gateway reads it with its limits and the file is grouped by folder.
    """
    import pydicom
    from pydicom.filereader import read_file_meta_info

    with _quiet_pydicom():
        try:
            if not bare and str(read_file_meta_info(path).get("TransferSyntaxUID", "")) == _DEFLATED_TS:
                return {}
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(_HEADER_TAGS), force=bare)
            values = {tag: str(ds.get(tag, "") or "").strip() for tag in _HEADER_TAGS}
        except Exception:  # pydicom raises many types on malformed headers; none may stop the scan
            return None
    if bare and not (values["SOPInstanceUID"] or values["StudyInstanceUID"]):
        return None  # force=True reads nearly anything: only a data set with UIDs counts as DICOM
    return values


def _safe(text: str, limit: int = 96) -> str:
    cleaned = _SAFE_NAME.sub("_", text).strip("._") or "_"
    return cleaned[:limit]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _walk(inputs: Sequence[Path], out: Path) -> Iterator[tuple[Path, bool]]:
    """(file, named explicitly) once each, in a stable order; OUT and hidden entries are skipped in folder scans."""
    out_resolved = out.resolve()
    named = {p.resolve() for p in inputs if not p.is_dir()}
    seen: set[Path] = set()

    def once(path: Path) -> Iterator[tuple[Path, bool]]:
        resolved = path.resolve()
        if resolved not in seen:
            seen.add(resolved)
            yield path, resolved in named

    for given in inputs:
        if not given.is_dir():
            yield from once(given)
            continue
        for folder, dirs, files in os.walk(given):
            here = Path(folder)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".") and (here / d).resolve() != out_resolved)
            for name in sorted(files):
                if not name.startswith("."):
                    yield from once(here / name)


def batch_root(inputs: Sequence[Path]) -> Path:
    """The folder that reported paths are relative to: the common parent of every input."""
    resolved = [p.resolve() for p in inputs]
    common = Path(os.path.commonpath([str(p) for p in resolved]))
    return common.parent if len(resolved) == 1 and not resolved[0].is_dir() else common


def discover(inputs: Sequence[Path], out: Path) -> Discovery:
    """Recognise and group every file under ``inputs`` by content, in a stable order."""
    root = batch_root(inputs)
    items: list[Item] = []
    first_by_key: dict[str, Item] = {}
    duplicates: list[tuple[Item, Item]] = []
    ignored = 0
    for path, explicit in _walk(inputs, out):
        absolute = path.resolve()
        try:
            name = absolute.relative_to(root).as_posix()
        except ValueError:
            name = absolute.as_posix().lstrip("/")
        folder = Path(name).parent.as_posix()
        pseudo_study = f"folder:{root.name}" + ("" if folder == "." else f"/{folder}")
        fallback_output = f"files/{name}"
        item: Item | None = None
        failure = (NOT_AN_IMAGE, "not a DICOM, PNG or JPEG file")
        try:
            with absolute.open("rb") as handle:
                head = handle.read(_HEAD_BYTES)
            kind = _sniff_kind(head)
            header: dict[str, str] | None = None
            if kind in ("DICOM", "BARE?"):
                header = _read_header(absolute, bare=kind == "BARE?")
                if kind == "BARE?":
                    kind = "DICOM" if header is not None else None
            if kind is None:
                if not explicit:
                    ignored += 1
                    continue
            else:
                header = header or {}
                sop, study, series = (header.get(t, "") for t in _HEADER_TAGS[:3])
                key = f"sop:{sop}" if sop else f"sha256:{_sha256(absolute)}"
                if kind == "DICOM" and sop and study:
                    output = f"{_safe(study)}/{_safe(series or 'no-series')}/{_safe(sop)}"
                    item = Item(path, name, kind, key, study, series, output)
                else:
                    item = Item(path, name, kind, key, study or pseudo_study, series, fallback_output)
        except OSError as exc:
            failure = (UNREADABLE, f"could not read the file ({type(exc).__name__})")
        if item is None:
            item = Item(path, name, "?", f"path:{name}", pseudo_study, "", fallback_output, failure)
        if item.key in first_by_key:
            duplicates.append((item, first_by_key[item.key]))
            continue
        first_by_key[item.key] = item
        items.append(item)
    return Discovery(items, duplicates, ignored)


# ---------------------------------------------------------------------------------------------
# State and atomic outputs


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
    """Write to a temporary name beside ``path``, fsync, then rename over it."""
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


def write_outputs(out: Path, item: Item, response: pb.AnalyzeResponse, *, overlay: bool) -> list[str]:
    """The response as JSON (masks stripped), masks as NPZ, optionally an overlay PNG; returns the paths."""
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


# ---------------------------------------------------------------------------------------------
# The stream


@dataclass(frozen=True)
class Options:
    tasks: list[pb.Task]
    prompts: str
    mask_space: pb.MaskSpace
    min_score: float
    overlays: bool
    concurrency: int
    # The gateway refuses bigger messages, and would end the whole stream doing so: check each file first.
    max_file_bytes: int = 64 * 1024 * 1024


def build_request(item: Item, data: bytes, options: Options) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        image=pb.ImageInput(data=data),
        tasks=options.tasks,
        prompts=options.prompts if pb.TASK_SEGMENT in options.tasks else "",
        # Bit-packed masks are 8x smaller on the wire; the NPZ holds them decoded.
        output=pb.OutputOptions(mask_space=options.mask_space, mask_encoding=pb.ARRAY_ENCODING_PACKBITS),
        min_score=options.min_score,
        request_id=item.key,
    )


class Batch:
    """One run over the to-do list: the stream, the bounded window, the output writers, the records."""

    def __init__(self, out: Path, options: Options, state: StateLog, progress: Any) -> None:
        self.out = out
        self.options = options
        self.state = state
        self.progress = progress
        self.stream_error: str | None = None

    def finish(self, record: dict[str, Any]) -> None:
        self.state.append(record)
        if record["status"] != "ok":
            self.progress.write(f"failed: {record['file']}: {record['error_code']}: {record['error']}", file=sys.stderr)
        self.progress.update(1)

    async def run(self, target: str, todo: list[Item]) -> None:
        for item in todo:
            if item.error is not None:
                self.finish(failed_record(item, *item.error))
        sendable = [item for item in todo if item.error is None]
        if not sendable:
            return
        window = asyncio.Semaphore(max(1, self.options.concurrency))
        in_flight: dict[str, Item] = {}
        writers: set[asyncio.Task[None]] = set()

        async def requests() -> AsyncIterator[pb.AnalyzeRequest]:
            for item in sendable:
                await window.acquire()
                try:
                    size = item.path.stat().st_size
                    too_big = size > self.options.max_file_bytes
                    data = b"" if too_big else await asyncio.to_thread(item.path.read_bytes)
                except OSError as exc:
                    self.finish(failed_record(item, UNREADABLE, f"could not read the file ({type(exc).__name__})"))
                    window.release()
                    continue
                if too_big:
                    limit_mib = self.options.max_file_bytes / (1 << 20)
                    message = f"the file is {size / (1 << 20):.1f} MiB; the gateway takes at most {limit_mib:.0f} MiB"
                    self.finish(failed_record(item, "RESOURCE_EXHAUSTED", message))
                    window.release()
                    continue
                in_flight[item.key] = item
                yield build_request(item, data, self.options)

        async def write(item: Item, answer: pb.AnalyzeStreamResponse) -> None:
            try:
                if answer.HasField("error"):
                    record = failed_record(item, answer.error.code_name or str(answer.error.code), answer.error.message)
                else:
                    try:
                        outputs = await asyncio.to_thread(
                            write_outputs, self.out, item, answer.response, overlay=self.options.overlays
                        )
                        record = ok_record(item, answer.response, outputs)
                    except OSError as exc:
                        record = failed_record(item, "OUTPUT_ERROR", f"could not write outputs ({exc.strerror})")
                self.finish(record)
            finally:
                window.release()

        options = [
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ]
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            call = pb_grpc.InferenceStub(channel).AnalyzeStream(requests())
            try:
                async for answer in call:
                    if answer.request_id not in in_flight:
                        log.warning("answer for an unknown request_id %r ignored", answer.request_id)
                        continue
                    item = in_flight.pop(answer.request_id)
                    task = asyncio.create_task(write(item, answer))
                    writers.add(task)
                    task.add_done_callback(writers.discard)
            except grpc.aio.AioRpcError as exc:
                # Not any one file's fault: what was in flight stays pending for the next run.
                self.stream_error = f"{exc.code().name}: {exc.details()}"
            finally:
                if writers:
                    await asyncio.gather(*writers)
            if in_flight and self.stream_error is None:
                self.stream_error = f"the gateway ended the stream with {len(in_flight)} file(s) unanswered"


# ---------------------------------------------------------------------------------------------
# Summary


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


# ---------------------------------------------------------------------------------------------
# Command line


def parse_tasks(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"tasks are a comma-separated subset of {','.join(TASKS)}, got {text!r}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", type=Path, metavar="DIR|FILE", help="folders (scanned) and files")
    parser.add_argument("--out", type=Path, required=True, help="output folder (state, summary, JSON/NPZ/PNG)")
    parser.add_argument(
        "--tasks", type=parse_tasks, default=["classify", "detect"], help="comma-separated: classify,detect,segment"
    )
    parser.add_argument("--prompts", help=f"text prompts for segment, '&'-separated (default {DEFAULT_PROMPTS!r})")
    parser.add_argument(
        "--mask-space",
        choices=sorted(MASK_SPACES),
        default="model",
        help="NPZ masks: model space, original grid or both",
    )
    parser.add_argument("--min-score", type=float, default=0.0, help="drop detections below this score")
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, help="files in flight at once")
    parser.add_argument("--overlays", action="store_true", help="also write <name>.overlay.png per image")
    parser.add_argument("--limit", type=int, help="process at most this many new files in this run (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--target", default=None, help="gateway host:port (default: from settings, 127.0.0.1:50051)")


def options_from(args: argparse.Namespace) -> Options:
    from services.settings import load_settings

    tasks = [TASKS[t] for t in args.tasks]
    return Options(
        tasks=tasks,
        prompts=args.prompts or DEFAULT_PROMPTS,
        mask_space=MASK_SPACES[args.mask_space],
        min_score=args.min_score,
        overlays=args.overlays,
        concurrency=args.concurrency,
        max_file_bytes=load_settings().gateway.max_receive_message_bytes - 64 * 1024,  # room for the envelope
    )


async def run_async(args: argparse.Namespace, target: str, *, stdout: IO[str] | None = None) -> int:
    """The whole batch; returns the exit status (0 all done, 1 a file failed, 2 nothing to do)."""
    from tqdm import tqdm

    stdout = stdout or sys.stdout
    out: Path = args.out
    missing = [str(p) for p in args.inputs if not p.exists()]
    if missing:
        print(f"error: no such file or folder: {', '.join(missing)}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    sweep_partials(out)
    found = await asyncio.to_thread(discover, args.inputs, out)
    if not found.items:
        print("error: no DICOM, PNG or JPEG files found", file=sys.stderr)
        return 2
    state = load_state(out)
    todo = [item for item in found.items if not is_done(state.get(item.key), out)]
    done_before = len(found.items) - len(todo)
    if args.limit is not None:
        todo = todo[: max(0, args.limit)]
    print(
        f"{len(found.items)} images in {len({i.study for i in found.items})} studies"
        f" ({done_before} already done, {len(todo)} to process"
        + (f", {found.ignored} other files ignored" if found.ignored else "")
        + (f", {len(found.duplicates)} duplicates skipped" if found.duplicates else "")
        + f"); target {target}",
        file=sys.stderr,
    )
    log_state = StateLog(out)
    progress = tqdm(total=len(todo), unit="file", file=sys.stderr, disable=args.no_progress, dynamic_ncols=True)
    batch = Batch(out, options_from(args), log_state, progress)
    try:
        await batch.run(target, todo)
    finally:
        progress.close()
        log_state.close()
        state = load_state(out)
        rows = summary_rows(found.items, found.duplicates, state)
        summary = write_summary(out, rows)
    print(format_tables(rows), file=stdout)
    failed = sum(1 for r in rows if r["status"] == "failed")
    pending = sum(1 for r in rows if r["status"] == "pending")
    print(
        f"{len(rows)} rows in {summary}: {sum(1 for r in rows if r['status'] == 'ok')} ok, {failed} failed,"
        f" {pending} pending" + (" (run again to continue)" if pending else ""),
        file=stdout,
    )
    if batch.stream_error:
        print(f"error: the stream to {target} failed: {batch.stream_error}", file=sys.stderr)
    return 1 if failed or batch.stream_error else 0


def run(args: argparse.Namespace, target: str) -> int:
    try:
        return asyncio.run(run_async(args, target))
    except KeyboardInterrupt:
        print(
            f"interrupted: finished files are recorded in {args.out / STATE_FILE}; run again to resume",
            file=sys.stderr,
        )
        return 130

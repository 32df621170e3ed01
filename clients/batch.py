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
import logging
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc

from clients import connect
from clients.batch_output import (
    PARTIAL_SUFFIX,
    STATE_FILE,
    SUMMARY_FILE,
    StateLog,
    failed_record,
    format_tables,
    is_done,
    load_state,
    ok_record,
    summary_rows,
    sweep_partials,
    write_outputs,
    write_summary,
)
from clients.batch_scan import UNREADABLE, Item, discover
from clients.infer import MASK_SPACES, MAX_MESSAGE_BYTES, TASKS
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.security.identity import Role

# Re-exported: the state and summary layout and the file scan are part of ``medgate batch``'s surface.
__all__ = ["PARTIAL_SUFFIX", "STATE_FILE", "SUMMARY_FILE", "add_arguments", "discover", "run", "run_async"]

log = logging.getLogger("medgate.batch")

DEFAULT_PROMPTS = "left lung & right lung & heart & lesion"
# The gateway works on 4 items of one stream at a time; more in flight only queue there.
DEFAULT_CONCURRENCY = 4


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
    # DICOM results (SEG, SR) of each DICOM file are written here as <SOPInstanceUID>.dcm.
    dicom_out: Path | None = None


def build_request(item: Item, data: bytes, options: Options) -> pb.AnalyzeRequest:
    return pb.AnalyzeRequest(
        image=pb.ImageInput(data=data),
        tasks=options.tasks,
        prompts=options.prompts if pb.TASK_SEGMENT in options.tasks else "",
        # Bit-packed masks are 8x smaller on the wire; the NPZ holds them decoded.
        output=pb.OutputOptions(
            mask_space=options.mask_space,
            mask_encoding=pb.ARRAY_ENCODING_PACKBITS,
            dicom_results=options.dicom_out is not None and item.kind == "DICOM",  # other inputs cannot have them
        ),
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

    async def run(self, target: str, todo: list[Item], security: connect.ClientSecurity) -> None:
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
                            write_outputs,
                            self.out,
                            item,
                            answer.response,
                            overlay=self.options.overlays,
                            dicom_out=self.options.dicom_out,
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
        async with connect.aio_channel(target, security, options) as channel:
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
                self.stream_error = f"{exc.code().name}: {exc.details()}{connect.explain(exc)}"
            finally:
                if writers:
                    await asyncio.gather(*writers)
            if in_flight and self.stream_error is None:
                self.stream_error = f"the gateway ended the stream with {len(in_flight)} file(s) unanswered"


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
    parser.add_argument(
        "--dicom-out",
        type=Path,
        help="DICOM inputs: ask for DICOM results (SEG, TID 1500 SR) and write them here as <SOPInstanceUID>.dcm",
    )
    parser.add_argument("--limit", type=int, help="process at most this many new files in this run (resume later)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--target", default=None, help="gateway host:port (default: from settings, 127.0.0.1:50051)")
    connect.add_arguments(parser)


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
        dicom_out=args.dicom_out,
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
    security = connect.from_args(args, Role.INFERENCE)  # a missing --ca or token file stops here, before any work
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
        await batch.run(target, todo, security)
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

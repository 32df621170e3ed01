"""``medgate impression``: report findings to impressions through the gateway's Report service.

    medgate impression "The heart is normal in size. The lungs are clear."
    medgate impression --file reports.jsonl [--out impressions.jsonl]

With ``--file``, each input line is a JSON object ``{"findings": "...", "id": <anything, optional>}``
(``-`` reads standard input). All lines go through one ``ImpressionStream``; one output line per input
line, in input order: ``{"line", "id", "impression", "score", "agreement", "top_similarity", "coverage",
"evidence"}``
or ``{"line", "id", "error": {"code", "message"}}``. Exit status: 0 when every line was answered, 1 when
some line failed, 2 when the call itself failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import grpc

from clients import connect
from medgate.v1 import report_pb2 as pb
from medgate.v1 import report_pb2_grpc as pb_grpc
from services.security.identity import Role

_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("findings", nargs="?", help="the FINDINGS section of one report (quote it)")
    parser.add_argument("--file", type=Path, help="JSON Lines of {findings, id}; '-' for standard input")
    parser.add_argument("--out", type=Path, help="with --file: write JSON Lines here (default: standard output)")
    parser.add_argument("--evidence", type=int, default=0, help="nearest training reports to return (default 3)")
    parser.add_argument("--json", action="store_true", help="one report: print the whole answer as JSON")
    parser.add_argument("--target", help="gateway host:port (default 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=float, default=60.0, help="deadline in seconds (per call / whole stream)")
    connect.add_arguments(parser)


def answer_record(response: pb.ImpressionResponse) -> dict[str, Any]:
    return {
        "impression": response.impression,
        "score": round(response.score, 4),
        "agreement": round(response.agreement, 4),
        "top_similarity": round(response.top_similarity, 4),
        "coverage": round(response.coverage, 4),
        "evidence": [
            {
                "report_id": e.report_id,
                "similarity": round(e.similarity, 4),
                "findings": e.findings,
                "impression": e.impression,
            }
            for e in response.evidence
        ],
    }


def _channel(target: str, args: argparse.Namespace) -> grpc.Channel:
    options = [("grpc.max_receive_message_length", _MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", -1)]
    return connect.channel(target, connect.from_args(args, Role.INFERENCE), options)


def run_one(args: argparse.Namespace, target: str, stdout: IO[str]) -> int:
    request = pb.ImpressionRequest(findings=args.findings, max_evidence=args.evidence)
    with _channel(target, args) as channel:
        try:
            response = pb_grpc.ReportStub(channel).Impression(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}{connect.explain(exc)}", file=sys.stderr)
            return 2
    record = answer_record(response)
    if args.json:
        record["model"] = {"name": response.model.name, "version": response.model.version}
        print(json.dumps(record, indent=2, ensure_ascii=False), file=stdout)
        return 0
    print(response.impression, file=stdout)
    print(
        f"score {response.score:.3f} (agreement {response.agreement:.3f}, "
        f"nearest training findings similarity {response.top_similarity:.3f})",
        file=stdout,
    )
    for item in record["evidence"]:
        print(f"  report {item['report_id']} ({item['similarity']:.3f}): {item['impression']}", file=stdout)
    return 0


class _Lines:
    """Reads the JSONL input lazily; lines that are not ``{"findings": str}`` are answered locally."""

    def __init__(self, handle: IO[str], evidence: int) -> None:
        self.handle = handle
        self.evidence = evidence
        self.ids: dict[int, Any] = {}
        self.local_errors: dict[int, str] = {}
        self.count = 0

    def requests(self) -> Iterator[pb.ImpressionRequest]:
        for number, raw in enumerate(self.handle, start=1):
            if not raw.strip():
                continue
            self.count = number
            try:
                item = json.loads(raw)
            except json.JSONDecodeError:
                item = None
            if not isinstance(item, dict) or not isinstance(item.get("findings"), str):
                self.local_errors[number] = "not a JSON object with a string 'findings'"
                continue
            self.ids[number] = item.get("id")
            yield pb.ImpressionRequest(findings=item["findings"], request_id=str(number), max_evidence=self.evidence)


def run_file(args: argparse.Namespace, target: str, stdout: IO[str]) -> int:
    source: IO[str] = sys.stdin if str(args.file) == "-" else args.file.open(encoding="utf-8")
    sink: IO[str] = args.out.open("w", encoding="utf-8") if args.out else stdout
    lines = _Lines(source, args.evidence)
    done: dict[int, dict[str, Any]] = {}
    written, failed = 1, 0

    def flush(final: bool = False) -> None:
        nonlocal written, failed
        while True:
            if written in lines.local_errors:
                done[written] = {"error": {"code": "INVALID_ARGUMENT", "message": lines.local_errors.pop(written)}}
            if written not in done:
                if final and written <= lines.count:
                    written += 1  # a blank line: nothing to answer
                    continue
                return
            record = {"line": written, "id": lines.ids.pop(written, None), **done.pop(written)}
            failed += "error" in record
            sink.write(json.dumps(record, ensure_ascii=False) + "\n")
            written += 1

    try:
        with _channel(target, args) as channel:
            try:
                for answer in pb_grpc.ReportStub(channel).ImpressionStream(lines.requests(), timeout=args.timeout):
                    number = int(answer.request_id)
                    if answer.HasField("error"):
                        done[number] = {"error": {"code": answer.error.code_name, "message": answer.error.message}}
                    else:
                        done[number] = answer_record(answer.response)
                    flush()
            except grpc.RpcError as exc:
                print(f"error: {exc.code().name}: {exc.details()}{connect.explain(exc)}", file=sys.stderr)
                return 2
        flush(final=True)
    finally:
        if source is not sys.stdin:
            source.close()
        if sink is not stdout:
            sink.close()
    return 1 if failed else 0


def run(args: argparse.Namespace, target: str, *, stdout: IO[str] | None = None) -> int:
    out = stdout or sys.stdout
    if (args.findings is None) == (args.file is None):
        print("error: give either findings text or --file reports.jsonl", file=sys.stderr)
        return 2
    if args.file is not None:
        return run_file(args, target, out)
    return run_one(args, target, out)

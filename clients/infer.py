"""``medgate infer``: one file through the gateway, printed as a summary or as protobuf JSON, with an overlay PNG."""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import json_format

from clients import connect
from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.imaging.arrays import decode_array
from services.security.identity import Role

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
TASKS = {"classify": pb.TASK_CLASSIFY, "detect": pb.TASK_DETECT, "segment": pb.TASK_SEGMENT}
MASK_SPACES = {"model": pb.MASK_SPACE_MODEL, "original": pb.MASK_SPACE_ORIGINAL, "both": pb.MASK_SPACE_BOTH}


def channel(target: str, security: connect.ClientSecurity) -> grpc.Channel:
    return connect.channel(
        target,
        security,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )


def parse_box(text: str) -> pb.Box:
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a box is x0,y0,x1,y1 in original pixels, got {text!r}") from None
    return pb.Box(x0=x0, y0=y0, x1=x1, y1=y1)


def array_of(message: pb.NDArray) -> np.ndarray:
    """An NDArray message as a NumPy array (raw or bit-packed)."""
    return decode_array(
        message.data, tuple(message.shape), message.dtype, packbits=message.encoding == pb.ARRAY_ENCODING_PACKBITS
    )


def image_input(file: str, *, by_reference: bool = False) -> pb.ImageInput:
    """The file's bytes, or with ``by_reference`` only its name for the gateway to read itself: a WADO-RS instance
    URL (http:// or https://) or a path on the gateway's host (made absolute here), under its allow-lists."""
    if not by_reference:
        return pb.ImageInput(data=Path(file).read_bytes())
    if file.startswith(("http://", "https://")):
        return pb.ImageInput(reference=pb.ImageReference(wadors_url=file))
    return pb.ImageInput(reference=pb.ImageReference(file_path=os.path.abspath(file)))


def build_request(args: argparse.Namespace) -> pb.AnalyzeRequest:
    tasks = [TASKS[t] for t in args.task]
    request = pb.AnalyzeRequest(
        image=image_input(args.file, by_reference=getattr(args, "by_reference", False)),
        tasks=tasks,
        prompts=args.prompts or "",
        boxes=args.box or [],
        output=pb.OutputOptions(
            mask_space=MASK_SPACES[args.mask_space],
            mask_encoding=pb.ARRAY_ENCODING_PACKBITS if args.packbits else pb.ARRAY_ENCODING_RAW,
            dicom_results=getattr(args, "dicom_out", None) is not None,
        ),
        min_score=args.min_score,
        request_id=Path(args.file.rstrip("/")).name,
    )
    if args.frame is not None:
        request.image.frame = args.frame
    return request


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def dicom_result_path(directory: Path, obj: pb.DicomObject) -> Path:
    """``directory/<sop_instance_uid>.dcm``; the UID must be one (digits and dots), never a path from the wire."""
    uid = obj.sop_instance_uid
    if not (_UID.match(uid) and len(uid) <= 64):
        raise ValueError("a DICOM result has no valid SOP instance UID")
    return directory / f"{uid}.dcm"


def write_dicom_results(directory: Path, objects: Sequence[pb.DicomObject]) -> list[Path]:
    """Each DICOM result object as ``<sop_instance_uid>.dcm`` in ``directory`` (made if missing)."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for obj in objects:
        path = dicom_result_path(directory, obj)
        path.write_bytes(obj.data)
        written.append(path)
    return written


def summary(response: pb.AnalyzeResponse) -> str:
    lines: list[str] = []
    t = response.transform
    info = response.image
    lines.append(
        f"image: {pb.InputKind.Name(info.kind).removeprefix('INPUT_KIND_')} {info.width}x{info.height}"
        f" frame {info.frame + 1}/{max(info.frames, 1)}"
        f" {info.photometric_interpretation} {info.transfer_syntax}".rstrip()
    )
    lines.append(
        f"transform: scale {t.scale:.4f}, pad left {t.pad_left} top {t.pad_top}, resized"
        f" {t.resized_width}x{t.resized_height} in {t.model_size}x{t.model_size}"
    )
    if response.HasField("classification"):
        c = response.classification
        scores = ", ".join(f"{s.label} {s.score:.3f}" for s in c.scores)
        lines.append(f"classification ({c.model.name} v{c.model.version}): {scores}")
    if response.HasField("detection"):
        d = response.detection
        lines.append(f"detection ({d.model.name} v{d.model.version}): {len(d.detections)} found")
        for det in d.detections:
            b = det.box
            lines.append(f"  {det.label} {det.score:.3f} at x0={b.x0:.1f} y0={b.y0:.1f} x1={b.x1:.1f} y1={b.y1:.1f}")
    if response.HasField("segmentation"):
        s = response.segmentation
        masks = s.image_features if s.HasField("image_features") else s.original_masks
        lines.append(f"segmentation: masks {list(masks.shape)} {masks.dtype}")
        for p in s.prompts:
            lines.append(f"  {p.prompt!r} -> {p.category}, score {p.score:.3f}, {p.area_pixels} px ({p.model})")
    for routing in response.review:
        state = "not routed"
        if routing.routed or routing.queued:
            state = "in review" if routing.routed else "handed to review (on its way)"
        lines.append(f"review: {state}, flow {routing.flow_definition}, loop {routing.human_loop_name}")
        lines.append(f"  because {'; '.join(routing.reasons)}")
    for obj in response.dicom_results:
        lines.append(f"dicom: {obj.kind} {obj.sop_instance_uid} ({len(obj.data)} bytes)")
    tm = response.timings
    lines.append(
        f"timings ms: decode {tm.decode_ms:.1f}, preprocess {tm.preprocess_ms:.1f}, triton {tm.triton_ms:.1f},"
        f" encode {tm.encode_ms:.1f}, total {tm.total_ms:.1f}"
        + (f", dicom {tm.dicom_ms:.1f}" if response.dicom_results else "")
    )
    return "\n".join(lines)


def write_overlay(path: Path, request: pb.AnalyzeRequest, response: pb.AnalyzeResponse) -> None:
    """The letterboxed image with masks and boxes drawn on it, as the models saw it."""
    import cv2

    frame = request.image.frame if request.image.HasField("frame") else None
    image = request.image
    if image.WhichOneof("source") == "reference" and image.reference.WhichOneof("target") == "file_path":
        data = Path(image.reference.file_path).read_bytes()  # the same host: read it here as the gateway did
    elif image.WhichOneof("source") == "reference":
        raise OSError("--overlay needs the image's bytes; a WADO-RS reference is read by the gateway only")
    else:
        data = image.data
    canvas = draw_overlay(model_image_of(data, frame=frame), response)
    if not cv2.imwrite(str(path), canvas):
        raise OSError(f"could not write {path}")


def model_image_of(data: bytes, *, frame: int | None = None) -> np.ndarray:
    """The 1024x1024 uint8 image the models saw, rendered here exactly as the gateway renders it."""
    from services.imaging.limits import IngestLimits
    from services.imaging.prepare import prepare

    return prepare(data, frame=frame, limits=IngestLimits()).model_image


def draw_overlay(
    model_image: np.ndarray, response: pb.AnalyzeResponse, *, masks: np.ndarray | None = None
) -> np.ndarray:
    """A BGR copy of ``model_image`` with the masks, boxes and top class of ``response`` drawn on it.

    ``masks`` (model space, [N, 1024, 1024]) overrides the masks carried in the response, for
    callers that have already decoded them or stripped them out of the message.
    """
    import cv2

    canvas = cv2.cvtColor(model_image, cv2.COLOR_GRAY2BGR)
    palette = [(0, 200, 255), (255, 120, 0), (0, 255, 0), (255, 0, 255), (0, 0, 255), (255, 255, 0)]
    if masks is None and response.HasField("segmentation") and response.segmentation.HasField("image_features"):
        masks = array_of(response.segmentation.image_features)
    if masks is not None:
        for index, mask in enumerate(masks):
            color = np.array(palette[index % len(palette)], dtype=np.float32)
            region = mask.astype(bool)
            canvas[region] = (0.55 * canvas[region] + 0.45 * color).astype(np.uint8)
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            cv2.drawContours(canvas, contours, -1, palette[index % len(palette)], 2)
    if response.HasField("detection"):
        for det in response.detection.detections:
            b = det.model_box
            cv2.rectangle(canvas, (int(b.x0), int(b.y0)), (int(b.x1), int(b.y1)), (0, 0, 255), 2)
            cv2.putText(
                canvas,
                f"{det.label} {det.score:.2f}",
                (int(b.x0), max(12, int(b.y0) - 4)),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.6,
                (0, 0, 255),
                2,
            )
    if response.HasField("classification"):
        c = response.classification
        cv2.putText(
            canvas, f"{c.top_label} {c.top_score:.2f}", (10, 30), cv2.FONT_HERSHEY_SIMPLEX, 1.0, (255, 255, 255), 2
        )
    return canvas


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a DICOM, PNG, JPEG, NIfTI or MetaImage file (or, --by-reference, a WADO-RS URL)")
    parser.add_argument(
        "--by-reference",
        action="store_true",
        help="send only the file's absolute path (the gateway reads it, under gateway.reference_roots) or the "
        "WADO-RS instance URL given as FILE (fetched with your token, under gateway.reference_base_urls)",
    )
    parser.add_argument(
        "--task",
        action="append",
        choices=sorted(TASKS),
        help="classify, detect or segment (repeat for several; default: all that apply)",
    )
    parser.add_argument("--prompts", help="text prompts separated by '&', e.g. 'left lung & heart & nodule'")
    parser.add_argument("--box", action="append", type=parse_box, help="a box prompt x0,y0,x1,y1 in original pixels")
    parser.add_argument("--frame", type=int, help="frame of a multi-frame object (default: the middle one)")
    parser.add_argument("--min-score", type=float, default=0.0, help="drop detections below this score")
    parser.add_argument("--mask-space", choices=sorted(MASK_SPACES), default="model")
    parser.add_argument("--packbits", action="store_true", help="receive masks bit-packed (8x smaller)")
    parser.add_argument("--json", action="store_true", help="print the response as protobuf JSON")
    parser.add_argument("--overlay", type=Path, help="write the letterboxed image with masks and boxes to this PNG")
    parser.add_argument(
        "--dicom-out",
        type=Path,
        help="DICOM input only: ask for DICOM results (SEG, TID 1500 SR) and write them to this folder",
    )
    parser.add_argument("--target", default=None, help="gateway host:port (default: from settings, 127.0.0.1:50051)")
    parser.add_argument("--timeout", type=float, default=120.0, help="deadline in seconds")
    connect.add_arguments(parser)


def run(args: argparse.Namespace, target: str) -> int:
    if not args.task:
        args.task = ["classify", "detect"] + (["segment"] if args.prompts or args.box else [])
    if "segment" in args.task and not (args.prompts or args.box):
        args.prompts = "left lung & right lung & heart & lesion"
    try:
        request = build_request(args)
    except FileNotFoundError:
        print(f"error: no such file: {args.file}", file=sys.stderr)
        return 2
    except IsADirectoryError:
        print(f"error: {args.file} is a folder (medgate batch reads folders)", file=sys.stderr)
        return 2
    security = connect.from_args(args, Role.INFERENCE)
    with channel(target, security) as ch:
        stub = pb_grpc.InferenceStub(ch)
        try:
            response = stub.Analyze(request, timeout=args.timeout)
        except grpc.RpcError as exc:
            trailers = dict(exc.trailing_metadata() or ())
            request_id = trailers.get("x-request-id", "")
            suffix = f" (request_id {request_id})" if request_id else ""
            print(f"error: {exc.code().name}: {exc.details()}{suffix}{connect.explain(exc)}", file=sys.stderr)
            return 2
    if args.json:
        print(json_format.MessageToJson(response, preserving_proto_field_name=True))
    else:
        print(summary(response))
    if args.overlay:
        write_overlay(args.overlay, request, response)
        print(f"overlay written to {args.overlay}", file=sys.stderr)
    if args.dicom_out is not None:
        written = write_dicom_results(args.dicom_out, response.dicom_results)
        print(f"{len(written)} DICOM result(s) written to {args.dicom_out}", file=sys.stderr)
    return 0

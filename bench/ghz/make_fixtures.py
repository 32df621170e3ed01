"""Fixtures for ghz and ``bench/loadgen.py``: serialized requests (``-B``) for a PNG and a DICOM, and their configs.

Writes into ``bench/ghz/fixtures/`` (git-ignored; ``make ghz-fixtures``):

- ``phantom-1024.png``: a 1024x1024 chest-radiograph phantom (``training.phantoms``, fixed seed), 8-bit;
- ``RG1_UNCI.dcm``: pydicom-data's 1841x1955 16-bit radiograph;
- ``<rpc>-png.bin`` and ``<rpc>-dicom.bin``: each RPC's request message around one of them, serialized
  (ghz's ``-B`` / ``"binary-file"``), and ``<rpc>-png.json`` / ``<rpc>-dicom.json``: ghz configs for them;
- ``reflect/``: a twin of every config (the committed ones in ``bench/ghz/`` too) without ``protoset``,
  so ghz resolves the method through the gateway's server reflection instead;
- ``auth/metadata.json``: ``{"authorization": "Bearer <inference token>"}`` from the development
  credentials (``--metadata-only`` writes just this, as ``make loadtest`` does before each run, so a
  renewed token is picked up). Every config names it as ``metadata-file`` and trusts the development
  CA (``cacert``, ``var/credentials/ca.pem``); ``cert``/``key`` too when ``security.require_client_cert``.
  Tokens never go into a committed file.

``--configs`` rewrites the committed ``bench/ghz/<rpc>.json`` configs, whose ``data`` carries a small
(256x256) phantom PNG as base64 in protobuf's JSON mapping; the output is deterministic.

Paths inside configs are relative to the repository root, as ghz resolves them against its working
directory: run ghz and the load generator from there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import Message

from medgate.v1 import inference_pb2 as pb
from services.settings import load_settings
from training.phantoms import auto_window, generate

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
SERVICE = "medgate.v1.Inference"
PROTOSET = "build/medgate.protoset"
HOST = "127.0.0.1:50051"
PROMPTS = "left lung & right lung & heart"
SEED = 2024
# Per RPC: requests per run and in flight. Segmentation costs most on a CPU, so fewer of those.
RUNS = {
    "Classify": {"total": 200, "concurrency": 8},
    "Detect": {"total": 200, "concurrency": 8},
    "Segment": {"total": 50, "concurrency": 4},
    "Analyze": {"total": 50, "concurrency": 4},
}


def phantom_png(size: int) -> bytes:
    """An 8-bit phantom radiograph, size x size, the same picture at every size."""
    sample = generate(np.random.default_rng(SEED), height=1024, width=1024, lesion_probability=1.0)
    low, high = auto_window(sample.image)
    image = np.clip((sample.image.astype(np.float32) - low) / max(high - low, 1.0) * 255.0, 0, 255).astype(np.uint8)
    if size != image.shape[0]:
        image = np.asarray(cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA), dtype=np.uint8)
    ok, encoded = cv2.imencode(".png", image, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    if not ok:
        raise RuntimeError("could not encode the phantom PNG")
    return encoded.tobytes()


def rg1_unci() -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("RG1_UNCI.dcm")
    if path is None:
        raise SystemExit("RG1_UNCI.dcm not found: install pydicom-data (`make setup` does)")
    return Path(str(path))


def request(rpc: str, data: bytes) -> Message:
    """Each RPC's request around an encoded image. Masks travel bit-packed: ghz reads at most 4 MiB per answer."""
    image = pb.ImageInput(data=data)
    packed = pb.OutputOptions(mask_encoding=pb.ARRAY_ENCODING_PACKBITS)
    if rpc == "Classify":
        return pb.ClassifyRequest(image=image)
    if rpc == "Detect":
        return pb.DetectRequest(image=image)
    if rpc == "Segment":
        return pb.SegmentRequest(image=image, prompts=PROMPTS, output=packed)
    if rpc == "Analyze":
        return pb.AnalyzeRequest(
            image=image,
            tasks=[pb.TASK_CLASSIFY, pb.TASK_DETECT, pb.TASK_SEGMENT],
            prompts=PROMPTS,
            output=packed,
            request_id="ghz",
        )
    raise ValueError(rpc)


def metadata_file(folder: Path = FIXTURES) -> Path:
    return folder / "auth" / "metadata.json"


def tls_options(folder: Path = FIXTURES) -> dict[str, str]:
    """ghz's TLS and token keys: the development CA, the client certificate if the servers ask for one."""
    security = load_settings().security
    options = {"cacert": relative(security.credentials_dir / "ca.pem")}
    if security.require_client_cert:
        folder_of = security.credentials_dir
        options.update(cert=relative(folder_of / "client.pem"), key=relative(folder_of / "client.key"))
    options["metadata-file"] = relative(metadata_file(folder))
    return options


def write_metadata(folder: Path = FIXTURES, token_file: Path | None = None) -> bool:
    """``auth/metadata.json`` (0600) with the inference token, or ``{}`` when there is none; True with a token."""
    token_file = token_file or load_settings().security.credentials_dir / "inference.token"
    try:
        token = token_file.read_text().strip()
    except OSError:
        token = ""
    path = metadata_file(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        json.dump({"authorization": f"Bearer {token}"} if token else {}, handle)
        handle.write("\n")
    return bool(token)


def config(rpc: str, name: str, *, folder: Path = FIXTURES, **payload: Any) -> dict[str, Any]:
    return {
        "name": name,
        "protoset": PROTOSET,
        "call": f"{SERVICE}.{rpc}",
        "host": HOST,
        **tls_options(folder),
        **RUNS[rpc],
        "timeout": "60s",
        **payload,
    }


def relative(path: Path) -> str:
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2) + "\n")


def committed_configs() -> list[Path]:
    return sorted(HERE.glob("*.json"))


def write_committed_configs() -> list[Path]:
    small = phantom_png(256)
    written = []
    for rpc in RUNS:
        data = json_format.MessageToDict(request(rpc, small), preserving_proto_field_name=True)
        path = HERE / f"{rpc.lower()}.json"
        write_json(path, config(rpc, f"{rpc} 256x256 PNG (JSON data)", data=data))
        written.append(path)
    return written


def write_fixtures(out: Path) -> list[Path]:
    """The binary payloads, their configs and the reflection twins; returns every config written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "phantom-1024.png").write_bytes(phantom_png(1024))
    shutil.copyfile(rg1_unci(), out / "RG1_UNCI.dcm")
    sources = {"png": (out / "phantom-1024.png", "1024x1024 phantom PNG"), "dicom": (out / "RG1_UNCI.dcm", "RG1_UNCI")}
    configs: list[Path] = []
    for rpc in RUNS:
        for kind, (source, label) in sources.items():
            binary = out / f"{rpc.lower()}-{kind}.bin"
            binary.write_bytes(request(rpc, source.read_bytes()).SerializeToString())
            path = out / f"{rpc.lower()}-{kind}.json"
            write_json(path, config(rpc, f"{rpc} {label} (binary)", folder=out, **{"binary-file": relative(binary)}))
            configs.append(path)
    reflect = out / "reflect"
    reflect.mkdir(exist_ok=True)
    for path in [*committed_configs(), *configs]:
        document = json.loads(path.read_text())
        document.pop("protoset", None)
        document["name"] = f"{document.get('name', path.stem)} via reflection"
        write_json(reflect / path.name, document)
    return configs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=FIXTURES, help="fixtures folder (default bench/ghz/fixtures)")
    parser.add_argument("--configs", action="store_true", help="also rewrite the committed bench/ghz/<rpc>.json")
    parser.add_argument("--metadata-only", action="store_true", help="write only auth/metadata.json (the token)")
    args = parser.parse_args(argv)
    if not write_metadata(args.out):
        print("no inference token yet (`medgate credentials` or `make run` makes one): the configs send none")
    if args.metadata_only:
        return 0
    if args.configs:
        for path in write_committed_configs():
            print(f"wrote {relative(path)}")
    configs = write_fixtures(args.out)
    print(f"wrote {len(configs)} binary-payload configs and their reflection twins under {relative(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""By-reference input (issue 15 item 5): ImageInput.reference names a file under an allow-listed root or a WADO-RS
instance under an allow-listed DICOMweb base; the gateway reads it itself. Anything else is PERMISSION_DENIED before
any file is opened or connection made, without echoing the path or URL.

Against a real gateway on the real Triton, a real Orthanc with Debian's DICOMweb plugin as the WADO-RS server, and
plain stdlib HTTP servers for a redirect and for counting connections.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, NoReturn

import grpc
import pytest

from medgate.v1 import inference_pb2 as pb
from medgate.v1 import inference_pb2_grpc as pb_grpc
from services.gateway.server import GatewayServer
from services.imaging.ingest.reference import ReferenceDenied, ReferencePolicy, check_file, check_url, read_file
from services.settings import load_settings
from tests.fixtures import pydicom_data_file, unavailable
from tests.orthanc import Orthanc, OrthancUnavailable

SOURCE = "RG1_UNCI.dcm"
TOKEN = "test-token-for-the-archive"


def _unavailable(reason: str) -> NoReturn:
    unavailable(reason, "the by-reference tests")


class _Listener:
    """A TCP port that counts connections and answers nothing: proof that nothing was fetched from it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


class _Redirector(http.server.ThreadingHTTPServer):
    """An allow-listed 'DICOMweb server' that answers every GET with a redirect to ``target``, noting headers."""

    def __init__(self, target: str) -> None:
        seen: list[dict[str, str]] = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(dict(self.headers.items()))
                self.send_response(302)
                self.send_header("Location", target)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.seen = seen
        self.port = int(self.server_address[1])
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def orthanc() -> Iterator[Orthanc]:
    try:
        server = Orthanc(dicomweb=True)
    except OrthancUnavailable as exc:
        _unavailable(str(exc))
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stored(orthanc: Orthanc) -> str:
    """RG1_UNCI.dcm stored in Orthanc; its WADO-RS instance URL."""
    answer = orthanc.upload(pydicom_data_file(SOURCE).read_bytes())
    tags = orthanc.get(f"/instances/{answer['ID']}/tags?simplify")
    return (
        f"{orthanc.dicomweb_url}/studies/{tags['StudyInstanceUID']}/series/{tags['SeriesInstanceUID']}"
        f"/instances/{tags['SOPInstanceUID']}"
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The allowed root with the source in it, a symlink out of it, and a file beside it (outside)."""
    base = tmp_path_factory.mktemp("refs")
    allowed = base / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "sub" / SOURCE).write_bytes(pydicom_data_file(SOURCE).read_bytes())
    (base / "outside.dcm").write_bytes(pydicom_data_file(SOURCE).read_bytes())
    (allowed / "escape.dcm").symlink_to(base / "outside.dcm")
    (allowed / "inside-link.dcm").symlink_to(allowed / "sub" / SOURCE)  # a symlink that stays inside: fine
    return allowed


@pytest.fixture(scope="module")
def listener() -> Iterator[_Listener]:
    server = _Listener()
    yield server
    server.close()


@pytest.fixture(scope="module")
def redirector(listener: _Listener) -> Iterator[_Redirector]:
    server = _Redirector(f"http://127.0.0.1:{listener.port}/dicom-web/studies/1/series/2/instances/3")
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
async def gateway(
    triton_url: str, orthanc: Orthanc, root: Path, redirector: _Redirector
) -> AsyncIterator[GatewayServer]:
    bases = f"{orthanc.dicomweb_url}, http://127.0.0.1:{redirector.port}/dicom-web"
    settings = load_settings(
        gateway={
            "port": 0,
            "metrics_port": -1,
            "reference_roots": str(root),
            "reference_base_urls": bases,
        },
        review={"enabled": False},
    )
    server = GatewayServer(settings, triton_url)
    await server.start(port=0)
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture(scope="module")
async def gateway_stub(gateway: GatewayServer) -> AsyncIterator[pb_grpc.InferenceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        yield pb_grpc.InferenceStub(channel)


def _post_json(port: int, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{route}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


async def _classify(stub: pb_grpc.InferenceStub, image: pb.ImageInput) -> pb.ClassifyResponse:
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    return await stub.Classify(pb.ClassifyRequest(image=image), timeout=120, metadata=metadata)


async def _refused(stub: pb_grpc.InferenceStub, image: pb.ImageInput) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _classify(stub, image)
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED, refused.value
    return refused.value.details() or ""


def _same_answer(a: pb.ClassifyResponse, b: pb.ClassifyResponse) -> None:
    assert [(s.label, s.score) for s in a.scores] == [(s.label, s.score) for s in b.scores]
    assert a.transform == b.transform
    assert a.image == b.image


# --- files ------------------------------------------------------------------------------------------------------


async def test_a_file_under_the_root_answers_as_its_bytes(gateway_stub: pb_grpc.InferenceStub, root: Path) -> None:
    sent = await _classify(gateway_stub, pb.ImageInput(data=(root / "sub" / SOURCE).read_bytes()))
    for path in (root / "sub" / SOURCE, root / "sub" / ".." / "sub" / SOURCE, root / "inside-link.dcm"):
        named = await _classify(gateway_stub, pb.ImageInput(reference=pb.ImageReference(file_path=str(path))))
        _same_answer(named, sent)


async def test_the_http_face_takes_a_reference_too(
    gateway: GatewayServer, gateway_stub: pb_grpc.InferenceStub, root: Path
) -> None:
    """POST /v1/classify mirrors ImageInput, so {"image": {"reference": {"file_path": ...}}} works there too."""
    path = str(root / "sub" / SOURCE)
    sent = await _classify(gateway_stub, pb.ImageInput(data=(root / "sub" / SOURCE).read_bytes()))
    status, body = await asyncio.to_thread(
        _post_json, gateway.http_port, "/v1/classify", {"image": {"reference": {"file_path": path}}}
    )
    assert status == 200, body
    assert [(s["label"], round(s["score"], 5)) for s in body["scores"]] == [
        (s.label, round(s.score, 5)) for s in sent.scores
    ]
    status, body = await asyncio.to_thread(
        _post_json, gateway.http_port, "/v1/classify", {"image": {"reference": {"file_path": "/etc/passwd"}}}
    )
    assert status == 403, body
    assert "passwd" not in json.dumps(body)


async def test_paths_out_of_the_root_are_permission_denied(gateway_stub: pb_grpc.InferenceStub, root: Path) -> None:
    outside = [
        f"{root}/../outside.dcm",  # `..`
        f"{root}/sub/../../outside.dcm",
        str(root / "escape.dcm"),  # a symlink out of the root
        "/etc/passwd",  # an absolute path elsewhere
        f"{root}-sibling/x.dcm",  # a prefix of the root's name is not the root
        "/nonexistent/secret-name.dcm",  # outside and missing: the same answer (no existence oracle)
    ]
    for path in outside:
        message = await _refused(gateway_stub, pb.ImageInput(reference=pb.ImageReference(file_path=path)))
        assert "outside the allowed roots" in message, message
        assert str(root) not in message and "passwd" not in message and "secret" not in message, message


async def test_a_missing_file_inside_the_root_is_not_found(gateway_stub: pb_grpc.InferenceStub, root: Path) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await _classify(gateway_stub, pb.ImageInput(reference=pb.ImageReference(file_path=str(root / "none.dcm"))))
    assert missing.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as relative:
        await _classify(gateway_stub, pb.ImageInput(reference=pb.ImageReference(file_path="sub/" + SOURCE)))
    assert relative.value.code() is grpc.StatusCode.INVALID_ARGUMENT


def test_a_symlink_swapped_in_after_the_check_is_caught(root: Path, tmp_path: Path) -> None:
    """The path is checked, then (as an attacker would) replaced by a symlink out: the open refuses it."""
    policy = ReferencePolicy.from_settings(str(root), "", max_bytes=64 << 20, timeout_s=5)
    target = root / "swapped.dcm"
    target.write_bytes(b"inside")
    assert check_file(str(target), policy) == str(target)
    target.unlink()
    (tmp_path / "secret").write_bytes(b"outside")
    target.symlink_to(tmp_path / "secret")
    with pytest.raises(ReferenceDenied):
        read_file(str(target), policy)
    target.unlink()


def test_only_regular_files_are_read(root: Path) -> None:
    """A directory or a FIFO under the root is refused at once (a FIFO must not hang the read)."""
    policy = ReferencePolicy.from_settings(str(root), "", max_bytes=64 << 20, timeout_s=5)
    fifo = root / "pipe.dcm"
    os.mkfifo(fifo)
    try:
        for path in (root / "sub", fifo):
            with pytest.raises(ReferenceDenied, match="not a regular file"):
                read_file(str(path), policy)
    finally:
        fifo.unlink()


# --- DICOMweb ---------------------------------------------------------------------------------------------------


async def test_a_wadors_url_from_orthanc_answers_as_the_bytes(gateway_stub: pb_grpc.InferenceStub, stored: str) -> None:
    sent = await _classify(gateway_stub, pb.ImageInput(data=pydicom_data_file(SOURCE).read_bytes()))
    named = await _classify(gateway_stub, pb.ImageInput(reference=pb.ImageReference(wadors_url=stored)))
    _same_answer(named, sent)
    # Analyze with DICOM results too: the SR references the fetched source as it would the sent one.
    analyzed = await gateway_stub.Analyze(
        pb.AnalyzeRequest(
            image=pb.ImageInput(reference=pb.ImageReference(wadors_url=stored)),
            tasks=[pb.TASK_CLASSIFY],
            output=pb.OutputOptions(dicom_results=True),
        ),
        timeout=120,
    )
    assert len(analyzed.dicom_results) == 1


async def test_urls_off_the_allow_list_are_refused_before_any_connection(
    gateway_stub: pb_grpc.InferenceStub, orthanc: Orthanc, stored: str, listener: _Listener
) -> None:
    path = stored.split("/dicom-web", 1)[1]
    off_list = [
        f"http://localhost:{listener.port}/dicom-web{path}",  # another host name
        f"http://127.0.0.1:{listener.port}/dicom-web{path}",  # another port
        f"http://127.0.0.1:{listener.port}@127.0.0.1:{orthanc.http_port}/dicom-web{path}",  # user info tricks
        f"https://127.0.0.1:{orthanc.http_port}/dicom-web{path}",  # another scheme
        f"file:///etc/passwd#{path}",
        f"{orthanc.url}/instances",  # the allowed server, not a WADO-RS instance path
        f"{orthanc.dicomweb_url}/studies/1/series/2/instances/3/../../../../../tools/find",
        f"{orthanc.dicomweb_url}/studies/1/series/2/instances/%2e%2e",
    ]
    for url in off_list:
        message = await _refused(gateway_stub, pb.ImageInput(reference=pb.ImageReference(wadors_url=url)))
        assert "not a WADO-RS instance URL under the allowed base URLs" in message, (url, message)
        assert str(listener.port) not in message and "passwd" not in message
    assert listener.connections == 0


async def test_a_redirect_is_not_followed_and_the_token_is_passed_on(
    gateway_stub: pb_grpc.InferenceStub, redirector: _Redirector, listener: _Listener
) -> None:
    url = f"http://127.0.0.1:{redirector.port}/dicom-web/studies/1.2/series/3.4/instances/5.6"
    message = await _refused(gateway_stub, pb.ImageInput(reference=pb.ImageReference(wadors_url=url)))
    assert "redirect, which is not followed" in message, message
    assert listener.connections == 0  # the redirect's target (off the list) was never contacted
    (headers,) = redirector.seen
    assert headers.get("Authorization") == f"Bearer {TOKEN}"
    assert "multipart/related" in headers.get("Accept", "")


def test_url_rules_on_their_own() -> None:
    policy = ReferencePolicy.from_settings("", "http://pacs.example:8042/dicom-web/", max_bytes=1, timeout_s=1)
    good = "http://pacs.example:8042/dicom-web/studies/1.2.3/series/4.5/instances/6.7"
    assert check_url(good, policy) == good
    assert check_url(good.replace("pacs.example", "PACS.example"), policy)  # host names are case-insensitive
    for bad in [
        good.replace(":8042", ""),
        good.replace(":8042", ":8043"),
        good.replace("http:", "https:"),
        good.replace("/dicom-web/", "/dicom-web-other/"),
        good.replace("pacs.example", "pacs.example.evil.org"),
        good + "?x=1",
        good.replace("6.7", "6.7/frames/1"),
        good.replace("/studies", "//studies"),
        "gopher://pacs.example:8042/dicom-web/studies/1/series/2/instances/3",
    ]:
        with pytest.raises(ReferenceDenied):
            check_url(bad, policy)
    with pytest.raises(ReferenceDenied, match="not enabled"):
        check_url(good, ReferencePolicy.from_settings("", "", max_bytes=1, timeout_s=1))


async def test_medgate_infer_by_reference(
    gateway: GatewayServer, root: Path, stored: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """``medgate infer --by-reference`` sends the path (or the WADO-RS URL) instead of the bytes."""
    import argparse

    from clients import infer

    parser = argparse.ArgumentParser()
    infer.add_arguments(parser)
    answers = []
    for name in (str(root / "sub" / SOURCE), stored):
        args = parser.parse_args([name, "--by-reference", "--task", "classify", "--json", "--token", TOKEN])
        request = infer.build_request(args)
        assert request.image.WhichOneof("source") == "reference" and not request.image.data
        code = await asyncio.to_thread(infer.run, args, f"127.0.0.1:{gateway.port}")
        assert code == 0
        answers.append(json.loads(capsys.readouterr().out)["classification"]["scores"])
    assert answers[0] == answers[1]


def test_size_limit_and_deadline_of_a_fetch(orthanc: Orthanc, stored: str, root: Path) -> None:
    """The instance as the archive stores it; over ingest.max_input_bytes refused; a silent server stops at the
    deadline (the earlier of reference_timeout_s and the call's), not later."""
    import time

    from services.imaging.errors import LimitExceeded
    from services.imaging.ingest.reference import fetch_wadors

    original = pydicom_data_file(SOURCE).read_bytes()
    policy = ReferencePolicy.from_settings("", orthanc.dicomweb_url, max_bytes=64 << 20, timeout_s=30)
    assert fetch_wadors(stored, policy, token=TOKEN) == original
    small = ReferencePolicy.from_settings(str(root), orthanc.dicomweb_url, max_bytes=1 << 20, timeout_s=30)
    with pytest.raises(LimitExceeded):
        fetch_wadors(stored, small)
    with pytest.raises(LimitExceeded):
        read_file(str(root / "sub" / SOURCE), small)

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts (in the kernel's backlog) and never answers
    try:
        port = silent.getsockname()[1]
        url = f"http://127.0.0.1:{port}/dicom-web/studies/1/series/2/instances/3"
        quiet = ReferencePolicy.from_settings("", f"http://127.0.0.1:{port}/dicom-web", max_bytes=1 << 20, timeout_s=30)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            fetch_wadors(url, quiet, deadline=started + 1.0)
        assert time.monotonic() - started < 2.5
    finally:
        silent.close()

"""Clients on several servers: comma-separated targets and ``dns:///`` names, calls spread round robin.

Two real review services (TLS, tokens, each its own store and audit trail) stand in for any pair of medgate
servers: every client builds its channel in clients/connect.py, so the gateway's clients take the same path.
Which server answered is read from the answer (each server has one flow renamed after it) and from each
server's own audit trail (one Query event per ListFlowDefinitions).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import io
import json
import re
import socket
import struct
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from bench import loadgen
from clients import connect
from clients.cli import main as medgate
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.server import ReviewServer
from services.security import credentials as dev
from services.security.identity import Role
from services.settings import PROJECT_ROOT, load_settings
from tests.conftest import Clients, security_values

QUERY_EVENT = '"csd-code":"110112"'  # DICOM "Query": one line per ListFlowDefinitions in a server's audit trail


# --- targets as gRPC gets them ---------------------------------------------------------------------------------


def test_one_target_is_passed_on_unchanged() -> None:
    for text in ("127.0.0.1:50051", "localhost:50051", "gateway.example:443", "[::1]:50051", "unix:/tmp/medgate.sock"):
        target = connect.parse_target(text)
        assert target.uri == text and target.options == ()  # gRPC's pick_first, as before


def test_a_list_becomes_an_address_list_with_round_robin() -> None:
    target = connect.parse_target("10.0.0.5:50051, 10.0.0.6:50052")
    assert target.uri == "ipv4:10.0.0.5:50051,10.0.0.6:50052"
    assert dict(target.options) == {"grpc.lb_policy_name": "round_robin", "grpc.default_authority": "10.0.0.5"}
    six = connect.parse_target("[::1]:1,[::1]:2")
    assert six.uri == "ipv6:[::1]:1,[::1]:2" and dict(six.options)["grpc.default_authority"] == "[::1]"
    # Names are resolved once; the TLS name checked is the first host as written.
    named = connect.parse_target("localhost:7001,localhost:7002")
    assert named.uri == "ipv4:127.0.0.1:7001,127.0.0.1:7002"
    assert dict(named.options)["grpc.default_authority"] == "localhost" and named.hosts == ("localhost", "localhost")


def test_a_dns_name_keeps_resolving_with_round_robin() -> None:
    target = connect.parse_target("dns:///medgate-gateway.medgate.svc.cluster.local:50051")
    assert target.uri == "dns:///medgate-gateway.medgate.svc.cluster.local:50051"
    assert target.options == (connect.ROUND_ROBIN,) and target.hosts == ("medgate-gateway.medgate.svc.cluster.local",)
    assert connect.parse_target("dns://10.96.0.10:53/review.medgate.test:50052").hosts == ("review.medgate.test",)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1:1,127.0.0.1", "is not host:port"),
        ("::1:1,::1:2", "IPv6 as [addr]:port"),
        ("127.0.0.1:1,[::1]:2", "IPv4 and IPv6 addresses cannot share one list"),
        ("127.0.0.1:1,medgate.invalid:2", "medgate.invalid has no IPv4 address"),
        ("  ", "the target is empty"),
    ],
)
def test_bad_lists_are_refused_naming_the_problem(text: str, message: str) -> None:
    with pytest.raises(connect.ConnectError, match=re.escape(message)):
        connect.parse_target(text)


def test_plaintext_sends_the_token_only_when_every_server_is_loopback() -> None:
    insecure = connect.ClientSecurity(token="t", insecure=True)
    assert insecure.channel_credentials("127.0.0.1:1,127.0.0.1:2") is not None  # local credentials carry it
    assert insecure.channel_credentials("127.0.0.1:1,10.0.0.6:2") is None  # never in clear over a network
    assert insecure.channel_credentials("dns:///localhost:1") is not None


def test_a_callers_option_wins_over_the_targets() -> None:
    target = connect.parse_target("127.0.0.1:1,127.0.0.1:2")
    merged = dict(connect._channel_options(target, [("grpc.lb_policy_name", "pick_first"), ("grpc.x", 1)]))
    assert merged == {"grpc.lb_policy_name": "pick_first", "grpc.default_authority": "127.0.0.1", "grpc.x": 1}


# --- two real review services -------------------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    server: ReviewServer
    audit_dir: Path

    @property
    def flow(self) -> str:
        return f"lesion-detection-{self.name}"

    def queries(self) -> int:
        return sum(path.read_text().count(QUERY_EVENT) for path in self.audit_dir.glob("*.jsonl"))


async def _start(root: Path, name: str, security: dict[str, object], *, host: str, port: int) -> Replica:
    """A review service whose lesion-detection flow carries ``name``, so an answer says who gave it."""
    home = root / name
    (home / "config").mkdir(parents=True)
    flows = (PROJECT_ROOT / "config" / "flows.toml").read_text()
    (home / "config" / "flows.toml").write_text(flows.replace('"lesion-detection"', f'"lesion-detection-{name}"'))
    settings = load_settings(
        review={"store_path": home / "review.sqlite3", "flows_file": home / "config" / "flows.toml", "host": host},
        security={**security, "audit_dir": home / "audit"},
    )
    server = ReviewServer(settings.review, settings.security)
    await server.start(port=port, web_port=0)  # the reviewer page on a free port, never the default 8080
    return Replica(name, server, home / "audit")


@contextlib.asynccontextmanager
async def _replicas(
    root: Path, security: dict[str, object], hosts: list[str], port: int = 0
) -> AsyncIterator[list[Replica]]:
    started: list[Replica] = []
    try:
        for index, host in enumerate(hosts):
            started.append(await _start(root, "ab"[index], security, host=host, port=port))
        yield started
    finally:
        for replica in started:
            await replica.server.stop()


@pytest.fixture(scope="module")
async def pair(tmp_path_factory: pytest.TempPathFactory, clients: Clients) -> AsyncIterator[list[Replica]]:
    security = security_values(clients.credentials.directory)
    async with _replicas(tmp_path_factory.mktemp("replicas"), security, ["127.0.0.1", "127.0.0.1"]) as started:
        yield started


def _who(answer: pb.ListFlowDefinitionsResponse, pair: list[Replica]) -> str:
    names = {flow.name for flow in answer.flow_definitions}
    (replica,) = [r for r in pair if r.flow in names]
    return replica.name


def _spread(counts: Counter[str], calls: int) -> None:
    """Both servers answered, neither a token share: round robin (pick_first would send all to one)."""
    assert sum(counts.values()) == calls
    assert set(counts) == {"a", "b"} and min(counts.values()) >= calls // 4, counts


async def test_a_blocking_client_spreads_calls_over_a_list(pair: list[Replica], clients: Clients) -> None:
    target = ",".join(f"127.0.0.1:{r.server.port}" for r in pair)

    def calls() -> Counter[str]:
        with connect.channel(target, clients.security(Role.ADMIN)) as channel:
            stub = pb_grpc.ReviewStub(channel)
            return Counter(
                _who(stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest(), timeout=10), pair) for _ in range(40)
            )

    _spread(await asyncio.to_thread(calls), 40)


async def test_an_aio_client_spreads_calls_over_named_hosts(pair: list[Replica], clients: Clients) -> None:
    # localhost on both: resolved once, and TLS checks "localhost" (a name of the development certificate).
    target = ",".join(f"localhost:{r.server.port}" for r in pair)
    async with connect.aio_channel(target, clients.security(Role.ADMIN)) as channel:
        stub = pb_grpc.ReviewStub(channel)
        answers = [await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest(), timeout=10) for _ in range(40)]
    _spread(Counter(_who(answer, pair) for answer in answers), 40)


async def test_the_command_line_takes_a_list(
    pair: list[Replica], clients: Clients, capsys: pytest.CaptureFixture[str]
) -> None:
    target = ",".join(f"127.0.0.1:{r.server.port}" for r in pair)
    code = await asyncio.to_thread(medgate, ["review", "--target", target, *clients.flags(Role.ADMIN), "flows"])
    assert code == 0
    names = {flow["name"] for flow in json.loads(capsys.readouterr().out)["flowDefinitions"]}
    assert len(names & {r.flow for r in pair}) == 1


async def test_the_load_generator_spreads_calls_over_a_list(
    pair: list[Replica], clients: Clients, tmp_path: Path
) -> None:
    config = tmp_path / "flows.json"
    config.write_text(
        json.dumps({"call": "medgate.v1.Review.ListFlowDefinitions", "total": 60, "concurrency": 4, "data": {}})
    )
    before = [r.queries() for r in pair]
    reports = await loadgen.run_configs(
        [config],
        out=io.StringIO(),
        host=",".join(f"127.0.0.1:{r.server.port}" for r in pair),
        connections=2,
        cacert=clients.credentials.ca_cert,
        metadata={"authorization": f"Bearer {clients.credentials.token(Role.ADMIN)}"},
    )
    assert reports[0].status_codes == {"OK": 60}
    counts = Counter({r.name: r.queries() - seen for r, seen in zip(pair, before, strict=True)})
    _spread(counts, 60)


# --- dns:/// ------------------------------------------------------------------------------------------------------


class TinyDns:
    """A UDP DNS server on loopback that answers A queries for one name with fixed addresses (NXDOMAIN else).

    gRPC's c-ares resolver asks the server named in ``dns://host:port/name:port``, so a ``dns:`` target with
    several addresses can be tested without touching the machine's resolver.
    """

    def __init__(self, name: str, addresses: list[str]) -> None:
        self.name = name.lower()
        self.addresses = addresses
        self.questions: list[tuple[str, int]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.thread = threading.Thread(target=self._serve, name="tiny-dns", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                query, peer = self.sock.recvfrom(512)
            except OSError:
                return
            with contextlib.suppress(Exception):  # a malformed query gets no answer
                self.sock.sendto(self._answer(query), peer)

    def _answer(self, query: bytes) -> bytes:
        (ident,) = struct.unpack("!H", query[:2])
        labels, offset = [], 12
        while query[offset]:
            labels.append(query[offset + 1 : offset + 1 + query[offset]].decode())
            offset += 1 + query[offset]
        (qtype,) = struct.unpack("!H", query[offset + 1 : offset + 3])
        question = query[12 : offset + 5]
        name = ".".join(labels).lower()
        self.questions.append((name, qtype))
        known = name == self.name
        answers = self.addresses if known and qtype == 1 else []  # A records; AAAA and others: none
        flags = 0x8180 | (0 if known else 3)  # a response, recursion available; NXDOMAIN for other names
        header = struct.pack("!HHHHHH", ident, flags, 1, len(answers), 0, 0)
        records = b"".join(b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 5, 4) + socket.inet_aton(a) for a in answers)
        return header + question + records

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def tiny_dns() -> Iterator[TinyDns]:
    server = TinyDns("review.medgate.test", ["127.0.0.1", "127.0.0.2"])
    yield server
    server.close()


def _certificate_for(name: str, credentials: dev.DevCredentials, directory: Path) -> tuple[Path, Path]:
    """A server certificate for ``name`` from the development CA: the name a ``dns:`` target's TLS checks."""
    ca_cert = dev._read_cert(credentials.ca_cert)
    ca_key = dev._read_ec_key(credentials.ca_key)
    assert ca_cert is not None and ca_key is not None
    now = dt.datetime.now(dt.UTC)
    cert, key = dev._make_leaf(ca_cert, ca_key, name, [ExtendedKeyUsageOID.SERVER_AUTH], now, names=[name])
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_file.chmod(0o600)
    return cert_file, key_file


def _port_free_on(hosts: list[str]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no port free on all of {hosts}")


async def test_a_dns_name_spreads_calls_over_its_addresses(tiny_dns: TinyDns, clients: Clients, tmp_path: Path) -> None:
    # One name, two addresses (127.0.0.1 and 127.0.0.2, both loopback on Linux), the same port on each: what a
    # Kubernetes headless Service gives a client. Each server's certificate names the service, as in a cluster.
    cert_file, key_file = _certificate_for("review.medgate.test", clients.credentials, tmp_path)
    security = security_values(clients.credentials.directory, cert_file=cert_file, key_file=key_file)
    hosts = ["127.0.0.1", "127.0.0.2"]
    port = _port_free_on(hosts)
    async with _replicas(tmp_path / "replicas", security, hosts, port) as pair:
        target = f"dns://127.0.0.1:{tiny_dns.port}/review.medgate.test:{port}"
        async with connect.aio_channel(target, clients.security(Role.ADMIN)) as channel:
            stub = pb_grpc.ReviewStub(channel)
            answers = [await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest(), timeout=10) for _ in range(40)]
        _spread(Counter(_who(answer, pair) for answer in answers), 40)
        assert sum(r.queries() for r in pair) == 40
    assert ("review.medgate.test", 1) in tiny_dns.questions


async def test_a_list_goes_on_when_one_server_stops(tmp_path: Path, clients: Clients) -> None:
    """Round robin skips a server that went away: the calls after it land on the other one."""
    security = security_values(clients.credentials.directory)
    async with _replicas(tmp_path, security, ["127.0.0.1", "127.0.0.1"]) as pair:
        target = ",".join(f"127.0.0.1:{r.server.port}" for r in pair)
        async with connect.aio_channel(target, clients.security(Role.ADMIN)) as channel:
            stub = pb_grpc.ReviewStub(channel)
            first = Counter(
                [
                    _who(await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest(), timeout=10), pair)
                    for _ in range(10)
                ]
            )
            assert set(first) == {"a", "b"}
            await pair[0].server.stop()
            after: Counter[str] = Counter()
            for _ in range(20):
                try:
                    after[_who(await stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest(), timeout=10), pair)] += 1
                except grpc.aio.AioRpcError as exc:
                    # At most the call in flight as the server went: gRPC retries nothing that may have run.
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    after["failed"] += 1
            assert after["b"] >= 18 and after["a"] == 0 and after["failed"] <= 2, after
        pair.pop(0)  # stopped already

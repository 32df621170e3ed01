"""bench/loadgen.py against the real gateway: every ghz config in bench/ghz runs with no errors and ghz's summary."""

from __future__ import annotations

import asyncio
import base64
import io
import json
from pathlib import Path

import pytest

from bench import loadgen
from bench.ghz import make_fixtures
from services.gateway.server import GatewayServer
from services.security.identity import Role
from tests.conftest import Clients

ROOT = Path(__file__).resolve().parent.parent
GHZ = ROOT / "bench" / "ghz"
RPCS = {"Classify", "Detect", "Segment", "Analyze"}
SUMMARY_FIELDS = (
    "Count:",
    "Total:",
    "Slowest:",
    "Fastest:",
    "Average:",
    "Requests/sec:",
    "Response time histogram:",
    "Latency distribution:",
    *(f"{p} % in" for p in (10, 25, 50, 75, 90, 95, 99)),
    "Status code distribution:",
    "[OK]",
)


def test_committed_configs_are_complete_ghz_configs() -> None:
    configs = {path.stem: json.loads(path.read_text()) for path in sorted(GHZ.glob("*.json"))}
    assert {c["call"] for c in configs.values()} == {f"medgate.v1.Inference.{rpc}" for rpc in RPCS}
    for config in configs.values():
        assert config["protoset"] == "build/medgate.protoset" and "insecure" not in config  # TLS, as make run serves
        assert config["cacert"] == "var/credentials/ca.pem"
        assert config["metadata-file"] == "bench/ghz/fixtures/auth/metadata.json"  # the token: never committed
        assert config["host"] == "127.0.0.1:50051" and config["total"] >= config["concurrency"] > 0
        assert base64.b64decode(config["data"]["image"]["data"]).startswith(b"\x89PNG\r\n\x1a\n")
        # Parses as the request (the metadata file is written by make loadtest, from the token).
        loadgen.load_config(GHZ / f"{config['call'].rpartition('.')[2].lower()}.json", metadata={})


def test_go_durations() -> None:
    assert loadgen.parse_duration("1m30s") == 90.0
    assert loadgen.parse_duration("250ms") == 0.25
    assert loadgen.parse_duration("20") == 20.0
    assert loadgen.parse_duration(None) is None
    with pytest.raises(ValueError):
        loadgen.parse_duration("ten seconds")


@pytest.fixture(scope="module")
def fixture_configs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """make_fixtures' binary payloads (1024x1024 phantom PNG and RG1_UNCI.dcm) for each RPC."""
    configs: list[Path] = make_fixtures.write_fixtures(tmp_path_factory.mktemp("ghz-fixtures"))
    return configs


def connection(clients: Clients) -> dict[str, object]:
    """The session's CA and inference token in place of var/credentials' (ghz's --cacert and -m)."""
    if not clients.secure:
        return {"insecure": True}
    token = clients.credentials.token(Role.INFERENCE)
    return {"cacert": clients.credentials.ca_cert, "metadata": {"authorization": f"Bearer {token}"}}


async def test_every_config_runs_against_the_gateway_without_errors(
    gateway: GatewayServer, clients: Clients, fixture_configs: list[Path]
) -> None:
    configs = [*sorted(GHZ.glob("*.json")), *fixture_configs]
    assert len(configs) == 12  # 4 RPCs x (JSON data, PNG -B, DICOM -B)
    printed = io.StringIO()
    host = f"127.0.0.1:{gateway.port}"
    reports = await loadgen.run_configs(configs, out=printed, host=host, total=4, concurrency=2, **connection(clients))
    for path, report in zip(configs, reports, strict=True):
        assert report.count == 4 and report.status_codes == {"OK": 4}, (path, report.errors)
        assert report.connections == 2 and report.rps > 0
        document = report.to_ghz_json()
        assert [d["percentage"] for d in document["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
        assert document["fastest"] <= document["average"] <= document["slowest"] <= document["total"]
    text = printed.getvalue()
    for field in SUMMARY_FIELDS:
        assert text.count(field) >= len(configs), field


async def test_command_line_runs_for_a_duration_and_writes_json(
    gateway: GatewayServer, clients: Clients, tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    options = connection(clients)
    flags = ["--insecure"] if options.get("insecure") else ["--cacert", str(options["cacert"])]
    flags += ["-m", json.dumps(options["metadata"])] if "metadata" in options else []
    argv = [
        *flags,
        str(GHZ / "classify.json"),
        "--host",
        f"127.0.0.1:{gateway.port}",
        "-z",
        "1s",
        "-c",
        "2",
        "--json",
        str(out),
    ]
    code = await asyncio.to_thread(loadgen.main, argv)  # its own event loop, beside the gateway's
    assert code == 0
    [report] = json.loads(out.read_text())
    assert report["count"] >= 2 and report["statusCodeDistribution"] == {"OK": report["count"]}
    assert report["total"] >= 1e9 and report["errorDistribution"] == {}

"""A Python load generator for ghz configs: the same JSON in, ghz's summary out (for machines without ghz).

Reads a ghz config (``call``, ``host``, ``total``, ``concurrency``, ``connections``, ``duration``,
``max-duration``, ``timeout``, ``data`` / ``data-file`` in protobuf's JSON mapping or ``binary-file``
with a serialized request; and, TLS being the default as in ghz unless ``insecure``: ``cacert``,
``cert``/``key`` for mutual TLS, ``cname``, and ``metadata`` / ``metadata-file`` such as
``{"authorization": "Bearer ..."}``), serializes the request once and sends it over several grpc.aio
channels, each with its own TCP connection (``grpc.use_local_subchannel_pool``), with ``concurrency``
calls in flight. Prints ghz's summary (Count, Total, Slowest, Fastest, Average,
Requests/sec, response time histogram, latency distribution, status code and error distribution);
``--json`` writes the reports with ghz's JSON field names and units (durations in nanoseconds).

Differences from ghz: unary methods only; ``proto``/``protoset`` are not read (the compiled
``medgate.v1`` descriptors are used); no call-data templates; when ``duration`` ends, requests in
flight are awaited (ghz's ``duration-stop: wait``) rather than cancelled. As with ghz, paths are
relative to the working directory: run from the repository root. ``host`` (or ``--host``) may name several
gateways, ``host:port,host:port``, or ``dns:///name:port``: calls then go round robin over all of them.

    python -m bench.loadgen bench/ghz/classify.json bench/ghz/fixtures/classify-dicom.json --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
from google.protobuf import descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass

from clients import connect
from medgate.v1 import inference_pb2  # noqa: F401  (registers medgate.v1 in the default pool)

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
PERCENTAGES = (10, 25, 50, 75, 90, 95, 99)
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: str | float | int | None) -> float | None:
    """A Go duration ("10s", "1m30s", "250ms") or a number of seconds, in seconds; None or 0 for unset."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value) or None
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d*)?", text):
        return float(text) or None
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r} (e.g. 10s, 1m30s, 250ms)")
    return sum(float(n) * _UNIT_S[u] for n, u in parts) or None


@dataclass
class LoadConfig:
    """What one run does, from a ghz config plus command-line overrides."""

    name: str
    call: str
    path: str  # the gRPC method path, /package.Service/Method
    host: str
    total: int
    concurrency: int
    connections: int
    duration_s: float | None  # run this long, ignoring total (ghz's -z)
    max_duration_s: float | None  # stop at total or this long, whichever first (ghz's -x)
    timeout_s: float | None
    payloads: list[bytes]  # serialized requests, sent round-robin
    insecure: bool = False  # plaintext; otherwise TLS, as ghz defaults to
    cacert: Path | None = None  # None: gRPC's bundled public roots
    cert: Path | None = None
    key: Path | None = None
    cname: str = ""  # the name the server's certificate must carry, when not the host's
    metadata: tuple[tuple[str, str], ...] = ()  # sent with every call (ghz's -m), e.g. the bearer token


def _method(call: str) -> tuple[str, Any]:
    """``package.Service.Method`` or ``package.Service/Method`` -> (method path, input message class)."""
    service_name, _, method_name = call.replace("/", ".").rpartition(".")
    try:
        service = descriptor_pool.Default().FindServiceByName(service_name)
    except KeyError:
        raise ValueError(f"unknown service {service_name!r} in call {call!r}") from None
    method = service.methods_by_name.get(method_name)
    if method is None:
        raise ValueError(f"{service_name} has no method {method_name!r}")
    if method.client_streaming or method.server_streaming:
        raise ValueError(f"{call} is a streaming method; this generator sends unary calls only")
    return f"/{service.full_name}/{method.name}", GetMessageClass(method.input_type)


def load_config(
    path: Path,
    *,
    host: str | None = None,
    total: int | None = None,
    concurrency: int | None = None,
    connections: int | None = None,
    duration: str | None = None,
    insecure: bool | None = None,
    cacert: Path | None = None,
    cert: Path | None = None,
    key: Path | None = None,
    metadata: dict[str, str] | None = None,
) -> LoadConfig:
    """``path`` with the command line's overrides; TLS files given here mean TLS whatever the config says."""
    raw = json.loads(path.read_text())
    call = raw.get("call")
    if not call:
        raise ValueError(f"{path}: no 'call'")
    method_path, request_class = _method(call)
    if raw.get("binary-file"):
        payloads = [Path(raw["binary-file"]).read_bytes()]
        request_class.FromString(payloads[0])  # fail here, not in every call, when it is not that message
    else:
        data = json.loads(Path(raw["data-file"]).read_text()) if raw.get("data-file") else raw.get("data", {})
        items = data if isinstance(data, list) else [data]
        payloads = [json_format.ParseDict(item, request_class()).SerializeToString() for item in items]
    conc = int(concurrency or raw.get("concurrency") or 50)
    return LoadConfig(
        name=str(raw.get("name") or path.stem),
        call=call,
        path=method_path,
        host=host or raw.get("host") or "127.0.0.1:50051",
        total=int(total or raw.get("total") or 200),
        concurrency=conc,
        # ghz uses one connection unless told otherwise; several spread the load over gateway workers.
        connections=max(1, min(conc, int(connections or raw.get("connections") or min(conc, 4)))),
        duration_s=parse_duration(duration if duration is not None else raw.get("duration")),
        max_duration_s=parse_duration(raw.get("max-duration")),
        timeout_s=parse_duration(raw.get("timeout", "20s")),
        payloads=payloads,
        **_security(raw, insecure=insecure, cacert=cacert, cert=cert, key=key, metadata=metadata),
    )


def _security(
    raw: dict[str, Any],
    *,
    insecure: bool | None,
    cacert: Path | None,
    cert: Path | None,
    key: Path | None,
    metadata: dict[str, str] | None,
) -> dict[str, Any]:
    """ghz's connection options from a config and overrides: TLS files, plaintext, metadata."""
    if raw.get("skipTLS"):
        raise ValueError("skipTLS is not supported: give the server's CA as cacert")
    cacert = cacert or (Path(raw["cacert"]) if raw.get("cacert") else None)
    cert = cert or (Path(raw["cert"]) if raw.get("cert") else None)
    key = key or (Path(raw["key"]) if raw.get("key") else None)
    if (cert is None) != (key is None):
        raise ValueError("cert and key go together (the client certificate and its private key)")
    if insecure is None:
        explicit_tls = any(v is not None for v in (cacert, cert)) and not raw.get("insecure")
        insecure = bool(raw.get("insecure")) and not explicit_tls
    if metadata is None:
        if raw.get("metadata-file"):
            metadata = json.loads(Path(raw["metadata-file"]).read_text())
        else:
            metadata = raw.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata must be a JSON object of strings")
    return {
        "insecure": insecure,
        "cacert": cacert,
        "cert": cert,
        "key": key,
        "cname": str(raw.get("cname") or ""),
        "metadata": tuple((name.lower(), value) for name, value in metadata.items()),
    }


def _channel(config: LoadConfig, options: list[tuple[str, Any]]) -> grpc.aio.Channel:
    # host may name several gateways (comma-separated) or dns:///name:port: calls go round robin over them
    # (clients/connect.py), as a connection pinned by an L4 balancer would not.
    target = connect.parse_target(config.host)
    options = [*target.options, *options]
    if config.insecure:
        return grpc.aio.insecure_channel(target.uri, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=config.cacert.read_bytes() if config.cacert else None,
        private_key=config.key.read_bytes() if config.key else None,
        certificate_chain=config.cert.read_bytes() if config.cert else None,
    )
    if config.cname:
        options = [*options, ("grpc.ssl_target_name_override", config.cname)]
    return grpc.aio.secure_channel(target.uri, credentials, options=options)


@dataclass
class Report:
    """ghz's summary fields."""

    name: str
    call: str
    host: str
    concurrency: int
    connections: int
    total_s: float = 0.0
    latencies_s: list[float] = field(default_factory=list)  # every call, whatever its status
    ok_latencies_s: list[float] = field(default_factory=list)
    status_codes: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.latencies_s)

    @property
    def rps(self) -> float:
        return self.count / self.total_s if self.total_s > 0 else 0.0

    def _basis(self) -> np.ndarray:
        return np.asarray(self.ok_latencies_s or self.latencies_s or [0.0])

    def percentiles(self) -> dict[int, float]:
        values = self._basis()
        return {p: float(np.percentile(values, p)) for p in PERCENTAGES}

    def summary(self) -> dict[str, float]:
        values = self._basis()
        return {"fastest": float(values.min()), "slowest": float(values.max()), "average": float(values.mean())}

    def to_ghz_json(self) -> dict[str, Any]:
        """The fields of ``ghz -O json``, durations in nanoseconds."""
        ns = 1e9
        s = self.summary()
        return {
            "name": self.name,
            "options": {
                "call": self.call,
                "host": self.host,
                "concurrency": self.concurrency,
                "connections": self.connections,
            },
            "count": self.count,
            "total": int(self.total_s * ns),
            "average": int(s["average"] * ns),
            "fastest": int(s["fastest"] * ns),
            "slowest": int(s["slowest"] * ns),
            "rps": self.rps,
            "latencyDistribution": [{"percentage": p, "latency": int(v * ns)} for p, v in self.percentiles().items()],
            "statusCodeDistribution": dict(self.status_codes),
            "errorDistribution": dict(self.errors),
        }


def _go_code_name(code: grpc.StatusCode) -> str:
    """ghz prints Go's names: DEADLINE_EXCEEDED -> DeadlineExceeded, OK -> OK."""
    name: str = code.name
    return "OK" if name == "OK" else "".join(part.capitalize() for part in name.split("_"))


def _ms(seconds: float) -> str:
    return f"{seconds * 1000.0:.2f} ms"


def format_report(report: Report) -> str:
    s = report.summary()
    lines = [
        "",
        "Summary:",
        f"  Name:\t{report.name}",
        f"  Count:\t{report.count}",
        f"  Total:\t{report.total_s:.2f} s" if report.total_s >= 1 else f"  Total:\t{_ms(report.total_s)}",
        f"  Slowest:\t{_ms(s['slowest'])}",
        f"  Fastest:\t{_ms(s['fastest'])}",
        f"  Average:\t{_ms(s['average'])}",
        f"  Requests/sec:\t{report.rps:.2f}",
        "",
        "Response time histogram:",
    ]
    values = report._basis() * 1000.0
    counts, edges = np.histogram(values, bins=10)
    peak = max(int(counts.max()), 1)
    for count, edge in zip(counts, edges[1:], strict=True):
        bar = "∎" * math.ceil(40 * int(count) / peak) if count else ""
        lines.append(f"  {edge:.3f} [{count}]\t|{bar}")
    lines += ["", "Latency distribution:"]
    lines += [f"  {p} % in {_ms(v)} " for p, v in report.percentiles().items()]
    lines += ["", "Status code distribution:"]
    lines += [f"  [{code}]\t{n} responses" for code, n in sorted(report.status_codes.items())]
    if report.errors:
        lines += ["", "Error distribution:"]
        lines += [f"  [{n}]\t{message}" for message, n in sorted(report.errors.items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


async def run_load(config: LoadConfig) -> Report:
    """Send ``config`` and measure each call from send to answer."""
    options = [
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        # Each channel its own TCP connection, so SO_REUSEPORT can spread them over gateway workers.
        ("grpc.use_local_subchannel_pool", 1),
    ]
    channels = [_channel(config, options) for _ in range(config.connections)]
    report = Report(config.name, config.call, config.host, config.concurrency, config.connections)
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.channel_ready() for ch in channels)), timeout=10)
    except TimeoutError:
        for ch in channels:
            await ch.close()
        raise ConnectionError(f"could not connect to {config.host} within 10 s") from None
    # Requests and answers pass as bytes: the client's cost stays out of the measured latency.
    calls = [ch.unary_unary(config.path, request_serializer=None, response_deserializer=None) for ch in channels]
    issued = 0
    stop_at = math.inf
    limit = config.total
    if config.duration_s:
        limit = sys.maxsize
    window = config.duration_s or config.max_duration_s

    def claim() -> int | None:
        nonlocal issued
        if issued >= limit or time.perf_counter() >= stop_at:
            return None
        issued += 1
        return issued - 1

    async def worker(index: int) -> None:
        call = calls[index % len(calls)]
        while (number := claim()) is not None:
            payload = config.payloads[number % len(config.payloads)]
            started = time.perf_counter()
            try:
                await call(payload, timeout=config.timeout_s, metadata=config.metadata or None)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = _go_code_name(exc.code())
                message = f"rpc error: code = {code} desc = {exc.details()}"
                report.errors[message] = report.errors.get(message, 0) + 1
            elapsed = time.perf_counter() - started
            report.latencies_s.append(elapsed)
            if code == "OK":
                report.ok_latencies_s.append(elapsed)
            report.status_codes[code] = report.status_codes.get(code, 0) + 1

    began = time.perf_counter()
    if window:
        stop_at = began + window
    try:
        await asyncio.gather(*(worker(i) for i in range(config.concurrency)))
    finally:
        report.total_s = time.perf_counter() - began
        for ch in channels:
            with contextlib.suppress(Exception):
                await ch.close()
    return report


async def run_configs(paths: list[Path], *, out: IO[str] | None = None, **overrides: Any) -> list[Report]:
    out = out or sys.stdout
    reports = []
    for path in paths:
        config = load_config(path, **overrides)
        print(
            f"\n== {path} ({config.call}, {config.concurrency} in flight over {config.connections} connections)",
            file=out,
        )
        report = await run_load(config)
        print(format_report(report), file=out, end="")
        out.flush()
        reports.append(report)
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="+", type=Path, help="ghz config files (JSON)")
    parser.add_argument(
        "--host",
        help="override the configs' host: host:port, several comma-separated, or dns:///name:port (round robin)",
    )
    parser.add_argument("-n", "--total", type=int, help="override total requests")
    parser.add_argument("-c", "--concurrency", type=int, help="override requests in flight")
    parser.add_argument("--connections", type=int, help="channels (TCP connections); default min(concurrency, 4)")
    parser.add_argument("-z", "--duration", help="run for this long (e.g. 10s), ignoring total")
    parser.add_argument("--json", type=Path, help="write the reports here (ghz's JSON fields, nanoseconds)")
    parser.add_argument("--cacert", type=Path, help="override the configs' CA certificate (TLS)")
    parser.add_argument("--cert", type=Path, help="override the configs' client certificate (mutual TLS)")
    parser.add_argument("--key", type=Path, help="override the configs' client key")
    parser.add_argument(
        "-m", "--metadata", type=json.loads, help='override the metadata, e.g. {"authorization": "Bearer ..."}'
    )
    parser.add_argument("--insecure", action="store_true", default=None, help="plaintext, whatever the configs say")
    args = parser.parse_args(argv)
    try:
        reports = asyncio.run(
            run_configs(
                args.configs,
                host=args.host,
                total=args.total,
                concurrency=args.concurrency,
                connections=args.connections,
                duration=args.duration,
                insecure=args.insecure,
                cacert=args.cacert,
                cert=args.cert,
                key=args.key,
                metadata=args.metadata,
            )
        )
    except (ValueError, OSError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([r.to_ghz_json() for r in reports], indent=2) + "\n")
    return 1 if any(set(r.status_codes) - {"OK"} for r in reports) else 0


if __name__ == "__main__":
    sys.exit(main())

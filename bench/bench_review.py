"""Review delivery under load (``make bench-review``): many reviewer streams, time from routing to delivery.

Starts the review service as its own process on a fresh store, opens ``--reviewers`` StreamCases
subscriptions, then starts ``--cases`` human loops at a steady rate; each reviewer answers at
once. Reported: routing-to-delivery latency p50/p99 (StartHumanLoop sent -> case received by a
reviewer), and cases/s. A benchmark, not a test.

``--store-url postgresql://...`` runs the service on PostgreSQL instead of a fresh SQLite file (for a
throwaway server: ``python -m tests.postgres`` prints one's URL); case names carry a run id, so one
database serves several runs.

The service runs as ``make run`` serves it, TLS and tokens, on throwaway development credentials:
each reviewer has its own token (its subject is its id), sent per call since reviewers share the
connections; the cases are started with the router token. ``--plaintext`` measures without either.

``--decisions`` measures throughput instead: for each of ``--replicas`` (default ``1,2``) it starts that
many review services on one PostgreSQL (``--store-url``, or a throwaway server of its own from
``tests.postgres``), pre-loads ``--preload`` human loops of a flow of its own, then ``--reviewers``
reviewers spread over the replicas (each with its own token, max_in_flight 1) lease and decide as fast as
they can; after ``--warmup`` s, decisions recorded during ``--duration`` s are counted. Reported per
replica count, side by side: decisions/s (and per replica), SubmitReview p50/p99, the wait from a
decision's acknowledgement to that reviewer's next case p50/p99, and the CPU seconds the client, the
replicas and (a server of its own) PostgreSQL spent in the window -- on a small machine they all share
the same cores, which bounds what a second replica can add.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import stack_security
from clients import connect
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.security.credentials import DevCredentials, load_signing_key, mint_token
from services.security.identity import Role
from services.settings import load_settings

ROOT = Path(__file__).resolve().parent.parent

FLOWS = """
[[flows]]
name = "bench"
task_type = "classification"
categories = ["normal", "lesion"]
task_count = 1
task_time_limit_s = 600
output_dir = "out"
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Callers:
    """The bearer-token metadata of each caller (none in plaintext); the channels carry TLS only."""

    def __init__(self, credentials: DevCredentials, *, secure: bool) -> None:
        self.credentials = credentials
        self.secure = secure
        self.security = stack_security.client(credentials, None, secure=secure)
        self._key = load_signing_key(credentials.signing_key) if secure else None

    def channel(self, target: str) -> grpc.aio.Channel:
        return connect.aio_channel(target, self.security)

    def reviewer(self, name: str) -> tuple[tuple[str, str], ...] | None:
        if self._key is None:
            return None
        security = load_settings().security
        token = mint_token(
            self._key,
            issuer=security.issuer,
            audience=security.audience,
            subject=name,
            roles=[Role.REVIEWER.value],
            roles_claim=security.roles_claim,
        )
        return (("authorization", f"Bearer {token}"),)

    def router(self) -> tuple[tuple[str, str], ...] | None:
        if not self.secure:
            return None
        return (("authorization", f"Bearer {self.credentials.token(Role.ROUTER)}"),)


async def wait_serving(target: str, callers: Callers) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with callers.channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            try:
                answer = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
    raise RuntimeError("review service did not start")


async def run(target: str, callers: Callers, reviewers: int, cases: int, rate: float, channels: int) -> dict[str, Any]:
    sent: dict[str, float] = {}
    latencies: list[float] = []
    done = asyncio.Event()
    pool = [callers.channel(target) for _ in range(channels)]
    subscribed = 0
    all_subscribed = asyncio.Event()

    async def reviewer(index: int) -> None:
        nonlocal subscribed
        stub = pb_grpc.ReviewStub(pool[index % channels])
        name = f"dr-{index:03d}"
        token = callers.reviewer(name)
        stream = stub.StreamCases(
            pb.StreamCasesRequest(reviewer_id=name, flow_definitions=["bench"], max_in_flight=1), metadata=token
        )
        await stream.wait_for_connection()
        subscribed += 1
        if subscribed == reviewers:
            all_subscribed.set()
        try:
            async for case in stream:
                if case.human_loop_name in sent:  # not a leftover of an earlier run on the same database
                    latencies.append(time.perf_counter() - sent[case.human_loop_name])
                await stub.SubmitReview(
                    pb.SubmitReviewRequest(
                        decision_id=f"{name}-{case.human_loop_name}",
                        delivery_id=case.delivery_id,
                        reviewer_id=name,
                        answer=pb.ReviewAnswer(label="normal"),
                    ),
                    metadata=token,
                )
                if len(latencies) >= cases:
                    done.set()
        except grpc.aio.AioRpcError:
            pass

    tasks = [asyncio.create_task(reviewer(i)) for i in range(reviewers)]
    await asyncio.wait_for(all_subscribed.wait(), timeout=60)
    await asyncio.sleep(1.0)
    stub = pb_grpc.ReviewStub(pool[0])
    content = json.dumps({"classification": {"scores": [{"label": "lesion", "score": 0.55}]}})
    run_id = uuid.uuid4().hex[:8]
    started = time.perf_counter()
    for index in range(cases):
        name = f"case-{run_id}-{index:05d}"
        sent[name] = time.perf_counter()
        await stub.StartHumanLoop(
            pb.StartHumanLoopRequest(name=name, flow_definition="bench", input_content_json=content, image_png=b"x"),
            metadata=callers.router(),
        )
        next_at = started + (index + 1) / rate
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    await asyncio.wait_for(done.wait(), timeout=120)
    elapsed = time.perf_counter() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in pool:
        await channel.close()
    values = np.asarray(latencies) * 1000
    return {
        "reviewers": reviewers,
        "cases": cases,
        "offered_rate_per_s": rate,
        "delivered": len(latencies),
        "cases_per_s": round(len(latencies) / elapsed, 1),
        "routing_to_delivery_ms": {
            "p50": round(float(np.percentile(values, 50)), 2),
            "p99": round(float(np.percentile(values, 99)), 2),
            "max": round(float(values.max()), 2),
        },
    }


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and its live children (PostgreSQL: the postmaster and its backends)."""
    total = _cpu_seconds(root)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == root:
            total += _cpu_seconds(int(entry.name))
    return total


def _client_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _percentile_ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values) * 1000, q)), 2) if values else 0.0


def decide_flows(flow: str) -> str:
    return FLOWS.replace('name = "bench"', f'name = "{flow}"')


async def preload(targets: list[str], callers: Callers, flow: str, count: int, concurrency: int = 16) -> float:
    """Start ``count`` human loops of ``flow`` (spread over the replicas); returns the seconds it took."""
    pool = [callers.channel(target) for target in targets]
    content = json.dumps({"classification": {"scores": [{"label": "lesion", "score": 0.55}]}})
    queue = iter(range(count))
    started = time.perf_counter()

    async def worker(slot: int) -> None:
        stub = pb_grpc.ReviewStub(pool[slot % len(pool)])
        for index in queue:
            await stub.StartHumanLoop(
                pb.StartHumanLoopRequest(
                    name=f"{flow}-{index:06d}", flow_definition=flow, input_content_json=content, image_png=b"x"
                ),
                metadata=callers.router(),
            )

    await asyncio.gather(*(worker(slot) for slot in range(concurrency)))
    for channel in pool:
        await channel.close()
    return time.perf_counter() - started


async def decide(
    targets: list[str],
    callers: Callers,
    flow: str,
    reviewers: int,
    warmup: float,
    duration: float,
    channels: int,
    cpu_probes: dict[str, Any],
) -> dict[str, Any]:
    """``reviewers`` reviewers (reviewer i on replica i mod n) lease and decide as fast as they can."""
    per_replica = max(1, channels // len(targets))
    pools = [[callers.channel(target) for _ in range(per_replica)] for target in targets]
    window: list[float] = []  # [start, end] once the warm-up is over
    latencies: list[float] = []
    by_replica = [0] * len(targets)
    by_reviewer = [0] * reviewers
    received = [0] * reviewers  # cases each reviewer got, warm-up included
    waits: list[float] = []  # a decision acknowledged -> that reviewer's next case received
    decided_total = 0
    errors: list[str] = []
    stopping = False

    async def reviewer(index: int) -> None:
        nonlocal decided_total
        replica = index % len(targets)
        stub = pb_grpc.ReviewStub(pools[replica][(index // len(targets)) % per_replica])
        name = f"dr-{index:03d}"
        token = callers.reviewer(name)
        stream = stub.StreamCases(
            pb.StreamCasesRequest(reviewer_id=name, flow_definitions=[flow], max_in_flight=1), metadata=token
        )
        last_done = 0.0
        try:
            async for case in stream:
                received[index] += 1
                sent = time.perf_counter()
                if last_done and window and window[0] <= sent <= window[1]:
                    waits.append(sent - last_done)
                answer = await stub.SubmitReview(
                    pb.SubmitReviewRequest(
                        decision_id=f"{name}-{case.human_loop_name}",
                        delivery_id=case.delivery_id,
                        reviewer_id=name,
                        answer=pb.ReviewAnswer(label="normal"),
                    ),
                    metadata=token,
                )
                done = last_done = time.perf_counter()
                if answer.recorded_now:
                    decided_total += 1
                    if window and window[0] <= done <= window[1]:
                        latencies.append(done - sent)
                        by_replica[replica] += 1
                        by_reviewer[index] += 1
            if not stopping:
                errors.append(f"{name}: the stream ended")
        except grpc.aio.AioRpcError as error:
            if not stopping:
                errors.append(f"{name}: {error.code().name} {error.details()}")

    tasks = [asyncio.create_task(reviewer(i)) for i in range(reviewers)]
    await asyncio.sleep(warmup)
    cpu_before = {label: probe() for label, probe in cpu_probes.items()}
    start = time.perf_counter()
    window[:] = [start, start + duration]
    await asyncio.sleep(duration)
    elapsed = time.perf_counter() - start
    cpu = {label: round(probe() - cpu_before[label], 1) for label, probe in cpu_probes.items()}
    stopping = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for pool in pools:
        for channel in pool:
            await channel.close()
    return {
        "replicas": len(targets),
        "reviewers": reviewers,
        "window_s": round(elapsed, 2),
        "decisions": len(latencies),
        "decisions_per_s": round(len(latencies) / elapsed, 1),
        "decisions_by_replica": by_replica,
        "decisions_per_reviewer_min_median_max": [min(by_reviewer), int(np.median(by_reviewer)), max(by_reviewer)],
        "reviewers_idle_in_window": sum(1 for n in by_reviewer if n == 0),
        "reviewers_never_served": sum(1 for n in received if n == 0),
        "submit_review_ms": {
            "p50": _percentile_ms(latencies, 50),
            "p99": _percentile_ms(latencies, 99),
            "max": _percentile_ms(latencies, 100),
        },
        "next_case_ms": {"p50": _percentile_ms(waits, 50), "p99": _percentile_ms(waits, 99)},
        "decided_including_warmup": decided_total,
        "cpu_seconds_in_window": cpu,
        "errors": errors[:5],
    }


def start_replicas(
    tmp: Path, count: int, flows: str, store_url: str, credentials: DevCredentials, *, secure: bool
) -> tuple[list[subprocess.Popen[bytes]], list[str]]:
    """``count`` review services (``medgate review serve``) on one store, each on its own port."""
    flows_file = tmp / f"flows-{uuid.uuid4().hex[:6]}.toml"
    flows_file.write_text(flows)
    servers: list[subprocess.Popen[bytes]] = []
    targets: list[str] = []
    for index in range(count):
        port = free_port()
        env = dict(
            os.environ,
            MEDGATE_REVIEW_STORE_PATH=str(tmp / "review.sqlite3"),
            MEDGATE_REVIEW_STORE_URL=store_url,
            MEDGATE_REVIEW_FLOWS_FILE=str(flows_file),
            MEDGATE_REVIEW_PORT=str(port),
            MEDGATE_REVIEW_WEB_ENABLED="false",  # the reviewer page's fixed port would clash between replicas
            **stack_security.server_env(credentials, secure=secure, audit_dir=tmp / f"audit-{index}"),
        )
        servers.append(
            subprocess.Popen(
                [sys.executable, "-m", "clients.cli", "review", "serve"],
                env=env,
                cwd=ROOT,
                stdout=subprocess.DEVNULL,
                stderr=(tmp / f"replica-{index}.log").open("wb"),
            )
        )
        targets.append(f"127.0.0.1:{port}")
    return servers, targets


def stop_replicas(servers: list[subprocess.Popen[bytes]]) -> None:
    for server in servers:
        server.terminate()
    for server in servers:
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def run_decisions(args: argparse.Namespace, secure: bool) -> dict[str, Any]:
    """Decisions per second with each replica count of ``--replicas``, one after the other in one run."""
    counts = [int(n) for n in args.replicas.split(",")]
    reviewers = args.reviewers if args.reviewers is not None else 20
    cluster = None
    store_url = args.store_url
    if not store_url:
        from tests.postgres import PostgresCluster

        cluster = PostgresCluster()
        cluster.start()
    load_before = os.getloadavg()
    phases = []
    try:
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            os.chmod(tmp, 0o755)
            credentials = stack_security.make_credentials(tmp / "credentials")
            callers = Callers(credentials, secure=secure)
            run_id = uuid.uuid4().hex[:8]
            for count in counts:
                flow = f"decide-{run_id}-{count}"
                url = store_url or cluster.create_database(f"decide_{run_id}_{count}")  # type: ignore[union-attr]
                servers, targets = start_replicas(tmp, count, decide_flows(flow), url, credentials, secure=secure)
                try:
                    for index, target in enumerate(targets):
                        try:
                            asyncio.run(wait_serving(target, callers))
                        except RuntimeError:
                            log = (tmp / f"replica-{index}.log").read_text(errors="replace")
                            raise RuntimeError(f"replica {index} did not start:\n{log[-3000:]}") from None
                    preload_s = asyncio.run(preload(targets, callers, flow, args.preload))
                    probes: dict[str, Any] = {"client": _client_cpu_seconds}
                    for index, server in enumerate(servers):
                        probes[f"replica_{index}"] = lambda pid=server.pid: _cpu_seconds(pid)
                    if cluster is not None:
                        postmaster = int((cluster.data_dir / "postmaster.pid").read_text().split()[0])
                        probes["postgresql"] = lambda pid=postmaster: _tree_cpu_seconds(pid)
                    phase = asyncio.run(
                        decide(targets, callers, flow, reviewers, args.warmup, args.duration, args.channels, probes)
                    )
                finally:
                    stop_replicas(servers)
                phase["preloaded"] = args.preload
                phase["preload_s"] = round(preload_s, 1)
                phase["ran_dry"] = phase["decided_including_warmup"] >= args.preload
                phases.append(phase)
                print(json.dumps(phase), flush=True)
    finally:
        if cluster is not None:
            cluster.stop()
    return {
        "mode": "decisions",
        "store": "postgresql",
        "tls_and_tokens": secure,
        "warmup_s": args.warmup,
        "duration_s": args.duration,
        "phases": phases,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "caveat": "client, every review replica and PostgreSQL share this machine's cores; the replicas "
        "compete with each other and with the database for them, so this is not a scale-out measurement",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reviewers", type=int, default=None, help="reviewer streams (default 200; --decisions: 20)")
    parser.add_argument("--cases", type=int, default=400)
    parser.add_argument("--rate", type=float, default=20.0, help="cases started per second")
    parser.add_argument("--channels", type=int, default=10, help="client connections the streams share")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "review.json")
    parser.add_argument("--plaintext", action="store_true", help="no TLS and no tokens (what security costs)")
    parser.add_argument(
        "--store-url",
        default="",
        help="postgresql://... to run the service on PostgreSQL (default: a fresh SQLite file)",
    )
    parser.add_argument("--decisions", action="store_true", help="decisions/s with 1 and 2 replicas on PostgreSQL")
    parser.add_argument("--replicas", default="1,2", help="--decisions: replica counts, one after the other")
    parser.add_argument("--preload", type=int, default=3000, help="--decisions: human loops started beforehand")
    parser.add_argument("--warmup", type=float, default=3.0, help="--decisions: seconds before counting")
    parser.add_argument("--duration", type=float, default=15.0, help="--decisions: seconds counted")
    args = parser.parse_args(argv)
    secure = not args.plaintext
    if args.decisions:
        if args.out == parser.get_default("out"):
            args.out = ROOT / "bench" / "results" / "review-decisions.json"
        result = run_decisions(args, secure)
        result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return 0
    args.reviewers = 200 if args.reviewers is None else args.reviewers
    with tempfile.TemporaryDirectory() as tmp:
        flows = Path(tmp) / "flows.toml"
        flows.write_text(FLOWS)
        port = free_port()
        credentials = stack_security.make_credentials(Path(tmp) / "credentials")
        callers = Callers(credentials, secure=secure)
        env = dict(
            os.environ,
            MEDGATE_REVIEW_STORE_PATH=str(Path(tmp) / "review.sqlite3"),
            MEDGATE_REVIEW_STORE_URL=args.store_url,
            MEDGATE_REVIEW_FLOWS_FILE=str(flows),
            MEDGATE_REVIEW_PORT=str(port),
            **stack_security.server_env(credentials, secure=secure, audit_dir=Path(tmp) / "audit"),
        )
        server = subprocess.Popen(
            [sys.executable, "-m", "clients.cli", "review", "serve"],
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            target = f"127.0.0.1:{port}"
            asyncio.run(wait_serving(target, callers))
            result = asyncio.run(run(target, callers, args.reviewers, args.cases, args.rate, args.channels))
            result["tls_and_tokens"] = secure
            result["store"] = "postgresql" if args.store_url else "sqlite"
        finally:
            server.terminate()
            server.wait(timeout=30)
    result["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

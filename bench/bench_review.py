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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reviewers", type=int, default=200)
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
    args = parser.parse_args(argv)
    secure = not args.plaintext
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

"""What the RPC layer costs per call (``make bench-rpc``): the same servicer with and without medgate's interceptors.

One process, two servers on loopback serving the real ReviewServicer's ``ListFlowDefinitions`` (no
store access, so the call is all gRPC): a bare ``grpc.aio`` server, an
:class:`services.rpc.server.RpcServer` with the full chain (request id, access log, status table,
deadline, validation) in plaintext, and the same with TLS and a bearer token verified on each call (as
``make run`` serves, on throwaway development credentials). Calls rotate over the arms on their own
channels, so the machine's noise falls on all alike. Reported: p50/p99 per arm, the added microseconds at
p50, and what TLS and the token add over the plaintext chain. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench import stack_security
from clients import connect
from medgate.v1 import review_pb2 as pb
from medgate.v1 import review_pb2_grpc as pb_grpc
from services.review.flows import load_flows
from services.review.servicer import ReviewServicer
from services.review.store import ReviewStore
from services.rpc.server import RpcServer
from services.security.identity import Role
from services.settings import PROJECT_ROOT, load_settings

SERVICE = pb.DESCRIPTOR.services_by_name["Review"].full_name


async def _timed(stub: pb_grpc.ReviewStub, request: pb.ListFlowDefinitionsRequest) -> float:
    started = time.perf_counter()
    await stub.ListFlowDefinitions(request, timeout=10)
    return (time.perf_counter() - started) * 1e6


async def run(calls: int, warmup: int) -> dict[str, Any]:
    logging.getLogger("medgate.bench").setLevel(logging.WARNING)  # the access log goes nowhere, as in production
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(2) as executor:
        store = ReviewStore(Path(tmp) / "review.sqlite3")
        servicer = ReviewServicer(store, load_flows(PROJECT_ROOT / "config" / "flows.toml"), executor)
        bare = grpc.aio.server()
        pb_grpc.add_ReviewServicer_to_server(servicer, bare)
        bare_port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        layered = RpcServer(host="127.0.0.1", port=0, logger="medgate.bench", default_deadline_s=60.0, grace_period_s=1)
        layered.add(SERVICE, pb_grpc.add_ReviewServicer_to_server, servicer)
        layered_port = await layered.start()
        credentials = stack_security.make_credentials(Path(tmp) / "credentials")
        values = stack_security.security_values(credentials, secure=True, audit_dir=Path(tmp) / "audit")
        security = load_settings(security=values).security
        secured = RpcServer(
            host="127.0.0.1",
            port=0,
            logger="medgate.bench",
            default_deadline_s=60.0,
            grace_period_s=1,
            security=security,
        )
        secured.add(SERVICE, pb_grpc.add_ReviewServicer_to_server, servicer)
        secured_port = await secured.start()
        request = pb.ListFlowDefinitionsRequest()
        arms = ("bare", "rpc_layer", "rpc_layer_tls_token")
        times: dict[str, list[float]] = {arm: [] for arm in arms}
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{bare_port}") as bare_channel,
                grpc.aio.insecure_channel(f"127.0.0.1:{layered_port}") as layered_channel,
                connect.aio_channel(
                    f"127.0.0.1:{secured_port}", stack_security.client(credentials, Role.ADMIN, secure=True)
                ) as secured_channel,
            ):
                stubs = {
                    "bare": pb_grpc.ReviewStub(bare_channel),
                    "rpc_layer": pb_grpc.ReviewStub(layered_channel),
                    "rpc_layer_tls_token": pb_grpc.ReviewStub(secured_channel),
                }
                for i in range(warmup + calls):
                    for arm in arms[i % 3 :] + arms[: i % 3]:
                        elapsed = await _timed(stubs[arm], request)
                        if i >= warmup:
                            times[arm].append(elapsed)
        finally:
            await bare.stop(0)
            await layered.stop()
            await secured.stop()
            store.close()
    result: dict[str, Any] = {"calls_per_arm": calls}
    for arm, samples in times.items():
        result[arm] = {
            "p50_us": round(float(np.percentile(samples, 50)), 1),
            "p99_us": round(float(np.percentile(samples, 99)), 1),
        }
    result["added_p50_us"] = round(result["rpc_layer"]["p50_us"] - result["bare"]["p50_us"], 1)
    result["ratio_p50"] = round(result["rpc_layer"]["p50_us"] / result["bare"]["p50_us"], 3)
    result["tls_token_added_p50_us"] = round(result["rpc_layer_tls_token"]["p50_us"] - result["rpc_layer"]["p50_us"], 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000, help="timed calls per arm")
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "bench" / "results" / "rpc.json")
    args = parser.parse_args()
    result = asyncio.run(run(args.calls, args.warmup))
    print(json.dumps(result, indent=2))
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

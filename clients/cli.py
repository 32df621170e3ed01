"""The one command-line tool: ``medgate serve``, ``medgate infer``, ``medgate impression`` and friends."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from services.settings import SecuritySettings, load_settings


def _configure_logging(verbose: bool) -> None:
    from services.logs import configure_logging

    configure_logging(load_settings().gateway.log_format, level=logging.DEBUG if verbose else logging.INFO)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def cmd_triton(args: argparse.Namespace) -> int:
    """Start the embedded Triton on the model repository and keep it up until Ctrl-C."""
    from services.triton.embedded import triton_for

    settings = load_settings()
    with triton_for(settings.triton) as url:
        logging.getLogger("medgate").info("Triton ready at %s with every model READY; Ctrl-C stops it", url)
        _wait_for_signal()
    return 0


def _ensure_credentials(security: SecuritySettings) -> None:
    """The development credentials, once, when the servers would read them from credentials_dir and they are missing.

    Files configured elsewhere (a hospital's CA, keys and identity provider) are never created or replaced.
    """
    from services.security.credentials import dev_credentials_needed, ensure_dev_credentials

    if dev_credentials_needed(security):
        made = ensure_dev_credentials(security)
        logging.getLogger("medgate").info(
            "development credentials (CA, certificates, signing key, one token per role) written to %s", made.directory
        )


def cmd_credentials(args: argparse.Namespace) -> int:
    """Create the development CA, certificates, signing key and tokens in security.credentials_dir (once)."""
    from services.security.credentials import ensure_dev_credentials

    security = load_settings().security
    made = ensure_dev_credentials(security, force=args.force)
    state = f"wrote {', '.join(made.written)}" if made.written else "all present and valid, nothing written"
    print(f"development credentials in {made.directory} ({state}):")
    print(f"  CA                 {made.ca_cert}  (clients trust this: --ca)")
    print(f"  server             {made.server_cert}, {made.server_key}  (localhost, 127.0.0.1, ::1)")
    print(f"  client (mTLS)      {made.client_cert}, {made.client_key}  (--cert/--key)")
    print(f"  token signing key  {made.signing_key}, public keys {made.jwks}")
    for role in ("inference", "reviewer", "admin", "router"):
        print(f"  {role + ' token':<18} {made.token_path(role)}")
    if args.force and made.written:
        print("running servers and clients holding the old CA or tokens need the new ones (restart the servers)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    """The whole stack: Triton (embedded unless MEDGATE_TRITON_URL is set), the DICOM node and the gateway workers."""
    import dataclasses

    from services.dicom.node import node_for
    from services.gateway.server import run_gateway
    from services.triton.embedded import triton_for

    settings = load_settings()
    overrides = {k: v for k, v in {"port": args.port, "workers": args.workers, "host": args.host}.items() if v}
    if overrides:
        settings = dataclasses.replace(settings, gateway=dataclasses.replace(settings.gateway, **overrides))
    needed = [*settings.models.as_dict().values(), *([settings.report.model] if settings.report.enabled else [])]
    _ensure_credentials(settings.security)
    # The DICOM node (dicom.enabled) runs in this process beside the gateway workers and calls them like any client.
    with triton_for(settings.triton, needed) as url, node_for(settings):
        run_gateway(settings, url)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from clients import infer

    settings = load_settings()
    target = args.target or f"{settings.gateway.host}:{settings.gateway.port}"
    return infer.run(args, target)


def cmd_batch(args: argparse.Namespace) -> int:
    """Folders of studies through the gateway's stream: resumable, with JSON/NPZ/PNG outputs and a summary."""
    from clients import batch

    settings = load_settings()
    target = args.target or f"{settings.gateway.host}:{settings.gateway.port}"
    return batch.run(args, target)


def cmd_impression(args: argparse.Namespace) -> int:
    """Findings to impression through the Report service (one text, or JSON Lines through the stream)."""
    from clients import impression

    settings = load_settings()
    target = args.target or f"{settings.gateway.host}:{settings.gateway.port}"
    return impression.run(args, target)


def cmd_reviewer(args: argparse.Namespace) -> int:
    from clients import reviewer

    settings = load_settings()
    return reviewer.review(args, args.target or settings.review.target)


def cmd_review(args: argparse.Namespace) -> int:
    """Human loops over gRPC (list, describe, stop, delete, flows) and the manifest export from the store."""
    import json

    import grpc
    from google.protobuf import json_format

    from clients import connect
    from medgate.v1 import review_pb2 as pb
    from medgate.v1 import review_pb2_grpc as pb_grpc
    from services.security.identity import Role

    settings = load_settings()
    if args.review_command == "serve":
        import asyncio

        from services.gateway.server import serve_review

        _ensure_credentials(settings.security)
        asyncio.run(serve_review(settings))
        return 0
    if args.review_command == "export-manifest":
        from services.review.flows import load_flows
        from services.review.output import export_manifest
        from services.review.store import open_store

        flows = load_flows(settings.review.flows_file)
        if args.flow not in flows:
            print(f"error: unknown flow {args.flow!r}; flows: {', '.join(flows)}", file=sys.stderr)
            return 2
        from services.audit.export import audited_export

        with audited_export(settings.security, args.flow) as export:  # 110106 Export: who, which flow and loops
            with open_store(settings.review, owner=False) as store:  # SQLite or PostgreSQL, as the service uses
                path = export_manifest(store, flows[args.flow], args.out, source_prefix=args.source_prefix)
            export.done(path)
        print(path)
        return 0
    if args.review_command == "simulate":
        from clients import review_simulate

        return review_simulate.run(args)
    security = connect.from_args(args, Role.ADMIN)
    with connect.channel(args.target or settings.review.target, security) as channel:
        stub = pb_grpc.ReviewStub(channel)
        try:
            if args.review_command == "flows":
                answer: object = stub.ListFlowDefinitions(pb.ListFlowDefinitionsRequest())
            elif args.review_command == "list":
                answer = stub.ListHumanLoops(
                    pb.ListHumanLoopsRequest(flow_definition=args.flow or "", max_results=args.max_results)
                )
            elif args.review_command == "describe":
                answer = stub.DescribeHumanLoop(pb.DescribeHumanLoopRequest(name=args.name))
            elif args.review_command == "stop":
                answer = stub.StopHumanLoop(pb.StopHumanLoopRequest(name=args.name))
            else:
                answer = stub.DeleteHumanLoop(pb.DeleteHumanLoopRequest(name=args.name))
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}{connect.explain(exc)}", file=sys.stderr)
            return 2
    print(json.dumps(json_format.MessageToDict(answer), indent=2))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Fine-tune a role's serving model on reviewed cases; land it as the next Triton version (training/)."""
    from training import train_from_review

    return train_from_review.run(args)


def cmd_models(args: argparse.Namespace) -> int:
    """A role's model versions: list, promote on evidence, roll back, shadow report, a repository outside the tree."""
    from clients import models

    return models.run(args)


def cmd_audit(args: argparse.Namespace) -> int:
    """The audit trail: verify its hash chain, compare it with the syslog mirror, rotate its key (clients/audit.py)."""
    from clients import audit

    return audit.run(args)


def build_parser() -> argparse.ArgumentParser:
    from clients import infer

    parser = argparse.ArgumentParser(prog="medgate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the whole stack: Triton with every model, then the gateway")
    serve.add_argument("--host", help="gateway address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="gateway port (default 50051)")
    serve.add_argument("--workers", type=int, help="gateway worker processes sharing the port (default 1)")
    serve.set_defaults(func=cmd_serve)

    credentials = commands.add_parser(
        "credentials", help="create the development CA, certificates and tokens in var/credentials (once)"
    )
    credentials.add_argument("--force", action="store_true", help="make everything anew (new CA, keys and tokens)")
    credentials.set_defaults(func=cmd_credentials)

    triton = commands.add_parser("triton", help="run only the embedded Triton with every model in triton_models/")
    triton.set_defaults(func=cmd_triton)

    infer_parser = commands.add_parser("infer", help="send one file to the gateway and print the answer")
    infer.add_arguments(infer_parser)
    infer_parser.set_defaults(func=cmd_infer)

    from clients import batch

    batch_parser = commands.add_parser(
        "batch", help="run folders of DICOM/PNG/JPEG through the gateway: resumable, JSON/NPZ/PNG and a summary"
    )
    batch.add_arguments(batch_parser)
    batch_parser.set_defaults(func=cmd_batch)

    from clients import impression

    impression_parser = commands.add_parser(
        "impression", help="report findings to impression: one text, or --file reports.jsonl through the stream"
    )
    impression.add_arguments(impression_parser)
    impression_parser.set_defaults(func=cmd_impression)

    from clients import reviewer

    reviewer_parser = commands.add_parser("reviewer", help="review cases as they arrive (interactive or --auto)")
    reviewer.add_arguments(reviewer_parser)
    reviewer_parser.set_defaults(func=cmd_reviewer)

    review = commands.add_parser(
        "review", help="human loops: list, describe, stop, delete, flows, export-manifest, simulate"
    )
    review.add_argument("--target", help="review service host:port (default 127.0.0.1:50052)")
    from clients import connect

    connect.add_arguments(review)  # the admin token by default
    review_commands = review.add_subparsers(dest="review_command", required=True)
    review_commands.add_parser("serve", help="run only the review service (MEDGATE_REVIEW_* settings)")
    review_commands.add_parser("flows", help="list the flow definitions")
    listing = review_commands.add_parser("list", help="list human loops, newest first")
    listing.add_argument("--flow")
    listing.add_argument("--max-results", type=int, default=100)
    for verb in ("describe", "stop", "delete"):
        review_commands.add_parser(verb, help=f"{verb} a human loop").add_argument("name")
    export = review_commands.add_parser("export-manifest", help="SageMaker augmented manifest of reviewed cases")
    export.add_argument("--flow", required=True)
    export.add_argument("--out", type=Path, required=True)
    export.add_argument("--source-prefix", default="", help="prefix for source-ref, e.g. s3://bucket/images/")
    from clients import review_simulate

    simulate = review_commands.add_parser(
        "simulate",
        help="a folder through the gateway: share a flow sends to review, share of wrong answers caught",
        description=review_simulate.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    review_simulate.add_arguments(simulate)
    review.set_defaults(func=cmd_review)

    from training import train_from_review

    train = commands.add_parser(
        "train", help="fine-tune a role on reviewed cases (an exported manifest); land it as the next version"
    )
    train_from_review.add_arguments(train)
    train.set_defaults(func=cmd_train)

    from clients import models

    models_parser = commands.add_parser(
        "models", help="model versions: list, promote (on evidence), rollback, shadow-report, init-repository"
    )
    models.add_arguments(models_parser)
    models_parser.set_defaults(func=cmd_models)

    from clients import audit

    audit_parser = commands.add_parser(
        "audit", help="the audit trail: verify its hash chain (against the syslog mirror too), rotate its HMAC key"
    )
    audit.add_arguments(audit_parser)
    audit_parser.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clients.connect import ConnectError
    from services.dicom.node import NodeStartError
    from services.settings import SettingsError
    from services.triton.client import ContractError, TritonUnavailable
    from services.triton.embedded import TritonStartError

    try:
        _configure_logging(args.verbose)  # the first to read the settings
        return int(args.func(args))
    except SettingsError as exc:
        # Unknown setting names or unusable values: every one on one line, like a usage error.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConnectError as exc:
        # TLS material or a token named on the command line that cannot be read.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TritonStartError, ContractError, TritonUnavailable, NodeStartError) as exc:
        # Start-up problems a user fixes by configuration: say which, without a traceback.
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

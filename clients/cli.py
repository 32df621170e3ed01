"""The one command-line tool: ``medgate serve``, ``medgate infer`` and friends."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence

from services.settings import load_settings


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


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


def cmd_serve(args: argparse.Namespace) -> int:
    """The whole stack: Triton (embedded unless MEDGATE_TRITON_URL is set) and the gateway workers."""
    import dataclasses

    from services.gateway.server import run_gateway
    from services.triton.embedded import triton_for

    settings = load_settings()
    overrides = {k: v for k, v in {"port": args.port, "workers": args.workers, "host": args.host}.items() if v}
    if overrides:
        settings = dataclasses.replace(settings, gateway=dataclasses.replace(settings.gateway, **overrides))
    with triton_for(settings.triton) as url:
        run_gateway(settings, url)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from clients import infer

    settings = load_settings()
    target = args.target or f"{settings.gateway.host}:{settings.gateway.port}"
    return infer.run(args, target)


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

    triton = commands.add_parser("triton", help="run only the embedded Triton with every model in triton_models/")
    triton.set_defaults(func=cmd_triton)

    infer_parser = commands.add_parser("infer", help="send one file to the gateway and print the answer")
    infer.add_arguments(infer_parser)
    infer_parser.set_defaults(func=cmd_infer)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

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
    from services.triton.embedded import triton_for  # noqa: PLC0415

    settings = load_settings()
    with triton_for(settings.triton) as url:
        logging.getLogger("medgate").info("Triton ready at %s with every model READY; Ctrl-C stops it", url)
        _wait_for_signal()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medgate", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True)
    triton = commands.add_parser("triton", help="run the embedded Triton with every model in triton_models/")
    triton.set_defaults(func=cmd_triton)
    serve = commands.add_parser("serve", help="run the whole stack: embedded Triton (or MEDGATE_TRITON_URL) and the gateway")
    serve.set_defaults(func=cmd_triton)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _configure_logging(args.verbose)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())

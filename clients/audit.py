"""``medgate audit verify [PATH]``: check the audit trail's hash chain, a file or a folder of day files.

Exit 0: every record verified (the count is printed). Exit 1: a file's chain is broken; the line number
and what is wrong (edited, deleted, out of order, torn) are printed, never a record's content. Exit 2:
nothing to verify, or the files cannot be checked as asked (keyed records without the key, another key).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="audit_command", required=True)
    verify = commands.add_parser("verify", help="check the hash chain of an audit file or folder")
    verify.add_argument(
        "path", nargs="?", type=Path, help="an audit-*.jsonl file or a folder (default security.audit_dir)"
    )
    verify.add_argument(
        "--key-file", type=Path, help="HMAC key of a keyed trail (default security.audit_hmac_key_file)"
    )


def run(args: argparse.Namespace) -> int:
    from services.audit.chain import AuditKeyError, CannotVerify, audit_files, load_key, verify_file
    from services.settings import load_settings

    security = load_settings().security
    path: Path = args.path or security.audit_dir
    key_file = args.key_file or (Path(security.audit_hmac_key_file) if security.audit_hmac_key_file else None)
    try:
        key = load_key(key_file) if key_file else None
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = audit_files(path) if path.exists() else []
    if not files:
        print(f"error: no audit files at {path}", file=sys.stderr)
        return 2
    records, broken = 0, 0
    for file in files:
        try:
            report = verify_file(file, key)
        except CannotVerify as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except OSError as exc:
            print(f"error: {file} cannot be read ({type(exc).__name__})", file=sys.stderr)
            return 2
        print(report.summary())
        records += report.records
        broken += not report.ok
    if broken:
        print(f"BROKEN: {broken} of {len(files)} file(s); {records} records verified before the breaks")
        return 1
    print(f"OK: {records} records in {len(files)} file(s), every chain intact")
    return 0

"""``medgate audit verify [PATH] [--mirror FILE]``: check the audit trail's hash chain (and against the syslog mirror);
``medgate audit rotate-key NEW``: announce the next HMAC key.

verify: exit 0 when every chain is intact (and, with ``--mirror``, every mirrored record is in its file unchanged;
local records the mirror lacks are warnings: UDP is best effort). Exit 1: a chain is broken, or the mirror shows
records cut off, deleted, edited, or a day file removed. Exit 2: nothing to verify, or it cannot be checked as asked
(keyed records without their key, a mirror file without audit records). Only file names, line and sequence numbers
and hashes are printed, never a record's content. Each run is itself audited (Audit Log Used, with the outcome) in
``security.audit_dir``; where that cannot be written, stderr says so and the check still runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.audit.chain import Keyring
    from services.audit.events import AuditFile
    from services.settings import SecuritySettings

OK, BROKEN, CANNOT = 0, 1, 2
_STATUS = {OK: "OK", BROKEN: "DATA_LOSS", CANNOT: "FAILED_PRECONDITION"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="audit_command", required=True)
    verify = commands.add_parser("verify", help="check the hash chain of an audit file or folder (and its mirror)")
    verify.add_argument(
        "path", nargs="?", type=Path, help="an audit-*.jsonl file or a folder (default security.audit_dir)"
    )
    verify.add_argument(
        "--key-file",
        type=Path,
        action="append",
        help="HMAC key of a keyed trail (default security.audit_hmac_key_file); repeat it for the keys of a rotation",
    )
    verify.add_argument(
        "--mirror",
        type=Path,
        help="the syslog collector's file (one RFC 5424 message a line): records cut off, deleted or edited locally",
    )
    rotate = commands.add_parser(
        "rotate-key", help="announce the next HMAC key in the trail, under the key in force (its id only)"
    )
    rotate.add_argument("new_key_file", type=Path, help="the next key (at least 32 bytes, mode 0600)")
    rotate.add_argument("--key-file", type=Path, help="the key in force (default security.audit_hmac_key_file)")


def run(args: argparse.Namespace) -> int:
    from services.settings import load_settings

    security = load_settings().security
    if args.audit_command == "rotate-key":
        return rotate_key(security, args.new_key_file, args.key_file)
    files: list[AuditFile] = []
    code = verify(security, args.path or security.audit_dir, args.key_file, args.mirror, files)
    _audit_verify(security, code, files, mirror=args.mirror is not None)
    return code


def verify(
    security: SecuritySettings, path: Path, key_files: list[Path] | None, mirror: Path | None, out: list[AuditFile]
) -> int:
    """Check ``path`` (and ``mirror``); ``out`` gets what was found in each day file, for the audit event."""
    from services.audit.chain import AuditKeyError, CannotVerify, Keyring, audit_files, load_key, verify_file
    from services.audit.events import AuditFile, is_audit_file

    if not key_files and security.audit_hmac_key_file:
        key_files = [Path(security.audit_hmac_key_file)]
    try:
        keys = Keyring([load_key(file) for file in key_files or ()])
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CANNOT
    files = audit_files(path) if path.exists() else []
    if not files:
        print(f"error: no audit files at {path}", file=sys.stderr)
        return CANNOT
    found: dict[str, tuple[str, int]] = {}
    records, broken = 0, 0
    for file in files:
        try:
            report = verify_file(file, keys)
        except CannotVerify as exc:
            print(f"error: {exc}", file=sys.stderr)
            found.update((f.name, ("not-verified", 0)) for f in files if f.name not in found)
            out.extend(AuditFile(n, r, c) for n, (r, c) in found.items() if is_audit_file(n))
            return CANNOT
        except OSError as exc:
            print(f"error: {file} cannot be read ({type(exc).__name__})", file=sys.stderr)
            return CANNOT
        print(report.summary())
        found[file.name] = ("intact" if report.ok else "broken", report.records)
        records += report.records
        broken += not report.ok
    tampering = 0
    if mirror is not None:
        outcome = _compare(files, mirror, keys, whole_trail=path.is_dir())
        if outcome is None:
            out.extend(AuditFile(n, r, c) for n, (r, c) in found.items() if is_audit_file(n))
            return CANNOT
        tampering, missing, changed = outcome
        for day in missing:
            found[day] = ("missing", 0)
        for day in changed:
            found[day] = ("broken", found.get(day, ("", 0))[1])
    out.extend(AuditFile(name, result, count) for name, (result, count) in found.items() if is_audit_file(name))
    if broken or tampering:
        what = [
            f"{broken} of {len(files)} file(s)" if broken else "",
            f"{tampering} mirror finding(s)" if tampering else "",
        ]
        print(f"BROKEN: {'; '.join(w for w in what if w)}; {records} records verified before the breaks")
        return BROKEN
    print(f"OK: {records} records in {len(files)} file(s), every chain intact")
    return OK


def _compare(
    files: list[Path], mirror: Path, keys: Keyring, *, whole_trail: bool
) -> tuple[int, list[str], set[str]] | None:
    """Print what the mirror shows; (tampering found, days only the mirror has, days it shows changed), or None when
    the mirror cannot be used."""
    from services.audit.mirror import compare, read_mirror

    try:
        held = read_mirror(mirror, keys)
    except OSError as exc:
        print(f"error: mirror {mirror} cannot be read ({type(exc).__name__})", file=sys.stderr)
        return None
    total = sum(len(day) for day in held.records.values())
    set_aside = [
        f"{len(held.malformed)} not a whole chained record (line {', '.join(map(str, held.malformed[:5]))}"
        f"{', ...' if len(held.malformed) > 5 else ''})"
        if held.malformed
        else "",
        f"{len(held.forged)} not matching their own hash (line {', '.join(map(str, held.forged[:5]))}"
        f"{', ...' if len(held.forged) > 5 else ''}): forged or damaged in transit"
        if held.forged
        else "",
        *(f"{n} keyed with key {kid}, not given" for kid, n in held.unknown_key.items()),
    ]
    set_aside = [s for s in set_aside if s]
    if not total:
        print(f"error: no usable MEDGATE-AUDIT record in {mirror} (is it the collector's file?)", file=sys.stderr)
        for note in set_aside:
            print(f"warning: mirror: {note}")
        return None
    result = compare(files, held, keys, whole_trail=whole_trail)
    print(f"mirror {mirror.name}: {total} audit record(s), {result.compared} found unchanged in their day file")
    for note in set_aside:
        print(f"warning: mirror: {note}: set aside")
    for line in result.tampering:
        print(f"TAMPERED: {line}")
    for line in result.gaps:
        print(f"warning: {line} (UDP is best effort, or the collector was down: not tampering)")
    for line in result.notes:
        print(f"note: {line}")
    return len(result.tampering), result.missing_days, result.changed_days


def _audit_verify(security: SecuritySettings, code: int, files: list[AuditFile], *, mirror: bool) -> None:
    """Audit Log Used, with the check's outcome; where the trail cannot be written, say so on stderr."""
    from services.audit.events import audit_log_used
    from services.audit.export import os_user
    from services.audit.log import AuditLog, AuditWriteError

    try:
        audit = AuditLog.from_settings(security, application="medgate-cli")
    except (AuditWriteError, ValueError) as exc:
        print(f"note: this check is not in the audit trail: {exc}", file=sys.stderr)
        return
    try:
        event = audit_log_used(
            audit.application, os_user=os_user(), files=tuple(files), mirror=mirror, status=_STATUS[code]
        )
        audit.write(event)
    except OSError as exc:  # AuditWriteError included
        print(
            f"note: this check is not in the audit trail: {security.audit_dir} cannot be written "
            f"({type(exc).__name__})",
            file=sys.stderr,
        )
    finally:
        audit.close()


def rotate_key(security: SecuritySettings, new_key_file: Path, key_file: Path | None) -> int:
    """Write, under the key in force, the record that announces ``new_key_file``'s id; say what to do next."""
    from services.audit.chain import AuditKeyError, Digest, load_key
    from services.audit.events import audit_key_rotated
    from services.audit.export import os_user
    from services.audit.log import AuditLog, AuditWriteError, day_file

    key_file = key_file or (Path(security.audit_hmac_key_file) if security.audit_hmac_key_file else None)
    if key_file is None:
        print(
            "error: no key in force to rotate from (security.audit_hmac_key_file is not set; a first key needs no "
            "rotation: set it and restart)",
            file=sys.stderr,
        )
        return CANNOT
    try:
        current, successor = Digest(load_key(key_file)), Digest(load_key(new_key_file))
    except AuditKeyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return CANNOT
    if current.kid == successor.kid:
        print(f"error: {new_key_file} holds the key in force (key {current.kid})", file=sys.stderr)
        return CANNOT
    audit = AuditLog(security.audit_dir, application="medgate-cli", syslog=security.audit_syslog, key=current.key)
    try:
        event = audit_key_rotated(audit.application, os_user=os_user(), current=current.kid, successor=successor.kid)
        audit.write(event)
    except AuditWriteError as exc:
        print(f"error: the rotation was not announced: {exc}", file=sys.stderr)
        return BROKEN
    finally:
        audit.close()
    print(f"key {current.kid} hands over to key {successor.kid}: announced in {security.audit_dir / day_file(event)}")
    print(
        f"next: set security.audit_hmac_key_file to {new_key_file}, then stop every medgate server and start them "
        "again (a record under the old key after the new key's first is reported as a break); verify older days "
        f"with --key-file {key_file} --key-file {new_key_file}"
    )
    return OK

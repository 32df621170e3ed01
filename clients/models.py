"""``medgate models``: list a role's versions, promote a candidate on evidence, roll back, read the shadow report.

Promotion switches the version every gateway worker names in its Triton calls by rewriting the versions file
(``versions.file``), which the workers re-read within ``versions.reload_interval_s``: no restart. It is refused,
with the reason, unless the candidate's ``evaluation.json`` (written by ``medgate train``) is the role's, compares
it with the version serving now and it is not worse on either held-out set (the role's metric, :data:`ROLE_METRIC`:
AP50 for the detector, accuracy for the classifier, mean Dice for the text segmenter, at most
``versions.promote_tolerance`` below), and Triton has the version loaded. Rollback goes back to the version that
served before, with no evidence needed (it served already), as long as Triton still has it loaded.

Every promote and rollback, done or refused, writes an audit event (Security Alert / Software Configuration:
the OS user, the role, the model and the versions; nothing else) to ``security.audit_dir``; a trail that cannot be
written stops the command before the versions file changes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.audit.log import AuditWriteError
from services.gateway.versions import RoleVersions, read_versions, write_versions
from services.settings import Settings, load_settings
from training import model_repository as repo

# The metric a role's evaluation.json compares on its two held-out sets (training/retrain_<role>.py writes it).
ROLE_METRIC = {"detector": "ap50", "classifier": "accuracy", "segmenter_text": "dice"}


def metrics(role: str) -> tuple[str, str]:
    metric = ROLE_METRIC[role]
    return f"reviewed_heldout_{metric}", f"phantom_heldout_{metric}"


@dataclass
class Verdict:
    ok: bool
    reasons: list[str] = field(default_factory=list)
    evidence: dict[str, Any] = field(default_factory=dict)


def judge(report: dict[str, Any] | None, serving: str, tolerance: float) -> Verdict:
    """Whether a candidate's evaluation report lets it replace ``serving``; every reason when it does not."""
    if report is None:
        return Verdict(False, ["it has no evaluation.json (medgate train writes one)"])
    role = str(report.get("role", "detector"))
    if role not in ROLE_METRIC:
        return Verdict(False, [f"its evaluation is for role {role!r}, which has no promotion rule"])
    parent = str(report.get("parent_version", ""))
    if parent != serving:
        return Verdict(
            False,
            [f"its evaluation compares it with version {parent or '?'}, but version {serving} is serving"],
        )
    evaluation = report.get("evaluation", {})
    verdict = Verdict(True)
    for metric in metrics(role):
        before = float(evaluation.get("parent", {}).get(metric, math.nan))
        after = float(evaluation.get("candidate", {}).get(metric, math.nan))
        verdict.evidence[metric] = {"serving": before, "candidate": after}
        if not (math.isfinite(before) and math.isfinite(after)):
            verdict.ok = False
            verdict.reasons.append(f"{metric} is missing from its evaluation")
        elif after < before - tolerance:
            verdict.ok = False
            verdict.reasons.append(
                f"{metric} {after:.4f} is worse than the serving version's {before:.4f} (tolerance {tolerance})"
            )
    return verdict


def _loaded(settings: Settings, model: str, version: str) -> str:
    """'' when Triton has ``version`` of ``model`` READY, else why not."""
    import tritonclient.grpc as triton_grpc

    url = settings.triton.grpc_url
    try:
        client = triton_grpc.InferenceServerClient(url)
        try:
            ready = client.is_model_ready(model, version, client_timeout=settings.triton.ready_timeout_s)
        finally:
            client.close()
    except Exception as exc:
        return f"Triton at {url} cannot be asked whether version {version} is loaded ({type(exc).__name__})"
    if not ready:
        return (
            f"Triton at {url} has not loaded version {version} of {model}"
            " (a landed version loads without a restart when triton.repository_poll_s > 0)"
        )
    return ""


def _context(settings: Settings, role: str) -> tuple[str, Path, dict[str, RoleVersions], RoleVersions]:
    model = getattr(settings.models, role, "")
    if not model:
        raise SystemExit(f"error: no model plays role {role!r} (settings.models.{role})")
    state = read_versions(settings.versions.file)
    return model, settings.triton.model_repository, state, state.setdefault(role, RoleVersions())


def promote(settings: Settings, role: str, version: str, *, check_loaded: bool = True) -> Verdict:
    model, repository, state, entry = _context(settings, role)
    pinned = settings.versions.pins().get(role)
    if pinned:
        return Verdict(False, [f"settings pin {role} to version {pinned} (versions.{role}); unpin it first"])
    if not entry.serving:
        return Verdict(False, [f"no serving version of {role} is recorded in {settings.versions.file}"])
    if version == entry.serving:
        return Verdict(False, [f"version {version} is serving already"])
    if not (repository / model / version).is_dir():
        return Verdict(False, [f"version {version} of {model} is not in {repository}"])
    latest = repo.latest_policy(repository, model)
    if int(version) not in repo.served_versions(repository, model, latest):
        return Verdict(False, [f"version {version} is not among the {latest} latest that Triton serves"])
    report = repo.read_report(repository, model, version)
    if report is not None and report.get("role", "detector") != role:
        return Verdict(False, [f"its evaluation.json is for role {report.get('role')!r}, not {role}"])
    verdict = judge(report, entry.serving, settings.versions.promote_tolerance)
    if verdict.ok and check_loaded:
        why = _loaded(settings, model, version)
        if why:
            verdict.ok, verdict.reasons = False, [why]
    if verdict.ok:
        entry.history.append(entry.serving)
        entry.serving = version
        if entry.candidate == version:
            entry.candidate = ""
        write_versions(settings.versions.file, state)
    return verdict


def rollback(settings: Settings, role: str, *, check_loaded: bool = True) -> Verdict:
    model, _, state, entry = _context(settings, role)
    if settings.versions.pins().get(role):
        return Verdict(False, [f"settings pin {role} (versions.{role}); unpin it first"])
    if not entry.history:
        return Verdict(False, [f"no earlier version of {role} is recorded in {settings.versions.file}"])
    previous = entry.history[-1]
    if check_loaded:
        why = _loaded(settings, model, previous)
        if why:
            return Verdict(False, [why])
    entry.history.pop()
    entry.serving = previous
    write_versions(settings.versions.file, state)
    return Verdict(True, evidence={"serving": previous})


def listing(settings: Settings, role: str) -> dict[str, Any]:
    model, repository, _, entry = _context(settings, role)
    latest = repo.latest_policy(repository, model)
    served = repo.served_versions(repository, model, latest)
    rows = []
    for number in repo.versions(repository, model):
        report = repo.read_report(repository, model, str(number)) or {}
        rows.append(
            {
                "version": str(number),
                "loaded_by_policy": number in served,
                "parent": report.get("parent_version"),
                "evaluation": {k: report.get("evaluation", {}).get(k) for k in ("parent", "candidate")}
                if report
                else None,
            }
        )
    pinned = settings.versions.pins().get(role, "")
    return {
        "role": role,
        "model": model,
        "repository": str(repository),
        "serving": pinned or entry.serving,
        "pinned_by_settings": bool(pinned),
        "candidate": entry.candidate,
        "history": entry.history,
        "versions": rows,
    }


def _audited_switch(settings: Settings, args: argparse.Namespace) -> Verdict:
    """Promote or roll back, with its audit event (done: OK; refused: FAILED_PRECONDITION). The trail is opened
    first: a switch that cannot be audited does not happen (AuditWriteError)."""
    from services.audit.events import model_version_event
    from services.audit.export import os_user
    from services.audit.log import AuditLog

    model, _, _, entry = _context(settings, args.role)
    before = settings.versions.pins().get(args.role) or entry.serving
    audit = AuditLog.from_settings(settings.security, application="medgate-cli")
    try:
        audit.check()
        if args.models_command == "promote":
            verdict = promote(settings, args.role, args.version, check_loaded=not args.no_triton_check)
            wanted = args.version
        else:
            verdict = rollback(settings, args.role, check_loaded=not args.no_triton_check)
            wanted = str(verdict.evidence.get("serving", "")) or (entry.history[-1] if entry.history else "")
        event = model_version_event(
            audit.application,
            os_user=os_user(),
            command=args.models_command,
            role=args.role,
            model=model,
            to_version=wanted if wanted.isdigit() else "",
            from_version=before,
            status="OK" if verdict.ok else "FAILED_PRECONDITION",
        )
        audit.write(event)
    finally:
        audit.close()
    return verdict


def run(args: argparse.Namespace) -> int:
    settings = load_settings()
    if args.models_command == "init-repository":
        made = repo.init_repository(args.path, Path(__file__).resolve().parents[1] / "triton_models")
        print(f"{args.path}: {', '.join(made)} (set triton.model_repository to it)")
        return 0
    if args.models_command == "list":
        print(json.dumps(listing(settings, args.role), indent=2))
        return 0
    if args.models_command == "shadow-report":
        from services.gateway.shadow import summarize

        print(json.dumps(summarize(settings.versions.shadow_report_file, args.role), indent=2))
        return 0
    try:
        verdict = _audited_switch(settings, args)
    except AuditWriteError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 1
    if args.models_command == "promote":
        done = f"{args.role}: version {args.version} serves now"
    else:
        done = f"{args.role}: back to version {verdict.evidence.get('serving', '?')}"
    for metric, values in verdict.evidence.items():
        if isinstance(values, dict):
            print(f"  {metric}: serving {values['serving']:.4f}, candidate {values['candidate']:.4f}")
    if not verdict.ok:
        print(f"refused: {'; '.join(verdict.reasons)}", file=sys.stderr)
        return 1
    print(f"{done} (gateways follow within {settings.versions.reload_interval_s:g} s, no restart)")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="models_command", required=True)
    listing_parser = commands.add_parser("list", help="a role's versions, which serves, candidate, evaluations")
    listing_parser.add_argument("role")
    promote_parser = commands.add_parser("promote", help="serve a candidate version if its evaluation is not worse")
    promote_parser.add_argument("role")
    promote_parser.add_argument("version")
    rollback_parser = commands.add_parser("rollback", help="serve the version that served before")
    rollback_parser.add_argument("role")
    for sub in (promote_parser, rollback_parser):
        sub.add_argument(
            "--no-triton-check", action="store_true", help="do not ask Triton whether the version is loaded"
        )
    shadow_parser = commands.add_parser("shadow-report", help="agreement of the shadowed candidate, from the report")
    shadow_parser.add_argument("role")
    init = commands.add_parser(
        "init-repository", help="a model repository outside the source tree, linking the shipped models"
    )
    init.add_argument("path", type=Path)

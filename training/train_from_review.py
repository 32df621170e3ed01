"""``medgate train --role detector|classifier|segmenter_text``: fine-tune a role's model on reviewed cases.

The serving model, fine-tuned, lands as the next version.

Seed 003's loop, closed: the review service's augmented manifest (``medgate review export-manifest``: one JSON
line per reviewed case, with the image the review store kept written beside it and the reviewer's answer: boxes
for a detection flow, the chosen class for a classification flow) is read here, never the review store's
database. Cases are split by a hash of their loop name into training and held-out (``--heldout-fraction``): a
case's side never changes as more cases arrive, so held-out cases are never trained on, now or in a later round.

What each role trains and measures: :mod:`training.retrain_detector` (AP50), :mod:`training.retrain_classifier`
(accuracy) and :mod:`training.retrain_segmenter` (mean Dice; a segmentation flow's export); what they share
(manifest, split, phantom sets, the fine-tuning loop with replay): :mod:`training.retrain_shared`. The new ONNX and
checkpoint land as the next numeric version of the Triton model (:mod:`training.model_repository`) with
``evaluation.json``: the metric of the serving (parent) version and of the new one, on the reviewed held-out cases
and on the standard phantom held-out set (the first ``--phantom-heldout`` phantoms of ``training.common``'s held-out
seed). The new version's ``calibration.json`` is refitted for it on the calibration seed split
(``--calibration-phantoms``, as ``training.fit_calibration`` fits the shipped one); with ``--calibration-phantoms
0`` the parent's is copied and the report says so (``calibration.refitted: false``). The versions file records the
new version as the role's candidate (and the parent as serving, if nothing was recorded), so the gateway shadows it;
``medgate models promote`` reads the report.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from training import retrain_classifier, retrain_detector, retrain_segmenter
from training.retrain_detector import ReviewedCase, ap50, read_manifest
from training.retrain_shared import ManifestError, Trained, is_heldout, phantom_set

__all__ = ["ManifestError", "ReviewedCase", "ap50", "is_heldout", "main", "phantom_set", "read_manifest", "run"]

ROLES = {"detector": retrain_detector, "classifier": retrain_classifier, "segmenter_text": retrain_segmenter}
_phantom_set = phantom_set  # the name tests/test_retrain_loop.py imports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="medgate train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--role", choices=sorted(ROLES), default="detector", help="the role to retrain")
    parser.add_argument(
        "--manifest", type=Path, required=True, help="output.manifest written by medgate review export-manifest"
    )
    parser.add_argument("--repository", type=Path, help="Triton model repository (default: triton.model_repository)")
    parser.add_argument("--parent", help="version to fine-tune (default: the serving one)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, help="peak learning rate (default: the role's, 2e-3)")
    parser.add_argument(
        "--freeze",
        help="parts kept at the serving weights, comma-separated (encoder, decoder, neck, head; empty: train all;"
        " default: the detector's encoder,decoder, the classifier's and the segmenter's encoder)",
    )
    parser.add_argument(
        "--reviewed-share",
        type=float,
        help="share of each batch that is reviewed cases, the rest replayed phantoms (default: the role's)",
    )
    parser.add_argument("--seed", type=int, default=17)
    parser.add_argument("--replay", type=int, default=200, help="standard training phantoms mixed into each batch")
    parser.add_argument("--heldout-fraction", type=float, default=0.3)
    parser.add_argument("--phantom-heldout", type=int, default=200, help="standard held-out phantoms evaluated")
    parser.add_argument(
        "--calibration-phantoms",
        type=int,
        default=200,
        help="calibration-split phantoms the new version's calibration.json is fitted on (0: copy the parent's)",
    )


def report_of(args: argparse.Namespace, parent: str, trained: Trained, calibration: dict[str, Any]) -> dict[str, Any]:
    """The new version's evaluation.json (``medgate models promote`` reads ``parent_version`` and ``evaluation``)."""
    from training import common

    return {
        "role": args.role,
        "model": args.model,
        "parent_version": parent,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "training": {
            "manifest_sha256": hashlib.sha256(args.manifest.read_bytes()).hexdigest(),
            "reviewed_train_cases": trained.reviewed_train,
            "reviewed_heldout_cases": trained.reviewed_heldout,
            "heldout_fraction": args.heldout_fraction,
            "replay_phantoms": args.replay,
            "steps": args.steps,
            "batch": args.batch,
            "lr": args.lr,
            "frozen": list(trained.frozen),
            "reviewed_share": args.reviewed_share,
            "seed": args.seed,
            "seconds": round(trained.seconds, 1),
            "started_from": trained.started_from,
        },
        "evaluation": {**trained.evaluation, "phantom_heldout_seed": common.HELDOUT_SEED},
        "calibration": calibration,
        "onnx_sha256": hashlib.sha256(trained.files["model.onnx"].read_bytes()).hexdigest(),
    }


def run(args: argparse.Namespace) -> int:
    from services.gateway.versions import RoleVersions, read_versions, write_versions
    from services.settings import load_settings
    from training import common
    from training import model_repository as repo
    from training.retrain_shared import refit_calibration

    role = ROLES[args.role]
    args.lr = role.DEFAULT_LR if args.lr is None else args.lr
    args.freeze = role.DEFAULT_FREEZE if args.freeze is None else args.freeze
    args.reviewed_share = role.DEFAULT_SHARE if args.reviewed_share is None else args.reviewed_share
    settings = load_settings()
    repository: Path = args.repository or settings.triton.model_repository
    args.model = getattr(settings.models, args.role)
    if not args.model:
        print(f"error: settings.models.{args.role} is empty: no model plays that role", file=sys.stderr)
        return 2
    state = read_versions(settings.versions.file)
    entry = state.get(args.role, RoleVersions())
    available = repo.versions(repository, args.model)
    if not available:
        print(f"error: {repository / args.model} has no version folders", file=sys.stderr)
        return 2
    pinned = settings.versions.pins().get(args.role, "")
    parent = args.parent or pinned or entry.serving or str(available[-1])
    if not (repository / args.model / parent).is_dir():
        print(f"error: version {parent} of {args.model} is not in {repository}", file=sys.stderr)
        return 2
    serving = pinned or entry.serving or parent
    if repo.unloads(repository, args.model, serving):
        print(
            f"error: another version of {args.model} would make Triton unload version {serving}, which serves"
            f" (its version_policy keeps the latest {repo.latest_policy(repository, args.model)}): promote or"
            " remove the candidate first",
            file=sys.stderr,
        )
        return 2
    scratch = common.REPO / ".cache" / "train-from-review"
    scratch.mkdir(parents=True, exist_ok=True)
    parent_dir = repository / args.model / parent
    with tempfile.TemporaryDirectory(prefix="work-", dir=scratch) as folder:
        work = Path(folder)
        try:
            trained = role.train(args, parent_dir, work)
        except ManifestError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        files = dict(trained.files)
        if args.calibration_phantoms > 0:
            calibration = refit_calibration(args.role, files["model.onnx"], work, args.calibration_phantoms)
            files["calibration.json"] = work / "calibration.json"
        else:
            calibration = {"refitted": False, "copied_from_version": parent, "note": "fitted for another version"}
        report = report_of(args, parent, trained, calibration)
        repo.ensure_base(repository, common.MODELS_DIR)
        version = repo.land_version(repository, args.model, parent, files, report)
    state = read_versions(settings.versions.file)  # again: someone may have promoted meanwhile
    entry = state.setdefault(args.role, RoleVersions())
    entry.serving = entry.serving or parent
    entry.candidate = version
    write_versions(settings.versions.file, state)
    ev = report["evaluation"]
    metric = role.METRIC
    where = f"{repository / args.model / version}"
    refitted = f"refitted on {args.calibration_phantoms} calibration-split phantoms"
    copied = f"copied from version {parent} (fitted for it, not for this version)"
    print(
        f"version {version} of {args.model} landed in {where} (candidate; serving stays {entry.serving})\n"
        f"  {metric} reviewed held-out ({ev['reviewed_heldout_cases']} cases):"
        f" {ev['parent'][f'reviewed_heldout_{metric}']} -> {ev['candidate'][f'reviewed_heldout_{metric}']}\n"
        f"  {metric} phantom held-out ({ev['phantom_heldout_phantoms']} phantoms):"
        f" {ev['parent'][f'phantom_heldout_{metric}']} -> {ev['candidate'][f'phantom_heldout_{metric}']}\n"
        f"  calibration: {refitted if calibration['refitted'] else copied}",
        flush=True,
    )
    return 0 if all(math.isfinite(v) for side in ("parent", "candidate") for v in ev[side].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

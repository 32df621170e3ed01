"""Build the ``impression`` model's index from the training split of the Indiana University reports.

    python -m training.build_impression [--out triton_models/impression/1] [--force]
    python -m training.build_impression --tune      # 5-fold cross-validation on the training split (minutes)

The reports come from the installed torchxrayvision wheel (CC BY-NC-ND 4.0): the index (``index.npz``,
``index.json``) is derived from them, so it is built here at set-up (a few seconds) and git-ignored.
Only the training split (file id not divisible by 5) is read into the index; the test split is for
``make eval-report`` alone. ``--tune`` picks the retrieval settings by 5-fold cross-validation inside the
training split (folds by file id), never looking at the test split; its winner is ``engine.Params``'s default.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import itertools
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from services.report.data import LICENCE, Report, find_archive, load_reports, split

MODEL_DIR = Path(__file__).resolve().parent.parent / "triton_models" / "impression" / "1"
FOLDS = 5


def load_engine(folder: Path = MODEL_DIR) -> ModuleType:
    """The model's own ``engine.py`` (the one Triton runs), imported by path."""
    name = "medgate_impression_engine"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "engine.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def rouge_tokenizer() -> Callable[[str], list[str]]:
    """rouge-score's own tokeniser with the Porter stemmer, so consensus agrees with the metric we report."""
    from rouge_score import tokenizers

    tokenizer = tokenizers.DefaultTokenizer(use_stemmer=True)
    return lambda text: list(tokenizer.tokenize(text))


def build_index(train: Sequence[Report], params: Any = None, *, info: dict[str, Any] | None = None) -> Any:
    """An ``ImpressionIndex`` over ``train`` (refuses test-split reports)."""
    engine = load_engine()
    leaked = [r.id for r in train if r.is_test]
    if leaked:
        raise ValueError(f"{len(leaked)} test-split reports passed to the index builder")
    return engine.ImpressionIndex.build(
        [r.findings for r in train],
        [r.impression for r in train],
        [r.id for r in train],
        params or engine.Params(),
        tokenize=rouge_tokenizer(),
        info=info,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build(out: Path) -> Path:
    """Write the index for the Triton model into ``out``; returns ``out``."""
    engine = load_engine()
    archive = find_archive()
    reports = load_reports(archive)
    train, test = split(reports)
    info = {
        "source": "torchxrayvision/data/NLMCXR_reports.tgz",
        "source_sha256": _sha256(archive),
        "licence": LICENCE,
        "split": "training: file id % 5 != 0",
        "training_reports": len(train),
        "test_reports_held_out": len(test),
    }
    started = time.perf_counter()
    index = build_index(train, info=info)
    index.save(out)
    print(
        f"impression index: {len(train)} training reports ({len(test)} test reports held out), "
        f"{len(index.vocabulary)} terms, {len(index.candidate_tokens)} distinct impressions, "
        f"{time.perf_counter() - started:.1f} s -> {out / engine.INDEX_ARRAYS}, {out / engine.INDEX_META}"
    )
    return out


def tune(grid_word: Sequence[float], grid_k: Sequence[int], grid_power: Sequence[float]) -> tuple[Any, float]:
    """5-fold cross-validation inside the training split; returns (best params, its mean ROUGE-L)."""
    from rouge_score import rouge_scorer

    engine = load_engine()
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    train, _test = split(load_reports())
    results: dict[tuple[float, int, float], list[float]] = {}
    for word_weight in grid_word:
        for fold in range(FOLDS):
            inside = [r for r in train if (r.id // 5) % FOLDS != fold]
            held = [r for r in train if (r.id // 5) % FOLDS == fold]
            index = build_index(inside, engine.Params(word_weight=word_weight))
            similarities = [index.similarities(r.findings) for r in held]
            for k, power in itertools.product(grid_k, grid_power):
                total = 0.0
                for report, sims in zip(held, similarities, strict=True):
                    chosen, _ = index.consensus(index.neighbours(sims, k), power)
                    total += scorer.score(report.impression, index.impressions[chosen])["rougeL"].fmeasure
                results.setdefault((word_weight, k, power), []).append(total / len(held))
    ranked = sorted(results.items(), key=lambda item: -sum(item[1]) / len(item[1]))
    for (word_weight, k, power), scores in ranked:
        print(f"word_weight={word_weight:.2f} k={k:3d} power={power:.1f}  ROUGE-L {sum(scores) / len(scores):.4f}")
    (word_weight, k, power), scores = ranked[0]
    return engine.Params(word_weight=word_weight, k=k, power=power), sum(scores) / len(scores)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=MODEL_DIR)
    parser.add_argument("--tune", action="store_true", help="cross-validate settings on the training split")
    args = parser.parse_args(argv)
    if args.tune:
        best, score = tune([0.5, 0.7], [10, 20, 30, 50], [2.0, 4.0, 6.0])
        print(f"best by {FOLDS}-fold cross-validation on the training split: {best} (ROUGE-L {score:.4f})")
        return 0
    build(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

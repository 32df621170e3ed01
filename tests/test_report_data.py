"""The IU reports from the installed wheel: pairs parsed, the fixed split, and limits on a findings text."""

from __future__ import annotations

import sys

import pytest

from services.report.data import Report, find_archive, load_reports, parse_report, split
from services.report.limits import FindingsTooLong, InvalidFindings, ReportLimits, check_findings, evidence_count

XML_FILES = 3955  # reports in NLMCXR_reports.tgz
PAIRS = 3419  # of them with both a FINDINGS and an IMPRESSION section
TRAIN, TEST = 2747, 672


@pytest.fixture(scope="module")
def reports() -> list[Report]:
    return load_reports()


def test_archive_is_found_in_the_wheel_without_importing_it() -> None:
    path = find_archive()
    assert path.is_file() and path.name == "NLMCXR_reports.tgz" and path.parent.parent.name == "torchxrayvision"
    assert "torchxrayvision" not in sys.modules  # its import would pull torchvision


def test_every_report_with_findings_and_impression_is_one_pair(reports: list[Report]) -> None:
    import tarfile

    with tarfile.open(find_archive()) as tar:
        assert sum(1 for m in tar if m.isfile() and m.name.endswith(".xml")) == XML_FILES
    assert len(reports) == PAIRS
    assert len({r.id for r in reports}) == PAIRS
    assert all(r.findings.strip() and r.impression.strip() for r in reports)
    assert all("  " not in r.findings and "\n" not in r.findings for r in reports)
    report_10 = next(r for r in reports if r.id == 10)
    assert report_10.findings.startswith("The cardiomediastinal silhouette is within normal limits")
    assert report_10.impression == "No acute cardiopulmonary process."


def test_split_is_fixed_by_file_id_and_disjoint(reports: list[Report]) -> None:
    train, test = split(reports)
    assert (len(train), len(test)) == (TRAIN, TEST)
    assert all(r.id % 5 == 0 for r in test) and all(r.id % 5 != 0 for r in train)
    assert {r.id for r in train}.isdisjoint({r.id for r in test})
    assert {r.id for r in train} | {r.id for r in test} == {r.id for r in reports}
    ids = {r.id: r.is_test for r in reports}
    assert ids[10] is True and ids[5] is True and ids[4] is False and ids[1] is False
    again_train, again_test = split(load_reports())
    assert [r.id for r in again_test] == [r.id for r in test] and [r.id for r in again_train] == [r.id for r in train]


def test_a_report_without_impression_or_findings_is_no_pair() -> None:
    def xml(sections: str) -> bytes:
        return f"<eCitation><Abstract>{sections}</Abstract></eCitation>".encode()

    both = xml('<AbstractText Label="FINDINGS">Clear\n  lungs.</AbstractText><AbstractText Label="IMPRESSION">Normal.'
               "</AbstractText>")
    assert parse_report(7, both) == Report(7, "Clear lungs.", "Normal.")
    assert parse_report(7, xml('<AbstractText Label="FINDINGS">Clear lungs.</AbstractText>')) is None
    empty_findings = '<AbstractText Label="FINDINGS"/><AbstractText Label="IMPRESSION">x</AbstractText>'
    assert parse_report(7, xml(empty_findings)) is None


def test_findings_limits_name_sizes_never_the_text() -> None:
    limits = ReportLimits(max_findings_chars=40)
    assert check_findings("  Lungs are clear.  ", limits) == "Lungs are clear."
    for empty in ("", "   \n\t"):
        with pytest.raises(InvalidFindings):
            check_findings(empty, limits)
    secret = "Patient Jane Roe has a nodule in the left apex."
    with pytest.raises(FindingsTooLong) as too_long:
        check_findings(secret, limits)
    assert f"{len(secret)} characters" in str(too_long.value) and "max_findings_chars (40)" in str(too_long.value)
    assert "Jane" not in str(too_long.value)
    assert evidence_count(0, limits) == limits.default_evidence and evidence_count(10, limits) == 10
    with pytest.raises(FindingsTooLong):
        evidence_count(11, limits)
    with pytest.raises(InvalidFindings):
        evidence_count(-1, limits)

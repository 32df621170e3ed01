"""What a findings text may be before it reaches the model; errors whose messages never quote the text."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


class InvalidFindings(ValueError):
    """The findings are missing or unusable (maps to INVALID_ARGUMENT)."""


class FindingsTooLong(ValueError):
    """The request exceeds a report limit (maps to RESOURCE_EXHAUSTED); names the setting to raise."""


@dataclass(frozen=True)
class ReportLimits:
    """Per-request limits of the Report service."""

    # The longest findings section in the IU collection is about 1,050 characters; 8,000 leaves room for
    # long real reports and refuses pasted documents.
    max_findings_chars: int = 8_000
    default_evidence: int = 3
    max_evidence: int = 10

    def __post_init__(self) -> None:
        for item in dataclasses.fields(ReportLimits):  # subclasses add fields of other types
            value = getattr(self, item.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"report.{item.name} must be a non-negative integer, got {value!r}")
        if self.default_evidence > self.max_evidence:
            raise ValueError("report.default_evidence must not exceed report.max_evidence")


def check_findings(findings: str, limits: ReportLimits) -> str:
    """The findings to send to the model, or InvalidFindings / FindingsTooLong (sizes only, never the text)."""
    if not findings or not findings.strip():
        raise InvalidFindings("findings is empty: send the FINDINGS section of the report as text")
    if "\x00" in findings:
        raise InvalidFindings("findings contains a NUL character")
    if len(findings) > limits.max_findings_chars:
        raise FindingsTooLong(
            f"findings has {len(findings)} characters, more than report.max_findings_chars "
            f"({limits.max_findings_chars})"
        )
    return findings.strip()


def evidence_count(requested: int, limits: ReportLimits) -> int:
    """How many evidence reports to return: 0 means the default; negative or above the maximum is refused."""
    if requested < 0:
        raise InvalidFindings(f"max_evidence must not be negative, got {requested}")
    if requested > limits.max_evidence:
        raise FindingsTooLong(f"max_evidence {requested} exceeds report.max_evidence ({limits.max_evidence})")
    return requested or limits.default_evidence

"""Errors any servicer may raise for a malformed request; the status table gives each its code.

Pure: no gRPC here, so domain modules can raise them too.
"""

from __future__ import annotations


class BadRequest(ValueError):
    """The request itself is malformed: a missing image, an empty prompt, an unknown enum value, a NaN.

    The message names the field and the problem, never the caller's free text (prompts, findings).
    """


class RequestTooLarge(ValueError):
    """The request asks for more than a configured limit allows (too many prompts or boxes)."""

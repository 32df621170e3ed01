"""Keys every store backend computes alike: canonical JSON and digests, ids, loop names, page tokens."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from typing import Any

from services.review.flows import MAX_NAME_CHARS, InvalidArgument
from services.review.store.model import MAX_ID_CHARS

IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def canonical(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{what} is not plain JSON: {exc}") from None


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def check_id(value: Any, what: str, *, max_chars: int = MAX_ID_CHARS) -> str:
    if not isinstance(value, str) or not value or len(value) > max_chars or not value.isprintable():
        raise InvalidArgument(f"{what} must be 1-{max_chars} printable characters")
    return value


def auto_loop_name(flow_name: str, input_hash: str) -> str:
    """A deterministic loop name per (flow, input), so re-running inference never opens a second loop."""
    suffix = hashlib.sha256(f"{flow_name}\0{input_hash}".encode()).hexdigest()[:24]
    prefix = flow_name[: MAX_NAME_CHARS - len(suffix) - 1].rstrip("-")
    return f"{prefix}-{suffix}"


def encode_token(created_at: float, seq: int, query_key: str) -> str:
    raw = json.dumps({"c": created_at, "s": seq, "q": query_key}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, query_key: str) -> tuple[float, int]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        created_at, seq, key = float(data["c"]), int(data["s"]), str(data["q"])
    except (ValueError, TypeError, KeyError):
        raise InvalidArgument("next_token is not a token this store issued") from None
    if key != query_key:
        raise InvalidArgument("next_token was issued for a different query (filters or sort order changed)")
    return created_at, seq

"""MedImageParse's scoring contract (seed 002): its request body in, one Segment request per item, its answer out.

Request: ``{"input_data": {"columns": ["image", "text"], "index": [0, ...], "data": [[<base64 image>,
"prompt & prompt"], ...]}}``; the order of ``columns`` says which string of each item is which, as in
pandas' split orientation that AzureML endpoints take. Answer: a list with one object per item, in the
order of ``data``: ``image_features`` is a JSON *string* ``{"data": <base64>, "shape": [N, 1024, 1024],
"dtype": "uint8"}`` (decoded with ``json.loads``, ``base64.b64decode``, ``np.frombuffer(...).reshape``)
and ``text_features`` one of MedImageParse's 16 categories per prompt. What medgate adds goes in
keys an old client ignores: ``scores``, ``transform``, ``models``, ``prompts``, ``image``.

Unlike MedImageParse an image need not be 1024x1024 (the gateway letterboxes it; ``transform`` maps
the masks back) and may be any input the gateway reads (DICOM, PNG, JPEG, ...). Errors name the item
and the place (``input_data.data[3][0]``), never the prompts. Pure: no gRPC, no HTTP.
"""

from __future__ import annotations

import binascii
import json
from dataclasses import dataclass
from typing import Any

import pybase64

from medgate.v1 import inference_pb2 as pb
from services.http.protojson import decode_base64, to_dict
from services.rpc.errors import BadRequest, RequestTooLarge

COLUMNS = ("image", "text")
PROMPT_SEPARATOR = "&"


@dataclass(frozen=True)
class ScoreItem:
    image: bytes
    prompts: str


def _where(index: int, column: int) -> str:
    return f"input_data.data[{index}][{column}]"


def parse_score_request(body: Any, *, max_items: int, max_masks: int) -> list[ScoreItem]:
    """The items of a MedImageParse request; BadRequest (400) or RequestTooLarge (413) naming the problem."""
    if not isinstance(body, dict) or not isinstance(body.get("input_data"), dict):
        raise BadRequest('the body must be an object with "input_data" (MedImageParse\'s request schema)')
    data_in = body["input_data"]
    unknown = set(data_in) - {"columns", "index", "data"}
    if unknown:
        raise BadRequest("input_data has an unknown key (it takes columns, index and data)")
    columns = data_in.get("columns")
    if not isinstance(columns, list) or sorted(c for c in columns if isinstance(c, str)) != sorted(COLUMNS):
        raise BadRequest('input_data.columns must be ["image", "text"] (each once, in the order of every data item)')
    if len(columns) != len(COLUMNS):
        raise BadRequest('input_data.columns must be ["image", "text"] (each once, in the order of every data item)')
    image_at, text_at = columns.index("image"), columns.index("text")
    rows = data_in.get("data")
    if not isinstance(rows, list) or not rows:
        raise BadRequest("input_data.data must be a non-empty list of [image, text] items")
    if len(rows) > max_items:
        raise RequestTooLarge(f"input_data.data has {len(rows)} items; at most {max_items} per request")
    index = data_in.get("index")
    if (
        not isinstance(index, list)
        or len(index) != len(rows)
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in index)
    ):
        raise BadRequest("input_data.index must be a list of integers, one per data item")
    items: list[ScoreItem] = []
    masks = 0
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(COLUMNS):
            raise BadRequest(f"input_data.data[{i}] must be a list of two strings, in the order of columns")
        image_text, prompts = row[image_at], row[text_at]
        if not isinstance(image_text, str) or not image_text:
            raise BadRequest(f"{_where(i, image_at)} must be the image's bytes in base64 (a non-empty string)")
        if not isinstance(prompts, str):
            raise BadRequest(f"{_where(i, text_at)} must be a string of prompts separated by '&'")
        try:
            image = decode_base64(image_text)
        except (binascii.Error, ValueError):
            raise BadRequest(f"{_where(i, image_at)} is not valid base64") from None
        if not image:
            raise BadRequest(f"{_where(i, image_at)} decodes to no bytes")
        masks += prompts.count(PROMPT_SEPARATOR) + 1
        items.append(ScoreItem(image=image, prompts=prompts))
    if masks > max_masks:
        raise RequestTooLarge(
            f"the request asks for {masks} masks (prompts over all items); at most {max_masks} per request"
        )
    return items


def segment_request(item: ScoreItem) -> pb.SegmentRequest:
    """The gateway request for one item: MedImageParse's masks are model-space, raw uint8."""
    return pb.SegmentRequest(image=pb.ImageInput(data=item.image), prompts=item.prompts)


def score_answer(response: pb.SegmentResponse) -> list[bytes]:
    """One item of MedImageParse's answer as pieces of JSON (``image_features`` a JSON string), extras beside it.

    Built by hand around the masks' base64, which needs no escaping: ``json.dumps`` would scan those
    megabytes twice (once inside ``image_features``, once more escaping its quotes), about 30 ms for
    three 1024x1024 masks here. The pieces are joined once, for the whole answer (each ``+`` on bytes
    would copy the megabytes again).
    """
    features = response.image_features
    data = pybase64.b64encode(features.data)
    head = json.dumps('{"data": "')[1:-1].encode()
    tail = json.dumps(f'", "shape": {json.dumps(list(features.shape))}, "dtype": {json.dumps(features.dtype)}}}')
    extras = {
        "text_features": list(response.text_features),
        "scores": [round(float(p.score), 6) for p in response.prompts],
        "prompts": [to_dict(p) for p in response.prompts],
        "transform": to_dict(response.transform),
        "models": [to_dict(m) for m in response.models],
        "image": to_dict(response.image),
    }
    rest = json.dumps(extras, separators=(",", ":"))
    return [b'{"image_features":"', head, data, tail[1:-1].encode(), b'",', rest[1:].encode()]


def score_answers(items: list[list[bytes]]) -> bytes:
    """The whole answer: a JSON list with one object per item, in the order of ``data``."""
    parts = [b"["]
    for index, item in enumerate(items):
        parts += [b"," if index else b"", *item]
    parts.append(b"]")
    return b"".join(parts)

"""The OpenAPI 3.1 document of the HTTP face, generated from the protobuf descriptors (and the .proto comments).

Each ``/v1`` route's body and answer are the JSON mapping of its gRPC messages, so their schemas are
walked from the descriptors: a field added to ``proto/`` appears here without an edit. Descriptions
come from the comments in ``proto/medgate/v1/inference.proto`` when the file is there (the generated
modules carry no comments). ``/score`` is MedImageParse's schema, written out. Pure: no gRPC.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

from medgate.v1 import inference_pb2 as pb
from services.http.routes import V1_ROUTES
from services.settings import PROJECT_ROOT

PROTO_FILE = PROJECT_ROOT / "proto" / "medgate" / "v1" / "inference.proto"
_PACKAGE = "medgate.v1."
_REF = "#/components/schemas/"

_INTEGERS = {
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_SINT32: "int32",
    FieldDescriptor.TYPE_SFIXED32: "int32",
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_FIXED32: "uint32",
}
_INTEGERS_64 = {
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_SINT64: "int64",
    FieldDescriptor.TYPE_SFIXED64: "int64",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_FIXED64: "uint64",
}

_DECLARATION = re.compile(r"^(message|enum|service|oneof)\s+(\w+)\s*\{")
_RPC = re.compile(r"^rpc\s+(\w+)\s*\(")
_FIELD = re.compile(r"^(?:repeated\s+|optional\s+)?[\w.]+\s+(\w+)\s*=\s*\d+")
_VALUE = re.compile(r"^(\w+)\s*=\s*-?\d+")


def proto_comments(text: str) -> dict[str, str]:
    """Leading and trailing ``//`` comments by name: ``Message``, ``Message.field``, ``Enum.VALUE``, ``rpc.Method``."""
    found: dict[str, str] = {}
    stack: list[tuple[str, str]] = []  # (kind, name) of the open blocks
    pending: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("//"):
            pending.append(line[2:].strip())
            continue
        if not line:
            pending = []
            continue
        code, _, trailing = line.partition("//")
        code = code.strip()
        comment = " ".join([*pending, trailing.strip()]).strip()
        pending = []
        owner = next((name for kind, name in reversed(stack) if kind in {"message", "enum"}), "")
        key = ""
        if match := _DECLARATION.match(code):
            kind, name = match.groups()
            key = name if kind in {"message", "enum"} else ""
            stack.append((kind, name))
        elif code.startswith("}"):
            stack = stack[:-1]
        elif match := _RPC.match(code):
            key = f"rpc.{match.group(1)}"
        elif stack and (match := (_VALUE if stack[-1][0] == "enum" else _FIELD).match(code)):
            key = f"{owner}.{match.group(1)}"
        if key and comment:
            found[key] = comment
    return found


@cache
def _comments() -> dict[str, str]:
    try:
        return proto_comments(PROTO_FILE.read_text())
    except OSError:  # an installed package without proto/: schemas without descriptions
        return {}


def _name(full_name: str) -> str:
    return full_name.removeprefix(_PACKAGE)


def _described(schema: dict[str, Any], key: str) -> dict[str, Any]:
    text = _comments().get(key)
    return {**schema, "description": text} if text else schema


def _enum_schema(enum: EnumDescriptor) -> dict[str, Any]:
    values = [value.name for value in enum.values]
    lines = [
        f"- {v.name}: {_comments()[f'{_name(enum.full_name)}.{v.name}']}"
        for v in enum.values
        if f"{_name(enum.full_name)}.{v.name}" in _comments()
    ]
    schema: dict[str, Any] = {
        "type": ["string", "integer"],
        "enum": [*values, *[value.number for value in enum.values]],
        "x-enum-numbers": {value.name: value.number for value in enum.values},
    }
    text = " ".join(filter(None, [_comments().get(_name(enum.full_name), ""), "Answers carry the name."]))
    if lines:
        text += "\n" + "\n".join(lines)
    return {**schema, "description": text}


def _scalar_schema(field: FieldDescriptor) -> dict[str, Any]:
    kind = field.type
    if kind == FieldDescriptor.TYPE_MESSAGE:
        return {"$ref": _REF + _name(field.message_type.full_name)}
    if kind == FieldDescriptor.TYPE_ENUM:
        return {"$ref": _REF + _name(field.enum_type.full_name)}
    if kind == FieldDescriptor.TYPE_STRING:
        return {"type": "string"}
    if kind == FieldDescriptor.TYPE_BYTES:
        return {"type": "string", "contentEncoding": "base64", "format": "byte"}
    if kind == FieldDescriptor.TYPE_BOOL:
        return {"type": "boolean"}
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        # The JSON mapping's "NaN"/"Infinity" parse, and the gateway refuses them as it does over gRPC.
        return {"type": "number", "format": "float" if kind == FieldDescriptor.TYPE_FLOAT else "double"}
    if kind in _INTEGERS:
        return {"type": "integer", "format": _INTEGERS[kind]}
    return {"type": ["string", "integer"], "format": _INTEGERS_64[kind], "description": "64-bit: written as a string"}


def _message_schema(message: Descriptor) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    owner = _name(message.full_name)
    for field in message.fields:
        item = _scalar_schema(field)
        properties[field.name] = _described(
            {"type": "array", "items": item} if field.is_repeated else item, f"{owner}.{field.name}"
        )
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    text = _comments().get(owner, "")
    oneofs = [o for o in message.oneofs if not o.name.startswith("_")]  # not proto3 `optional`'s synthetic ones
    for oneof in oneofs:
        text += f" At most one of {', '.join(f.name for f in oneof.fields)}."
    if text.strip():
        schema["description"] = text.strip()
    return schema


def _reachable(messages: list[Descriptor]) -> tuple[dict[str, Descriptor], dict[str, EnumDescriptor]]:
    found: dict[str, Descriptor] = {}
    enums: dict[str, EnumDescriptor] = {}
    todo = list(messages)
    while todo:
        message = todo.pop()
        if message.full_name in found:
            continue
        found[message.full_name] = message
        for field in message.fields:
            if field.message_type is not None:
                todo.append(field.message_type)
            if field.enum_type is not None:
                enums[field.enum_type.full_name] = field.enum_type
    return found, enums


def _score_schemas() -> dict[str, Any]:
    return {
        "ScoreRequest": {
            "type": "object",
            "description": "MedImageParse's request (pandas split orientation).",
            "required": ["input_data"],
            "properties": {
                "input_data": {
                    "type": "object",
                    "required": ["columns", "index", "data"],
                    "additionalProperties": False,
                    "properties": {
                        "columns": {
                            "type": "array",
                            "items": {"type": "string", "enum": ["image", "text"]},
                            "minItems": 2,
                            "maxItems": 2,
                            "uniqueItems": True,
                            "description": 'The order of each data item: ["image", "text"].',
                        },
                        "index": {"type": "array", "items": {"type": "integer"}, "description": "One per item."},
                        "data": {
                            "type": "array",
                            "minItems": 1,
                            "maxItems": 256,
                            "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2},
                            "description": "Items [image in base64 (line breaks allowed), prompts separated by "
                            "'&']. The image may be any size and DICOM, PNG, JPEG, NIfTI, MHA or NRRD; the gateway "
                            "letterboxes it to 1024x1024 (see transform).",
                        },
                    },
                }
            },
        },
        "ScoreItem": {
            "type": "object",
            "required": ["image_features", "text_features"],
            "properties": {
                "image_features": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "description": 'A JSON string {"data": <base64>, "shape": [N, 1024, 1024], "dtype": "uint8"}: '
                    "one 0/1 mask per prompt in the 1024x1024 model space.",
                },
                "text_features": {
                    "type": "array",
                    "items": {"type": "string"},
                    "description": "One of MedImageParse's 16 categories per prompt.",
                },
                "scores": {"type": "array", "items": {"type": "number"}, "description": "medgate: one per prompt."},
                "prompts": {"type": "array", "items": {"$ref": _REF + "PromptResult"}},
                "transform": {"$ref": _REF + "Transform"},
                "models": {"type": "array", "items": {"$ref": _REF + "ModelRef"}},
                "image": {"$ref": _REF + "ImageInfo"},
            },
        },
        "ScoreResponse": {"type": "array", "items": {"$ref": _REF + "ScoreItem"}},
    }


_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "status", "message"],
            "properties": {
                "code": {"type": "integer", "description": "The HTTP status."},
                "status": {"type": "string", "description": "The gRPC status code name, e.g. INVALID_ARGUMENT."},
                "message": {
                    "type": "string",
                    "description": "What is wrong, naming the field, never quoting the request.",
                },
                "request_id": {"type": "string"},
            },
        }
    },
}

_ERRORS = {
    "400": "INVALID_ARGUMENT: not JSON, not the schema, or bad input (naming the field)",
    "401": "UNAUTHENTICATED: no bearer token, or one that does not verify",
    "403": "PERMISSION_DENIED: the token lacks the role (inference)",
    "413": "RESOURCE_EXHAUSTED: a limit (body size, items, prompts, boxes, image size)",
    "422": "FAILED_PRECONDITION: an input the gateway cannot process (an unsupported codec)",
    "500": "INTERNAL: a bug; quote the incident id",
    "501": "UNIMPLEMENTED: no model serves this task here",
    "503": "UNAVAILABLE: Triton or a model is down, or the gateway is saturated; retry",
    "504": "DEADLINE_EXCEEDED: the deadline (X-Deadline-Ms, else the gateway's default) was spent",
}

_PARAMETERS = [
    {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,64}$"},
        "description": "Your id for this request (a plain token), in the gateway's access log and audit trail and "
        "echoed in the answer's X-Request-Id; anything else is replaced by a fresh id.",
    },
    {
        "name": "X-Deadline-Ms",
        "in": "header",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 86400000},
        "description": "The request's deadline in milliseconds (gRPC's deadline); past it the work stops and the "
        "answer is 504. Without it the gateway's default deadline applies.",
    },
]


def _operation(summary: str, request: str, response: str, operation_id: str) -> dict[str, Any]:
    json_of = lambda name: {"application/json": {"schema": {"$ref": _REF + name}}}  # noqa: E731
    responses: dict[str, Any] = {"200": {"description": "OK", "content": json_of(response)}}
    for status, text in _ERRORS.items():
        responses[status] = {"description": text, "content": json_of("Error")}
    return {
        "summary": summary,
        "operationId": operation_id,
        "parameters": _PARAMETERS,
        "requestBody": {"required": True, "content": json_of(request)},
        "responses": responses,
    }


def document() -> dict[str, Any]:
    """The whole OpenAPI document (``GET /openapi.json``)."""
    rpcs = [pb.DESCRIPTOR.services_by_name["Inference"].methods_by_name[rpc.method] for rpc in V1_ROUTES.values()]
    messages, enums = _reachable([m for rpc in rpcs for m in (rpc.input_type, rpc.output_type)])
    schemas: dict[str, Any] = {_name(name): _message_schema(m) for name, m in sorted(messages.items())}
    schemas.update({_name(name): _enum_schema(e) for name, e in sorted(enums.items())})
    schemas.update(_score_schemas())
    schemas["Error"] = _ERROR_SCHEMA
    paths: dict[str, Any] = {
        "/score": {
            "post": _operation(
                "MedImageParse's scoring contract: text-prompt segmentation of up to 256 images, one Segment call each",
                "ScoreRequest",
                "ScoreResponse",
                "score",
            )
        }
    }
    for route, rpc in zip(V1_ROUTES, rpcs, strict=True):
        summary = _comments().get(f"rpc.{rpc.name}", rpc.name)
        summary += f" (gRPC medgate.v1.Inference/{rpc.name}; bodies in protobuf's JSON mapping)"
        paths[f"/v1/{route}"] = {
            "post": _operation(summary, _name(rpc.input_type.full_name), _name(rpc.output_type.full_name), rpc.name)
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "medgate HTTP/JSON face",
            "version": "v1",
            "description": "The gateway's gRPC API (medgate.v1.Inference) over HTTP/JSON, and MedImageParse's POST "
            "/score. Every call runs through the same checks, limits, auth, audit and metrics as gRPC.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}},
        },
        "security": [{"bearer": []}],
    }

"""Field checks every request gets before a servicer sees it: enum values, finite numbers, UTF-8 strings.

proto3 enums are open (an unknown number parses fine) and floats may be NaN or infinite, so a
request can be well-formed protobuf and still meaningless. These checks walk the message by its
descriptor, so every current and future request message is covered without a list to forget.
Errors name the field path (``image.kind``, ``tasks[1]``) and never quote string values.
Pure protobuf: no gRPC here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from services.rpc.errors import BadRequest

_FLOATS = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE)


_CHECKED = frozenset({FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM, *_FLOATS})


def check_message(message: Message, prefix: str = "") -> None:
    """Raise BadRequest naming the first field with an unknown enum value or a non-finite number.

    Only message, enum and float fields are read: reading a bytes field copies it (a 7 MB image each
    time), and strings were checked for UTF-8 when the request was parsed.
    """
    for field in message.DESCRIPTOR.fields:
        if field.type not in _CHECKED:
            continue
        path = f"{prefix}{field.name}"
        repeated = field.is_repeated
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type.GetOptions().map_entry:
                continue  # no request of ours has maps of enums or floats
            if repeated:
                for index, item in enumerate(getattr(message, field.name)):
                    check_message(item, f"{path}[{index}].")
            elif message.HasField(field.name):
                check_message(getattr(message, field.name), f"{path}.")
            continue
        values = getattr(message, field.name)
        for index, value in enumerate(values if repeated else [values]):
            where = f"{path}[{index}]" if repeated else path
            if field.type == FieldDescriptor.TYPE_ENUM:
                if field.enum_type.values_by_number.get(value) is None:
                    raise BadRequest(f"{where}: {value} is not a valid {field.enum_type.full_name} value")
            elif not math.isfinite(value):
                raise BadRequest(f"{where} must be a finite number, not {value}")


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that did not parse, so the error boundary can answer INVALID_ARGUMENT."""

    message_type: str
    problem: str

    def error(self) -> BadRequest:
        return BadRequest(f"the request is not a valid {self.message_type}: {self.problem}")


def decode_or_explain(descriptor: Descriptor, data: bytes, parse: object) -> object:
    """``parse(data)``, or an :class:`Undecodable` saying which field broke it."""
    try:
        return parse(data)  # type: ignore[operator]
    except DecodeError:
        path = invalid_utf8_field(descriptor, data)
        problem = f"field {path} is not valid UTF-8" if path else "the bytes are not a protobuf message of this type"
        return Undecodable(descriptor.full_name, problem)


class _Truncated(Exception):
    pass


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _Truncated
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The path of the first string field whose bytes are not UTF-8 (protobuf's parser only says "failed")."""
    pos = 0
    try:
        while pos < len(data):
            tag, pos = _varint(data, pos)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, pos = _varint(data, pos)
            elif wire_type == 1:
                pos += 8
            elif wire_type == 5:
                pos += 4
            elif wire_type == 2:
                length, pos = _varint(data, pos)
                chunk, pos = data[pos : pos + length], pos + length
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return f"{prefix}{field.name}"
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = invalid_utf8_field(field.message_type, chunk, f"{prefix}{field.name}.")
                    if found:
                        return found
            else:
                return None  # groups: nothing of ours uses them
    except _Truncated:
        return None
    return None

"""Decoding requests leniently, so that non-UTF-8 text gets INVALID_ARGUMENT naming the field.

protobuf refuses to parse a message whose string field holds invalid UTF-8, and gRPC turns a
request it cannot deserialize into INTERNAL with no hint of the cause. The server therefore
deserializes itself: on a decode error it walks the wire format against the message
descriptor and reports which string fields (``edits[1].subject``) are not valid UTF-8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message


@dataclass(frozen=True)
class Undecodable:
    """Stands in for a request that failed to parse: the reason and the fields at fault."""

    reason: str
    violations: list[tuple[str, str]]


def lenient_deserializer(cls: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    """A gRPC request deserializer that never raises (raising would make the call INTERNAL)."""

    def deserialize(data: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(data)
        except DecodeError as e:
            try:
                bad = invalid_utf8_fields(cls.DESCRIPTOR, data)
            except ValueError as walk_error:
                bad = []
                reason = f"malformed protobuf message: {walk_error}"
            else:
                reason = f"malformed protobuf message: {e}"
            violations = [(path, "is not valid UTF-8") for path in bad] or [("", reason)]
            return Undecodable(reason, violations)

    return deserialize


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def invalid_utf8_fields(descriptor: Descriptor, data: bytes, prefix: str = "") -> list[str]:
    """Paths of string fields in ``data`` (a serialized ``descriptor`` message) that are not UTF-8."""
    bad: list[str] = []
    counts: dict[int, int] = {}
    pos = 0
    while pos < len(data):
        tag, pos = _varint(data, pos)
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, pos = _varint(data, pos)
            continue
        if wire_type in (1, 5):
            pos += 8 if wire_type == 1 else 4
            continue
        if wire_type != 2:
            raise ValueError(f"unsupported wire type {wire_type} for field {number}")
        length, pos = _varint(data, pos)
        chunk, pos = data[pos:pos + length], pos + length
        if len(chunk) != length:
            raise ValueError("truncated length-delimited field")
        field = descriptor.fields_by_number.get(number)
        if field is None:
            continue
        path = prefix + field.name
        if field.is_repeated:
            index = counts.get(number, 0)
            counts[number] = index + 1
            path += f"[{index}]"
        if field.type == FieldDescriptor.TYPE_STRING:
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                bad.append(path)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            bad.extend(invalid_utf8_fields(field.message_type, chunk, path + "."))
    return bad

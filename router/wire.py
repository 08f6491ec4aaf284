"""Why bytes sent as a GenerateRequest do not parse: the field where they break.

protobuf only says "Error parsing message". Walking the wire format (tags, varints,
lengths) finds the first field that holds invalid UTF-8 or malformed bytes, so the client
gets INVALID_ARGUMENT naming it (`sampling.stop[0]`, `messages[2].content`, `token_ids`)
rather than a bare error. Fields the schema does not know, or sent with another wire type
than the schema's, are skipped as protobuf skips them. Only called on bytes that protobuf
refused; it reads every byte once, and recurses only as deep as the schema nests.
"""

from __future__ import annotations

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from pdserve.protocol import InvalidField
from pdserve.rpc import pdserve_pb2 as pb

VARINT, I64, LEN, SGROUP, EGROUP, I32 = 0, 1, 2, 3, 4, 5
_FIXED = {I64: 8, I32: 4}
_SCALAR_WIRE = {  # the wire type of each packable scalar
    FieldDescriptor.TYPE_INT32: VARINT, FieldDescriptor.TYPE_INT64: VARINT,
    FieldDescriptor.TYPE_UINT32: VARINT, FieldDescriptor.TYPE_UINT64: VARINT,
    FieldDescriptor.TYPE_SINT32: VARINT, FieldDescriptor.TYPE_SINT64: VARINT,
    FieldDescriptor.TYPE_BOOL: VARINT, FieldDescriptor.TYPE_ENUM: VARINT,
    FieldDescriptor.TYPE_DOUBLE: I64, FieldDescriptor.TYPE_FIXED64: I64,
    FieldDescriptor.TYPE_SFIXED64: I64,
    FieldDescriptor.TYPE_FLOAT: I32, FieldDescriptor.TYPE_FIXED32: I32,
    FieldDescriptor.TYPE_SFIXED32: I32,
}


class _Bad(Exception):
    def __init__(self, where: str, problem: str):
        self.where, self.problem = where, problem


def diagnose(data: bytes) -> InvalidField:
    """The error to answer for bytes that `GenerateRequest.FromString` refused."""
    try:
        _walk(data, pb.GenerateRequest.DESCRIPTOR, "")
    except _Bad as e:
        return InvalidField(e.where or "request", e.problem)
    return InvalidField("request", "is not a serialized pdserve.v1.GenerateRequest")


def _walk(data: bytes, desc: Descriptor, path: str) -> None:
    seen: dict[int, int] = {}  # occurrences of each repeated field so far
    at = 0
    while at < len(data):
        tag, at = _varint(data, at, path)
        number, wire = tag >> 3, tag & 7
        field = desc.fields_by_number.get(number)
        where = path.removesuffix(".")
        if field is not None:
            where = f"{path}{field.name}"
            if field.is_repeated:
                i = seen[number] = seen.get(number, -1) + 1
                if wire == LEN and field.type in _SCALAR_WIRE:
                    i = None  # packed: one field, many values
                where = where if i is None else f"{where}[{i}]"
        if number == 0:
            raise _Bad(where, "bad protobuf encoding: field number 0")
        if wire == VARINT:
            _, at = _varint(data, at, where)
        elif wire in _FIXED:
            at = _skip(data, at, _FIXED[wire], where)
        elif wire == LEN:
            n, at = _varint(data, at, where)
            payload = data[at:_skip(data, at, n, where)]
            at += n
            if field is not None:
                _check_payload(payload, field, where)
        elif wire == SGROUP:
            at = _skip_group(data, at, number, where)
        else:
            raise _Bad(where, f"bad protobuf encoding: wire type {wire} here")


def _check_payload(payload: bytes, field: FieldDescriptor, where: str) -> None:
    if field.type == FieldDescriptor.TYPE_STRING:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(where, "is not valid UTF-8") from None
    elif field.type == FieldDescriptor.TYPE_MESSAGE:
        _walk(payload, field.message_type, where + ".")
    elif field.type in _SCALAR_WIRE:  # packed values
        wire, at = _SCALAR_WIRE[field.type], 0
        while at < len(payload):
            if wire == VARINT:
                _, at = _varint(payload, at, where)
            else:
                at = _skip(payload, at, _FIXED[wire], where)


def _skip_group(data: bytes, at: int, number: int, where: str) -> int:
    """Past the end-group tag that closes group `number` (a proto2 form, never ours).
    Iterative: a client may nest groups a million deep."""
    open_groups = [number]
    while open_groups:
        tag, at = _varint(data, at, where)
        inner, wire = tag >> 3, tag & 7
        if wire == EGROUP:
            if inner != open_groups.pop():
                raise _Bad(where, "bad protobuf encoding: unmatched end of group")
        elif wire == SGROUP:
            open_groups.append(inner)
        elif wire == VARINT:
            _, at = _varint(data, at, where)
        elif wire in _FIXED:
            at = _skip(data, at, _FIXED[wire], where)
        elif wire == LEN:
            n, at = _varint(data, at, where)
            at = _skip(data, at, n, where)
        else:
            raise _Bad(where, f"bad protobuf encoding: wire type {wire} here")
    return at


def _varint(data: bytes, at: int, where: str) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if at >= len(data):
            raise _Bad(where, "bad protobuf encoding: the bytes end inside a number")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
    raise _Bad(where, "bad protobuf encoding: a number longer than 10 bytes")


def _skip(data: bytes, at: int, n: int, where: str) -> int:
    if at + n > len(data):
        raise _Bad(where, f"bad protobuf encoding: {n} bytes announced, "
                          f"{len(data) - at} left")
    return at + n

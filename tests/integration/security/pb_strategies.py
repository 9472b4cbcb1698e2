"""Hypothesis strategies for any protobuf message, built from its descriptor: every field may be
left out or set to an extreme or malformed value (huge and odd strings, out-of-range numbers,
NaN, unknown enum values, invalid timestamps, long repeated fields, nested messages)."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_F = FieldDescriptor

# Strings: printable, control characters, surrogate-free unicode, and sometimes very long.
_TEXT = st.one_of(
    st.text(max_size=64),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x1F), max_size=16),
    st.sampled_from(
        ["", " ", "\x00", "default", "../../etc/passwd", "'; DROP TABLE sessions; --", "🤖" * 50]
    ),
    st.integers(1_000, 300_000).map(lambda n: "x" * n),
)


def _scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    t = field.type
    if t == _F.TYPE_STRING:
        return _TEXT
    if t == _F.TYPE_BYTES:
        return st.binary(max_size=256)
    if t == _F.TYPE_BOOL:
        return st.booleans()
    if t in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        width = 32 if t == _F.TYPE_FLOAT else 64
        return st.floats(width=width, allow_nan=True, allow_infinity=True)
    if t in (_F.TYPE_INT32, _F.TYPE_SINT32, _F.TYPE_SFIXED32):
        return st.one_of(st.integers(*INT32), st.sampled_from([0, -1, 1, INT32[0], INT32[1]]))
    if t in (_F.TYPE_UINT32, _F.TYPE_FIXED32):
        return st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**32 - 1]))
    if t in (_F.TYPE_INT64, _F.TYPE_SINT64, _F.TYPE_SFIXED64):
        return st.integers(*INT64)
    if t in (_F.TYPE_UINT64, _F.TYPE_FIXED64):
        return st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**64 - 1]))
    if t == _F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.integers(*INT32))  # unknown values too
    raise TypeError(f"unsupported field type {t} of {field.full_name}")


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    if field.type == _F.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor` (a generated class's DESCRIPTOR)."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key = _scalar(field.message_type.fields_by_name["key"])
            value = _value(field.message_type.fields_by_name["value"], depth)
            fields[field.name] = st.dictionaries(key, value, max_size=4)
        elif field.is_repeated:
            fields[field.name] = st.one_of(
                st.lists(_value(field, depth), max_size=4),
                st.integers(100, 3_000).map(lambda n, f=field: [_default_item(f)] * n),  # long lists
            )
        else:
            fields[field.name] = _value(field, depth)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        for name in draw(st.lists(st.sampled_from(sorted(fields)), unique=True)) if fields else []:
            _assign(msg, descriptor.fields_by_name[name], draw(fields[name]))
        return msg

    return build()


def _default_item(field: FieldDescriptor) -> Any:
    if field.type == _F.TYPE_MESSAGE:
        from google.protobuf import message_factory

        return message_factory.GetMessageClass(field.message_type)()
    if field.type == _F.TYPE_STRING:
        return "s"
    if field.type == _F.TYPE_BYTES:
        return b"b"
    if field.type in (_F.TYPE_FLOAT, _F.TYPE_DOUBLE):
        return 1.0
    if field.type == _F.TYPE_BOOL:
        return True
    return 1


def _assign(msg: Message, field: FieldDescriptor, value: Any) -> None:
    target = getattr(msg, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        for k, v in value.items():
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        target.extend(value)
    elif field.type == _F.TYPE_MESSAGE:
        target.CopyFrom(value)
    else:
        setattr(msg, field.name, value)

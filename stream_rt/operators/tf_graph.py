"""Read TensorFlow graph files without TensorFlow: a frozen ``GraphDef`` (binary
protobuf, ``.pb``) and its text form (``.pbtxt``, such as the text graphs OpenCV's
``tf_text_graph_*.py`` scripts write).

Only what a frozen inference graph needs is read: nodes (name, op, inputs) and their
attributes, constant tensors included. Both readers follow the same schema, taken from
TensorFlow's ``graph.proto``, ``node_def.proto``, ``attr_value.proto``, ``tensor.proto``
and ``tensor_shape.proto``; fields outside it are skipped. A file that is not such a graph
raises :class:`GraphFileError` with one line saying where it went wrong.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# message -> field number -> (name, kind, repeated); a kind is a scalar type or a message.
_SCHEMA: dict[str, dict[int, tuple[str, str, bool]]] = {
    "GraphDef": {1: ("node", "NodeDef", True)},
    "NodeDef": {
        1: ("name", "string", False),
        2: ("op", "string", False),
        3: ("input", "string", True),
        5: ("attr", "AttrEntry", True),
    },
    "AttrEntry": {1: ("key", "string", False), 2: ("value", "AttrValue", False)},  # map<string, AttrValue>
    "AttrValue": {
        1: ("list", "ListValue", False),
        2: ("s", "bytes", False),
        3: ("i", "int", False),
        4: ("f", "float", False),
        5: ("b", "bool", False),
        6: ("type", "enum", False),
        7: ("shape", "TensorShapeProto", False),
        8: ("tensor", "TensorProto", False),
    },
    "ListValue": {
        2: ("s", "bytes", True),
        3: ("i", "int", True),
        4: ("f", "float", True),
        5: ("b", "bool", True),
        6: ("type", "enum", True),
        7: ("shape", "TensorShapeProto", True),
        8: ("tensor", "TensorProto", True),
    },
    "TensorProto": {
        1: ("dtype", "enum", False),
        2: ("tensor_shape", "TensorShapeProto", False),
        4: ("tensor_content", "bytes", False),
        5: ("float_val", "float", True),
        6: ("double_val", "double", True),
        7: ("int_val", "int", True),
        10: ("int64_val", "int", True),
        11: ("bool_val", "bool", True),
    },
    "TensorShapeProto": {2: ("dim", "Dim", True)},
    "Dim": {1: ("size", "int", False), 2: ("name", "string", False)},
}
_SCALARS = {"string", "bytes", "int", "float", "double", "bool", "enum"}
_BY_NAME = {message: {name: (name, kind, rep) for name, kind, rep in fields.values()}
            for message, fields in _SCHEMA.items()}  # fmt: skip

# TensorFlow's DataType enum: the tensor types a frozen graph's constants use.
DTYPES: dict[int, np.dtype[Any]] = {
    1: np.dtype(np.float32), 2: np.dtype(np.float64), 3: np.dtype(np.int32), 4: np.dtype(np.uint8),
    5: np.dtype(np.int16), 6: np.dtype(np.int8), 9: np.dtype(np.int64), 10: np.dtype(np.bool_),
}  # fmt: skip
_DTYPE_NAMES = {"DT_FLOAT": 1, "DT_DOUBLE": 2, "DT_INT32": 3, "DT_UINT8": 4, "DT_INT16": 5, "DT_INT8": 6,
                "DT_STRING": 7, "DT_INT64": 9, "DT_BOOL": 10}  # fmt: skip

Message = dict[str, list[Any]]
"""A decoded message: each field present, by name, as the list of its values."""


class GraphFileError(ValueError):
    """The file is not a TensorFlow graph this reader understands."""


@dataclass(frozen=True, slots=True)
class TfNode:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)
    """Attribute values as Python values: str, int, float, bool, a list, a shape (list of
    ints), or a :class:`TfTensor`."""


@dataclass(frozen=True, slots=True)
class TfTensor:
    """A ``TensorProto``, turned into numpy only when asked (a graph holds many)."""

    message: Message

    def array(self) -> npt.NDArray[Any]:
        return tensor_array(self.message)


def read_graph_def(data: bytes) -> list[TfNode]:
    """The nodes of a binary ``GraphDef``, in file order."""
    try:
        graph = _decode(memoryview(data), "GraphDef")
    except (IndexError, struct.error, UnicodeDecodeError) as exc:
        raise GraphFileError(f"not a TensorFlow GraphDef ({exc})") from None
    return [_node(n) for n in graph.get("node", [])]


def read_text_graph(text: str) -> list[TfNode]:
    """The nodes of a ``GraphDef`` in protobuf text format, in file order."""
    tokens = _tokens(text)
    graph, end = _parse_text(tokens, 0, "GraphDef", closing=None)
    if end != len(tokens):
        raise GraphFileError(f"unexpected '{tokens[end]}' at top level of the text graph")
    return [_node(n) for n in graph.get("node", [])]


def _node(message: Message) -> TfNode:
    attrs = {entry["key"][0]: _attr_value(entry.get("value", [{}])[0]) for entry in message.get("attr", [])}
    return TfNode(message.get("name", [""])[0], message.get("op", [""])[0], tuple(message.get("input", [])), attrs)


def _attr_value(value: Message) -> Any:
    if "list" in value:
        items = value["list"][0]
        for key in ("i", "f", "b", "s", "type", "shape", "tensor"):
            if key in items:
                return [_plain(key, v) for v in items[key]]
        return []
    for key in ("s", "i", "f", "b", "type", "shape", "tensor"):
        if key in value:
            return _plain(key, value[key][0])
    return None


def _plain(key: str, value: Any) -> Any:
    if key == "s":
        return bytes(value).decode("utf-8", "replace")
    if key == "shape":
        return [d.get("size", [0])[0] for d in value.get("dim", [])]
    if key == "tensor":
        return TfTensor(value)
    return value


def tensor_array(tensor: Message) -> npt.NDArray[Any]:
    """A ``TensorProto`` as a numpy array of its shape."""
    code = tensor.get("dtype", [0])[0]
    if code not in DTYPES:
        raise GraphFileError(f"tensor of unsupported type {code}")
    dtype = DTYPES[code]
    shape = [d.get("size", [0])[0] for d in tensor.get("tensor_shape", [{}])[0].get("dim", [])]
    count = int(np.prod(shape)) if shape else 1
    if "tensor_content" in tensor:
        flat = np.frombuffer(bytes(tensor["tensor_content"][0]), dtype.newbyteorder("<")).astype(dtype)
    else:
        values = next((tensor[k] for k in ("float_val", "double_val", "int_val", "int64_val", "bool_val")
                       if k in tensor), [])  # fmt: skip
        flat = np.asarray(values, dtype)
        if flat.size == 1 and count > 1:  # one value stands for a tensor filled with it
            flat = np.full(count, flat[0], dtype)
    if flat.size != count:
        raise GraphFileError(f"tensor of shape {shape} holds {flat.size} values")
    return flat.reshape(shape)


# ----------------------------------------------------------------------------- binary


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise GraphFileError("varint longer than 10 bytes")


def _decode(buf: memoryview, message: str) -> Message:
    schema, pos = _SCHEMA[message], 0
    out: Message = {}
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            raw: Any
            raw, pos = _varint(buf, pos)
        elif wire == 1:
            raw, pos = buf[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            raw, pos = buf[pos : pos + length], pos + length
            if pos > len(buf):
                raise GraphFileError(f"{message}: field {number} runs past the end")
        elif wire == 5:
            raw, pos = buf[pos : pos + 4], pos + 4
        else:
            raise GraphFileError(f"{message}: field {number} has wire type {wire}")
        if number not in schema:
            continue
        name, kind, _ = schema[number]
        out.setdefault(name, []).extend(_binary_values(raw, wire, kind))
    return out


def _binary_values(raw: Any, wire: int, kind: str) -> list[Any]:
    if kind not in _SCALARS:
        return [_decode(raw, kind)]
    if kind == "string":
        return [bytes(raw).decode("utf-8")]
    if kind == "bytes":
        return [raw]
    if wire == 2:  # a packed repeated field
        if kind == "float":
            return list(np.frombuffer(raw, "<f4").astype(float))
        if kind == "double":
            return list(np.frombuffer(raw, "<f8").astype(float))
        values, pos = [], 0
        while pos < len(raw):
            value, pos = _varint(raw, pos)
            values.append(_scalar(value, kind))
        return values
    if kind == "float":
        return [struct.unpack("<f", raw)[0]]
    if kind == "double":
        return [struct.unpack("<d", raw)[0]]
    return [_scalar(raw, kind)]


def _scalar(value: int, kind: str) -> Any:
    if kind == "bool":
        return bool(value)
    return value - (1 << 64) if value >= 1 << 63 else value  # int64 and int32 are sign-extended


# ----------------------------------------------------------------------------- text

_TOKEN = re.compile(
    r"""\s*(?:\#[^\n]*|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')|([{}<>\[\]:,;])|([^\s{}<>\[\]:,;"'#]+))"""
)
_ESCAPE = re.compile(rb"\\(x[0-9a-fA-F]{1,2}|[0-7]{1,3}|.)")
_SIMPLE_ESCAPES = {b"n": b"\n", b"t": b"\t", b"r": b"\r", b"a": b"\a", b"b": b"\b", b"f": b"\f", b"v": b"\v"}


def _tokens(text: str) -> list[str]:
    tokens, pos = [], 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None or match.end() == pos:
            if text[pos:].strip() == "":
                break
            line = text.count("\n", 0, pos) + 1
            raise GraphFileError(f"text graph line {line}: cannot read {text[pos : pos + 20]!r}")
        token = match.group(1) or match.group(2) or match.group(3)
        if token:
            tokens.append(token)
        pos = match.end()
    return tokens


def _parse_text(tokens: list[str], pos: int, message: str, closing: str | None) -> tuple[Message, int]:
    fields = _BY_NAME.get(message, {})
    out: Message = {}
    while pos < len(tokens) and tokens[pos] != closing:
        name = tokens[pos]
        pos += 1
        if pos < len(tokens) and tokens[pos] == ":":
            pos += 1
        kind = fields[name][1] if name in fields else None
        if pos < len(tokens) and tokens[pos] == "[":  # a list of values or messages
            pos += 1
            while tokens[pos] != "]":
                value, pos = _text_value(tokens, pos, kind)
                if value is not None:
                    out.setdefault(name, []).append(value)
                if tokens[pos] == ",":
                    pos += 1
            pos += 1
        else:
            value, pos = _text_value(tokens, pos, kind)
            if value is not None:
                out.setdefault(name, []).append(value)
        if pos < len(tokens) and tokens[pos] in (",", ";"):
            pos += 1
    if closing is not None and pos >= len(tokens):
        raise GraphFileError(f"text graph: '{closing}' missing at the end of a {message}")
    return out, pos + (closing is not None)


def _text_value(tokens: list[str], pos: int, kind: str | None) -> tuple[Any, int]:
    """The value at ``pos`` read as ``kind`` (None: a field outside the schema, skipped)."""
    token = tokens[pos]
    if token in ("{", "<"):
        closing = "}" if token == "{" else ">"
        if kind is None or kind in _SCALARS:
            return None, _skip_message(tokens, pos)
        return _parse_text(tokens, pos + 1, kind, closing)
    if kind is None:
        return None, pos + 1
    if kind in ("string", "bytes"):
        raw = b""
        while pos < len(tokens) and tokens[pos][:1] in ('"', "'"):  # adjacent strings are joined
            raw += _unescape(tokens[pos][1:-1])
            pos += 1
        return (raw.decode("utf-8") if kind == "string" else raw), pos
    try:
        if kind == "bool":
            return token in ("true", "True", "t", "1"), pos + 1
        if kind == "enum":
            return (_DTYPE_NAMES[token] if token in _DTYPE_NAMES else int(token)), pos + 1
        if kind == "int":
            return int(token, 0), pos + 1
        return _float(token), pos + 1
    except (KeyError, ValueError):
        raise GraphFileError(f"text graph: {token!r} is not a {kind}") from None


def _float(token: str) -> float:
    try:
        return float(token)
    except ValueError:
        if token[-1:] in ("f", "F"):  # 1.5f
            return float(token[:-1])
        raise


def _skip_message(tokens: list[str], pos: int) -> int:
    depth = 0
    while True:
        if tokens[pos] in ("{", "<"):
            depth += 1
        elif tokens[pos] in ("}", ">"):
            depth -= 1
        pos += 1
        if depth == 0:
            return pos


def _unescape(body: str) -> bytes:
    """The bytes of a C-escaped string literal's body."""

    def one(match: re.Match[bytes]) -> bytes:
        code = match.group(1)
        if code[:1] == b"x":
            return bytes([int(code[1:], 16)])
        if code[:1].isdigit():
            return bytes([int(code, 8) & 0xFF])
        return _SIMPLE_ESCAPES.get(code, code)

    return _ESCAPE.sub(one, body.encode("utf-8"))

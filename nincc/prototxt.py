"""Prototxt text to caffe_pb2 messages and back, as Caffe reads and writes it.

Parsing uses protobuf's text format (the grammar Caffe's ``ReadProtoFromTextFile`` accepts); any
parse failure becomes a :class:`~nincc.errors.PrototxtError` naming ``path:line:col`` and what was
wrong. ``load_net``/``load_solver`` also run Caffe's legacy upgrade pass (:mod:`nincc.upgrade`), so
callers always get the current format. ``to_text`` prints like Caffe's ``WriteProtoToTextFile``.
"""

from __future__ import annotations

import difflib
import os
import re
import struct
from pathlib import Path
from typing import Any

from google.protobuf import descriptor, text_encoding, text_format
from google.protobuf.message import Message

from . import caffe_pb2
from .errors import PrototxtError

PathLike = str | os.PathLike

_WHERE = re.compile(r"^(\d+):(\d+) : ")
_NO_FIELD = re.compile(r'Message type "([\w.]+)" has no field named "(\w+)"')
_NO_ENUM = re.compile(r'Enum type "([\w.]+)" has no value named (\S+?)\.?$')


# ----------------------------------------------------------------------------- parsing


def parse_net_text(text: str | bytes, path: str = "<string>") -> caffe_pb2.NetParameter:
    """Parse net prototxt text into a NetParameter exactly as written (no upgrade)."""
    return _parse(text, caffe_pb2.NetParameter(), path)


def parse_solver_text(text: str | bytes, path: str = "<string>") -> caffe_pb2.SolverParameter:
    """Parse solver prototxt text into a SolverParameter exactly as written (no upgrade)."""
    return _parse(text, caffe_pb2.SolverParameter(), path)


def _parse(text: str | bytes, msg: Message, path: str) -> Any:
    if isinstance(text, bytes):
        text = _decode(text)
    try:
        text_format.Parse(text, msg)
    except text_format.ParseError as err:
        line, col = err.GetLine() or 0, err.GetColumn() or 0
        raise PrototxtError(_explain(str(err), text, line), path, line, col) from None
    return msg


def _decode(raw: bytes) -> str:
    """UTF-8 text; stray Latin-1 bytes (seen in comments of old files) are kept, not fatal."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _explain(message: str, text: str, line: int) -> str:
    """protobuf's message without its position prefix and echoed source line, plus a hint."""
    message = _WHERE.sub("", message)
    lines = text.splitlines()
    if 0 < line <= len(lines):
        echoed = f"'{lines[line - 1]}': "
        if message.startswith(echoed):
            message = message[len(echoed) :]
    return message + _hint(message)


def _hint(message: str) -> str:
    """' (did you mean ...)' for an unknown field, ' (allowed: ...)' for an unknown enum value."""
    if m := _NO_FIELD.search(message):
        known = _message_fields(m.group(1))
        close = difflib.get_close_matches(m.group(2), known, n=3)
        return f" (did you mean: {', '.join(close)})" if close else ""
    if m := _NO_ENUM.search(message):
        values = _enum_values(m.group(1))
        return f" (allowed: {', '.join(values)})" if values else ""
    return ""


def _message_fields(full_name: str) -> list[str]:
    try:
        desc = caffe_pb2.DESCRIPTOR.pool.FindMessageTypeByName(full_name)
    except KeyError:
        return []
    return [f.name for f in desc.fields]


def _enum_values(full_name: str) -> list[str]:
    try:
        desc = caffe_pb2.DESCRIPTOR.pool.FindEnumTypeByName(full_name)
    except KeyError:
        return []
    return [v.name for v in desc.values]


# ----------------------------------------------------------------------------- loading


def read_text(path: PathLike) -> str:
    """The text of a prototxt file; a missing or unreadable file is a PrototxtError."""
    try:
        return _decode(Path(path).read_bytes())
    except FileNotFoundError:
        raise PrototxtError("no such file", str(path)) from None
    except IsADirectoryError:
        raise PrototxtError("is a directory, expected a prototxt file", str(path)) from None
    except OSError as err:
        raise PrototxtError(f"cannot read: {err.strerror or err}", str(path)) from None


def _looks_like_text(source: str) -> bool:
    """A str that holds prototxt content rather than a file name."""
    return "\n" in source or "{" in source or (":" in source and not os.path.exists(source))


def load_net(source: PathLike, cccp: bool = False) -> caffe_pb2.NetParameter:
    """A net in current form from a file path or prototxt text, upgraded as Caffe does on load.

    ``cccp=True`` also rewrites CCCP layers to Convolution (see :func:`nincc.upgrade.rewrite_cccp`).
    """
    from .upgrade import upgrade_net

    if isinstance(source, str) and _looks_like_text(source):
        path, net = "<string>", parse_net_text(source)
    else:
        path = str(source)
        net = parse_net_text(read_text(source), path)
    return upgrade_net(net, cccp=cccp, path=path)[0]


def load_solver(source: PathLike) -> caffe_pb2.SolverParameter:
    """A solver from a file path or prototxt text, with Caffe's solver_type upgrade applied."""
    from .upgrade import upgrade_solver

    if isinstance(source, str) and _looks_like_text(source):
        path, solver = "<string>", parse_solver_text(source)
    else:
        path = str(source)
        solver = parse_solver_text(read_text(source), path)
    return upgrade_solver(solver, path=path)


# ----------------------------------------------------------------------------- printing


def to_text(msg: Message) -> str:
    """``msg`` in protobuf text format, byte for byte as Caffe's WriteProtoToTextFile prints it.

    Fields come in field-number order, two-space indents; floats use C++'s shortest form
    (``%.6g`` if it round-trips in float32, else ``%.9g``), so 1.0 prints as ``1``, not ``1.0``.
    """
    out: list[str] = []
    _print_message(msg, 0, out)
    return "".join(out)


def _print_message(msg: Message, indent: int, out: list[str]) -> None:
    pad = " " * indent
    for field, value in msg.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if field.cpp_type == descriptor.FieldDescriptor.CPPTYPE_MESSAGE:
                out.append(f"{pad}{field.name} {{\n")
                _print_message(item, indent + 2, out)
                out.append(f"{pad}}}\n")
            else:
                out.append(f"{pad}{field.name}: {_scalar(field, item)}\n")


def _scalar(field: descriptor.FieldDescriptor, value: Any) -> str:
    kind = field.cpp_type
    fd = descriptor.FieldDescriptor
    if kind == fd.CPPTYPE_STRING:
        raw = value if isinstance(value, bytes) else value.encode("utf-8")
        return f'"{text_encoding.CEscape(raw, as_utf8=False)}"'
    if kind == fd.CPPTYPE_BOOL:
        return "true" if value else "false"
    if kind == fd.CPPTYPE_ENUM:
        enum_value = field.enum_type.values_by_number.get(value)
        return enum_value.name if enum_value is not None else str(value)
    if kind == fd.CPPTYPE_FLOAT:
        return _shortest(value, 6, 9, _as_float32)
    if kind == fd.CPPTYPE_DOUBLE:
        return _shortest(value, 15, 17, float)
    return str(value)


def _as_float32(x: float) -> float:
    return struct.unpack("<f", struct.pack("<f", x))[0]


def _shortest(value: float, short: int, full: int, rounder: Any) -> str:
    """C++ SimpleFtoa/SimpleDtoa: ``%.{short}g`` when it reads back exactly, else ``%.{full}g``."""
    text = f"%.{short}g" % value
    try:
        if rounder(float(text)) == value:
            return text
    except (OverflowError, ValueError):
        pass
    return f"%.{full}g" % value

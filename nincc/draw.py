"""`nincc draw`: a net as a picture. Layers are nodes, edges carry the blob name and shape, and
in-place layers (ReLU, Dropout, BatchNorm + Scale written top == bottom) are folded into the node
of the layer whose blob they rewrite, as Caffe users read such chains.

Pictures are rendered by Graphviz's ``dot`` program when it is installed; without it the DOT
text is written instead (render it later with ``dot -Tsvg net.dot -o net.svg``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import layers as table
from .errors import InputError
from .ir import Graph, Layer

# Output formats `dot -T<format>` writes, by file extension.
FORMATS = {
    ".svg": "svg",
    ".png": "png",
    ".pdf": "pdf",
    ".jpg": "jpg",
    ".jpeg": "jpg",
    ".gif": "gif",
}
DOT_EXTENSIONS = (".dot", ".gv")

# Fill colours by layer family (the table's module names).
FAMILY_COLOURS = {
    "vision": "#cfe2f3",
    "common": "#e8eaf6",
    "neuron": "#fff2cc",
    "normalization": "#d9ead3",
    "loss": "#f4cccc",
    "data": "#eeeeee",
    "recurrent": "#ead1dc",
}
_SKIPPED_FIELDS = ("filler",)  # fillers matter for training only; they clutter a picture
_LINE = 40  # wrap parameter summaries at about this many characters


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def is_inplace(graph: Graph, layer: Layer) -> bool:
    """A layer all of whose tops rewrite the blob of the bottom at the same index."""
    if not layer.tops or len(layer.tops) > len(layer.bottoms):
        return False
    return all(
        graph.value(t).blob == graph.value(b).blob for t, b in zip(layer.tops, layer.bottoms)
    )


def _scalar_text(field: Any, value: Any) -> str:
    if field.enum_type is not None:
        return field.enum_type.values_by_number[value].name
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def param_summary(msg: Any, field_name: str | None) -> list[str]:
    """The fields a layer's ``<type>_param`` message sets, as short ``name value`` items."""
    if not field_name or msg is None or not msg.HasField(field_name):
        return []
    items = []
    for field, value in getattr(msg, field_name).ListFields():
        if any(field.name.endswith(s) for s in _SKIPPED_FIELDS):
            continue
        if field.message_type is not None:
            subs = value if field.is_repeated else [value]
            for sub in subs:
                inner = " ".join(  # nested repeated numbers are dims (BlobShape): 2x3x4x5
                    "x".join(_scalar_text(f, x) for x in (v if f.is_repeated else [v]))
                    for f, v in sub.ListFields()
                    if f.message_type is None
                )
                items.append(f"{field.name} {inner}".strip())
            continue
        vals = value if field.is_repeated else [value]
        items.append(f"{field.name} {','.join(_scalar_text(field, v) for v in vals)}")
    return items


def _wrap(items: list[str]) -> list[str]:
    lines: list[str] = []
    for item in items:
        if lines and len(lines[-1]) + 2 + len(item) <= _LINE:
            lines[-1] += ", " + item
        else:
            lines.append(item)
    return lines


@dataclass(frozen=True)
class _Node:
    id: str
    layers: tuple[Layer, ...]


def _nodes(graph: Graph) -> tuple[list[_Node], dict[str, str]]:
    """Nodes in layer order, and layer name → id of the node that shows it."""
    node_of: dict[str, str] = {}
    members: dict[str, list[Layer]] = {}
    for layer in graph.layers:
        if is_inplace(graph, layer) and layer.bottoms:
            home = node_of[graph.value(layer.bottoms[0]).producer]
        else:
            home = layer.name
            members[home] = []
        node_of[layer.name] = home
        members[home].append(layer)
    return [_Node(k, tuple(v)) for k, v in members.items()], node_of


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _label(node: _Node, messages: Mapping[str, Any]) -> str:
    """A Graphviz HTML-like label: the name in bold, the type, settings, params, folded layers."""
    head, *folded = node.layers
    entry = table.REGISTRY[head.type]
    lines = [f"<B>{_html(head.name)}</B>", f'<FONT COLOR="#444444">{_html(head.type)}</FONT>']
    small = _wrap(param_summary(messages.get(head.name), entry.param_field))
    params = [p for p in head.params if p.share is None]
    if params:
        small.append("params " + " + ".join(_shape(p.shape) for p in params))
    shared = [p for p in head.params if p.share is not None]
    if shared:
        small.append("shares " + ", ".join(f"{p.share[0]}[{p.share[1]}]" for p in shared))
    lines += [f'<FONT POINT-SIZE="9">{_html(x)}</FONT>' for x in small]
    for layer in folded:
        extra = param_summary(messages.get(layer.name), table.REGISTRY[layer.type].param_field)
        owned = [p for p in layer.params if p.share is None]
        if owned:
            extra.append("params " + " + ".join(_shape(p.shape) for p in owned))
        text = f"+ {layer.name} ({layer.type})" + (f" {', '.join(extra)}" if extra else "")
        lines.append(f"<I>{_html(text)}</I>")
    return "<" + "<BR/>".join(lines) + ">"


def to_dot(graph: Graph, net: Any = None, rankdir: str = "TB") -> str:
    """Graphviz DOT text of ``graph``; ``net`` (its NetParameter) adds each layer's settings."""
    messages = {m.name: m for m in net.layer} if net is not None else {}
    nodes, node_of = _nodes(graph)
    out = [
        f"digraph {_q(graph.name or 'net')} {{",
        f"  rankdir={rankdir};",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9, color="#555555"];',
    ]
    for node in nodes:
        head = node.layers[0]
        entry = table.REGISTRY[head.type]
        colour = FAMILY_COLOURS.get(entry.family, "#ffffff")
        shape = ", shape=ellipse" if entry.source else ""
        pen = ", penwidth=2" if any(layer.is_loss for layer in node.layers) else ""
        label = _label(node, messages)
        out.append(f"  {_q(node.id)} [label={label}, fillcolor={_q(colour)}{shape}{pen}];")
    seen: set[tuple[str, str, str]] = set()
    for layer in graph.layers:
        dst = node_of[layer.name]
        for b in layer.bottoms:
            v = graph.value(b)
            src = node_of[v.producer]
            if src == dst or (src, dst, b) in seen:
                continue
            seen.add((src, dst, b))
            out.append(f"  {_q(src)} -> {_q(dst)} [label={_q(f'{v.blob} {_shape(v.shape)}')}];")
    for vid in graph.outputs:
        v = graph.value(vid)
        sink = f"output:{vid}"
        out.append(f'  {_q(sink)} [label={_q(v.blob)}, shape=plaintext, style=""];')
        label = _q(_shape(v.shape))
        out.append(f"  {_q(node_of[v.producer])} -> {_q(sink)} [label={label}];")
    out.append("}")
    return "\n".join(out) + "\n"


def output_format(path: str | os.PathLike) -> str:
    """``dot`` for DOT text, else the Graphviz -T format the extension names."""
    ext = Path(path).suffix.lower()
    if ext in DOT_EXTENSIONS:
        return "dot"
    if ext not in FORMATS:
        allowed = ", ".join([*FORMATS, *DOT_EXTENSIONS])
        raise InputError(f"-o {path}: cannot tell the picture format from '{ext}'; use {allowed}")
    return FORMATS[ext]


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def render(dot_text: str, path: str | os.PathLike) -> tuple[Path, str | None]:
    """Write ``dot_text`` to ``path`` as the picture its extension names.

    Returns (file written, note). Without Graphviz (or if ``dot`` fails) the DOT text goes to
    ``path`` with a ``.dot`` suffix and the note says so in one line.
    """
    out = Path(path)
    fmt = output_format(out)
    if fmt == "dot":
        _write_text(out, dot_text)
        return out, None
    fallback = out.with_suffix(".dot")
    exe = shutil.which("dot")
    if exe is None:
        _write_text(fallback, dot_text)
        return fallback, (
            f"Graphviz 'dot' is not installed (not on PATH), so {out} was not drawn; wrote the "
            f"DOT text to {fallback} (render it with: dot -T{fmt} {fallback} -o {out})"
        )
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    try:
        done = subprocess.run(
            [exe, f"-T{fmt}", "-o", str(tmp)], input=dot_text, capture_output=True, text=True
        )
        if done.returncode == 0:
            os.replace(tmp, out)
            return out, None
    finally:
        if tmp.exists():
            tmp.unlink()
    _write_text(fallback, dot_text)
    why = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[0]
    return fallback, f"Graphviz 'dot' failed ({why}); wrote the DOT text to {fallback}"

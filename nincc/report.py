"""What `nincc inspect` shows: per-layer rows (shapes, params, FLOPs, lowering), as a table,
JSON or DOT."""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from . import layers as table
from .ir import Graph
from .layers.base import count


@dataclass(frozen=True)
class LayerRow:
    name: str
    type: str
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    top_shapes: tuple[tuple[int, ...], ...]
    params: int
    flops: int
    lowering: str


def lowering(layer, bottom_shapes, phase: str) -> str:
    """The lowering a compiled net runs ``layer`` with: "fast" (nincc.fast's) or "table" (the
    layer table's); "fast, oneDNN" for a convolution run by oneDNN (nincc.onednn), and in a
    TRAIN net "fast, FFT" (and its tiles) for one the train step runs through the FFT
    (nincc.fftconv: on the CPU backend, unless NINCC_FFT=0)."""
    from .compile import choose_lowering
    from .fast import backward_note, forward_note

    kind = choose_lowering(layer, bottom_shapes)[1]
    if kind == "fast":
        note = (backward_note if phase == "TRAIN" else forward_note)(
            layer.type, layer.attrs, bottom_shapes
        )
        if note:
            return f"fast, {note}"
    return kind


def layer_rows(graph: Graph) -> list[LayerRow]:
    """One row per layer; a shared param blob counts once, with its owner. A layer whose
    output a compiled step holds in oneDNN's blocked layout (nincc.blocked) says so after its
    lowering."""
    from .compile import blocked_placements

    placed = blocked_placements(graph)
    rows = []
    for layer in graph.layers:
        entry = table.REGISTRY[layer.type]
        bshapes = [graph.value(b).shape for b in layer.bottoms]
        tshapes = [graph.value(t).shape for t in layer.tops]
        rows.append(
            LayerRow(
                name=layer.name,
                type=layer.type,
                bottoms=tuple(graph.value(b).blob for b in layer.bottoms),
                tops=tuple(graph.value(t).blob for t in layer.tops),
                top_shapes=tuple(tshapes),
                params=sum(count(p.shape) for p in layer.params if p.share is None),
                flops=int(entry.flops(layer.attrs, bshapes, tshapes)),
                lowering=lowering(layer, bshapes, graph.phase)
                + (f", {placed[layer.name].dst}" if layer.name in placed else ""),
            )
        )
    return rows


def totals(rows: list[LayerRow]) -> dict[str, int]:
    params = sum(r.params for r in rows)
    return {"params": params, "param_bytes": 4 * params, "flops": sum(r.flops for r in rows)}


def human(n: float, unit: str = "", binary: bool = False) -> str:
    """``n`` with a metric suffix (K = 1000) or, with ``binary``, an IEC one (Ki = 1024)."""
    base = 1024 if binary else 1000
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi") if binary else ("", "K", "M", "G", "T", "P")
    for suffix in suffixes[:-1]:
        if abs(n) < base:  # 1000 to 1023 (binary) print whole, not as 1.02e+03
            digits = f"{n:.3g}" if abs(n) < 1000 else f"{n:.0f}"
            return f"{digits}{suffix}{unit}" if suffix else f"{int(n)}{unit}"
        n /= base
    return f"{n:.3g}{suffixes[-1]}{unit}"


_human = human


def format_table(
    head: Sequence[str],
    body: Sequence[Sequence[str]],
    foot: Sequence[str] | None = None,
    right: Collection[int] = (),
) -> str:
    """Fixed-width columns separated by two spaces, the ``right`` ones right-aligned; dashed
    rules under the head and above the foot."""
    rows = [head, *body, *([foot] if foot else [])]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = [line(head), sep, *(line(r) for r in body)]
    if foot:
        out += [sep, line(foot)]
    return "\n".join(out)


def as_table(graph: Graph) -> str:
    """A fixed-width table with totals at the bottom."""
    rows = layer_rows(graph)
    head = ("layer", "type", "bottoms -> tops", "top shapes", "params", "FLOPs", "lowering")
    body = [
        (
            r.name,
            r.type,
            f"{', '.join(r.bottoms)} -> {', '.join(r.tops)}",
            " ".join("x".join(map(str, s)) if s else "()" for s in r.top_shapes),
            f"{r.params:,}",
            _human(r.flops),
            r.lowering,
        )
        for r in rows
    ]
    t = totals(rows)
    foot = (
        "total",
        f"{len(rows)} layers",
        "",
        "",
        f"{t['params']:,}",
        _human(t["flops"]),
        "",
    )
    widths = [max(len(str(x[i])) for x in [head, *body, foot]) for i in range(len(head))]

    def line(cells):
        return "  ".join(
            str(c).rjust(w) if i in (4, 5) else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    out = [f"net {graph.name or '(unnamed)'}, phase {graph.phase}", line(head), sep]
    out += [line(b) for b in body]
    out += [
        sep,
        line(foot),
        f"parameters: {t['params']:,} ({t['param_bytes'] / 2**20:.1f} MiB float32)",
    ]
    out += [f"note: {n}" for n in graph.notes]
    return "\n".join(out)


def as_dict(graph: Graph) -> dict:
    """The JSON document of `nincc inspect --format json` (documented in the README)."""
    rows = layer_rows(graph)
    return {
        "name": graph.name,
        "phase": graph.phase,
        "inputs": {graph.value(v).blob: list(graph.value(v).shape) for v in graph.inputs},
        "outputs": [graph.value(v).blob for v in graph.outputs],
        "layers": [
            {
                "name": r.name,
                "type": r.type,
                "bottoms": list(r.bottoms),
                "tops": list(r.tops),
                "top_shapes": [list(s) for s in r.top_shapes],
                "params": r.params,
                "flops": r.flops,
                "lowering": r.lowering,
            }
            for r in rows
        ],
        "totals": totals(rows),
    }


def as_json(graph: Graph) -> str:
    return json.dumps(as_dict(graph), indent=1)


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def as_dot(graph: Graph) -> str:
    """Graphviz DOT: layers as boxes, values as edges labelled with blob name and shape."""
    out = [f"digraph {_q(graph.name or 'net')} {{", "  rankdir=TB;", "  node [shape=box];"]
    producer = {t: layer.name for layer in graph.layers for t in layer.tops}
    for layer in graph.layers:
        out.append(f"  {_q(layer.name)} [label={_q(layer.name + chr(10) + layer.type)}];")
        for b in layer.bottoms:
            v = graph.value(b)
            label = f"{v.blob} {'x'.join(map(str, v.shape))}"
            out.append(f"  {_q(producer[b])} -> {_q(layer.name)} [label={_q(label)}];")
    out.append("}")
    return "\n".join(out)


def supported_layers() -> str:
    """`nincc layers`: the table, generated from the registry."""
    lines = []
    for name in sorted(table.REGISTRY):
        e = table.REGISTRY[name]
        alias = f" (also {', '.join(e.aliases)})" if e.aliases else ""
        lines.append(f"{name:<28} {e.family:<14} {e.doc}{alias}")
    return "\n".join(lines)

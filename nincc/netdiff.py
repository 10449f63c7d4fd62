"""`nincc diff`: what differs between two nets, compared as built graphs, phase by phase.

Both files are parsed and upgraded (V0/V1 files compare as their current form), then built for
the same NetState, so two spellings of one net (``kernel_size: 3`` and an upgraded V1 layer, a
default written out or left implicit) show no difference. Layers are matched by name; a removed
and an added layer that agree in everything but the name are reported as a rename. For each
layer the type, the bottoms and tops (blob names), the resolved settings, the parameter blobs
(shapes, lr/decay multipliers, fillers, sharing), loss weights and propagate_down are compared;
then the blob shapes, the parameter counts and the net's inputs and outputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .build import PHASES, layer_included, net_state
from .ir import Graph, Layer, ParamSpec
from .layers.base import count


@dataclass(frozen=True)
class LayerChange:
    """One layer's difference: ``kind`` is added, removed, renamed or changed."""

    kind: str
    name: str
    type: str
    details: tuple[str, ...] = ()


@dataclass(frozen=True)
class PhaseDiff:
    """The differences between two nets in one phase (empty lists: the same graph)."""

    phase: str
    layers: list[LayerChange] = field(default_factory=list)
    blobs: list[str] = field(default_factory=list)
    net: list[str] = field(default_factory=list)
    params: tuple[int, int] = (0, 0)

    @property
    def same(self) -> bool:
        return not (self.layers or self.blobs or self.net) and self.params[0] == self.params[1]


def _shape(shape: Sequence[int]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _fmt(value: Any) -> str:
    if dataclasses.is_dataclass(value):
        return (
            type(value).__name__
            + "("
            + ", ".join(
                f"{f.name}={_fmt(getattr(value, f.name))}" for f in dataclasses.fields(value)
            )
            + ")"
        )
    if isinstance(value, tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, float):  # settings are float32 in caffe.proto: print them as written
        return str(np.float32(value))
    return str(value)


def _field_changes(prefix: str, a: Any, b: Any) -> list[str]:
    """``name: old -> new`` for each differing field of two dataclass values (recursing)."""
    if a == b:
        return []
    if dataclasses.is_dataclass(a) and type(a) is type(b):
        out = []
        for f in dataclasses.fields(a):
            name = f"{prefix}.{f.name}" if prefix else f.name
            out += _field_changes(name, getattr(a, f.name), getattr(b, f.name))
        return out
    return [f"{prefix or 'settings'}: {_fmt(a)} -> {_fmt(b)}"]


def _param_changes(a: Sequence[ParamSpec], b: Sequence[ParamSpec]) -> list[str]:
    """Blob count, shape, multiplier and sharing changes (fillers come from the settings, which
    are compared already)."""
    out = []
    if len(a) != len(b):
        out.append(f"parameter blobs: {len(a)} -> {len(b)}")
    for i, (pa, pb) in enumerate(zip(a, b)):
        if pa.shape != pb.shape:
            out.append(f"param {i} shape: {_shape(pa.shape)} -> {_shape(pb.shape)}")
        for name in ("lr_mult", "decay_mult", "state", "name", "share"):
            va, vb = getattr(pa, name), getattr(pb, name)
            if va != vb:
                out.append(f"param {i} {name}: {_fmt(va)} -> {_fmt(vb)}")
    return out


def _owned(layer: Layer) -> int:
    return sum(count(p.shape) for p in layer.params if p.share is None)


def _blob_names(graph: Graph, ids: Sequence[str]) -> tuple[str, ...]:
    return tuple(graph.value(v).blob for v in ids)


def layer_changes(ga: Graph, la: Layer, gb: Graph, lb: Layer) -> list[str]:
    """Every difference between two layers of the same name (empty: the same layer)."""
    out = []
    if la.type != lb.type:
        out.append(f"type: {la.type} -> {lb.type}")
    for what, xa, xb in (
        ("bottoms", _blob_names(ga, la.bottoms), _blob_names(gb, lb.bottoms)),
        ("tops", _blob_names(ga, la.tops), _blob_names(gb, lb.tops)),
    ):
        if xa != xb:
            out.append(f"{what}: {', '.join(xa) or '-'} -> {', '.join(xb) or '-'}")
    if la.type == lb.type:
        out += _field_changes("", la.attrs, lb.attrs)
    out += _param_changes(la.params, lb.params)
    if _owned(la) != _owned(lb):
        out.append(f"params: {_owned(la):,} -> {_owned(lb):,}")
    if la.loss_weights != lb.loss_weights:
        out.append(f"loss_weight: {_fmt(la.loss_weights)} -> {_fmt(lb.loss_weights)}")
    if la.propagate_down != lb.propagate_down:
        out.append(f"propagate_down: {_fmt(la.propagate_down)} -> {_fmt(lb.propagate_down)}")
    return out


def _signature(graph: Graph, layer: Layer) -> tuple:
    """Everything but the name, for telling a rename from a remove + add."""
    params = tuple(dataclasses.replace(p, name="", share=None) for p in layer.params)
    return (
        layer.type,
        layer.attrs,
        _blob_names(graph, layer.bottoms),
        _blob_names(graph, layer.tops),
        params,
        layer.loss_weights,
    )


def _blob_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    return {b: graph.value(v).shape for b, v in graph.blob_values().items()}


def diff_graphs(a: Graph, b: Graph) -> PhaseDiff:
    """The differences between two graphs built for the same NetState."""
    la = {layer.name: layer for layer in a.layers}
    lb = {layer.name: layer for layer in b.layers}
    changes: list[LayerChange] = []
    removed = [n for n in la if n not in lb]
    added = [n for n in lb if n not in la]
    by_sig: dict[tuple, list[str]] = {}
    for n in added:
        by_sig.setdefault(_signature(b, lb[n]), []).append(n)
    for n in list(removed):
        twins = by_sig.get(_signature(a, la[n]))
        if twins:
            new = twins.pop(0)
            removed.remove(n)
            added.remove(new)
            changes.append(LayerChange("renamed", n, la[n].type, (f"now named '{new}'",)))
    for n in removed:
        layer = la[n]
        io = f"{', '.join(_blob_names(a, layer.bottoms)) or '-'} -> "
        io += ", ".join(_blob_names(a, layer.tops)) or "-"
        changes.append(LayerChange("removed", n, layer.type, (io,)))
    for n in added:
        layer = lb[n]
        io = f"{', '.join(_blob_names(b, layer.bottoms)) or '-'} -> "
        io += ", ".join(_blob_names(b, layer.tops)) or "-"
        changes.append(LayerChange("added", n, layer.type, (io,)))
    for n, layer in la.items():
        if n in lb:
            details = layer_changes(a, layer, b, lb[n])
            if details:
                changes.append(LayerChange("changed", n, layer.type, tuple(details)))
    net: list[str] = []
    common_a = [n for n in la if n in lb]
    common_b = [n for n in lb if n in la]
    if common_a != common_b:
        net.append("the order of the common layers changed")
    if a.name != b.name:
        net.append(f"net name: {a.name!r} -> {b.name!r}")
    ins_a = {a.value(v).blob: a.value(v).shape for v in a.inputs}
    ins_b = {b.value(v).blob: b.value(v).shape for v in b.inputs}
    if ins_a != ins_b:
        net.append(f"inputs: {_io_text(ins_a)} -> {_io_text(ins_b)}")
    outs_a, outs_b = sorted(_blob_names(a, a.outputs)), sorted(_blob_names(b, b.outputs))
    if outs_a != outs_b:
        net.append(f"outputs: {', '.join(outs_a) or '-'} -> {', '.join(outs_b) or '-'}")
    if a.force_backward != b.force_backward:
        net.append(f"force_backward: {a.force_backward} -> {b.force_backward}")
    sa, sb = _blob_shapes(a), _blob_shapes(b)
    blobs = [f"- {k} {_shape(s)}" for k, s in sa.items() if k not in sb]
    blobs += [f"+ {k} {_shape(s)}" for k, s in sb.items() if k not in sa]
    blobs += [
        f"~ {k} {_shape(s)} -> {_shape(sb[k])}" for k, s in sa.items() if k in sb and s != sb[k]
    ]
    total = (sum(_owned(x) for x in a.layers), sum(_owned(x) for x in b.layers))
    return PhaseDiff(a.phase, changes, blobs, net, total)


def _io_text(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{k} {_shape(s)}" for k, s in shapes.items()) or "-"


def _has_layers(net: Any, phase: str, level: int | None, stages: Sequence[str]) -> bool:
    state = net_state(net, phase, level, stages)
    return any(layer_included(m, state) for m in net.layer)


def diff_nets(
    a: Any,
    b: Any,
    phases: Sequence[str] = PHASES,
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> tuple[list[PhaseDiff], list[str]]:
    """Compare two nets (paths, texts or NetParameters) in each phase.

    Returns (per-phase differences, notes); a phase in which neither net has layers is skipped
    with a note, one in which only one net has layers is a difference.
    """
    from . import load_graph, load_net_param

    na, nb = load_net_param(a), load_net_param(b)
    diffs, notes = [], []
    for phase in phases:
        has = (_has_layers(na, phase, level, stages), _has_layers(nb, phase, level, stages))
        if not any(has):
            notes.append(f"neither net has layers in phase {phase}")
            continue
        if not all(has):
            which = "second" if has[0] else "first"
            diffs.append(PhaseDiff(phase, net=[f"the {which} net has no layers in phase {phase}"]))
            continue
        ga = load_graph(na, phase, level, stages, input_shapes)
        gb = load_graph(nb, phase, level, stages, input_shapes)
        diffs.append(diff_graphs(ga, gb))
    return diffs, notes


_MARK = {"added": "+", "removed": "-", "renamed": "~", "changed": "~"}


def format_diff(diffs: Sequence[PhaseDiff], notes: Sequence[str] = ()) -> str:
    """The text `nincc diff` prints: per phase, the layer, blob and net-level differences."""
    out: list[str] = []
    same = [d.phase for d in diffs if d.same]
    for d in diffs:
        if d.same:
            continue
        out.append(f"phase {d.phase}:")
        out += [f"  {line}" for line in d.net]
        for c in d.layers:
            out.append(f"  {_MARK[c.kind]} {c.kind} layer {c.name} ({c.type})")
            out += [f"      {x}" for x in c.details]
        if d.blobs:
            out.append("  blob shapes:")
            out += [f"    {line}" for line in d.blobs]
        pa, pb = d.params
        if pa != pb:
            out.append(f"  parameters: {pa:,} -> {pb:,} ({pb - pa:+,})")
        else:
            out.append(f"  parameters: {pa:,} (unchanged)")
    if same:
        out.append(f"no differences in phase {', '.join(same)}")
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)

"""NetParameter + NetState → Graph: filtering, in-place blobs, shared params, shape inference.

This follows Caffe's Net::Init: layers are filtered by the NetState's include/exclude rules,
then visited in order; a bottom must have been written by an earlier layer; a top whose name
equals the bottom at the same index is in-place; any other reuse of a name is an error.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from . import layers as table
from .errors import GraphError, NinccError, ShapeError
from .ir import Graph, Layer, ParamSpec, Value
from .layers.base import BlobSpec, Filler, Shape

PHASES = ("TRAIN", "TEST")
AUTO_TOP = "(automatic)"


@dataclass(frozen=True)
class NetState:
    """Caffe's NetState: the phase, level and stages that include/exclude rules test."""

    phase: str = "TEST"
    level: int = 0
    stages: tuple[str, ...] = ()


def _phase_name(value: int) -> str:
    return PHASES[value]


def state_meets_rule(state: NetState, rule: Any) -> bool:
    """Caffe's Net::StateMeetsRule for one NetStateRule message."""
    if rule.HasField("phase") and _phase_name(rule.phase) != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(s not in state.stages for s in rule.stage):
        return False
    return not any(s in state.stages for s in rule.not_stage)


def layer_included(msg: Any, state: NetState) -> bool:
    """Caffe's FilterNet rule: no include rules → in unless excluded; include rules → in if any."""
    if len(msg.include) and len(msg.exclude):
        raise GraphError(
            f"layer '{msg.name}' has both include and exclude rules; Caffe allows only one kind"
        )
    included = len(msg.include) == 0
    for rule in msg.exclude:
        if state_meets_rule(state, rule):
            included = False
    for rule in msg.include:
        if state_meets_rule(state, rule):
            included = True
    return included


def net_state(net: Any, phase: str | None, level: int | None, stages: Sequence[str]) -> NetState:
    """The NetState Caffe uses: the file's `state`, with phase/level overridden and stages added."""
    if phase is not None and phase not in PHASES:
        raise GraphError(f"unknown phase {phase!r}; use TRAIN or TEST")
    file_phase = _phase_name(net.state.phase) if net.HasField("state") else "TEST"
    return NetState(
        phase=phase or file_phase,
        level=net.state.level if level is None else level,
        stages=tuple(net.state.stage) + tuple(stages),
    )


def _param_specs(msg: Any, layer_name: str, specs: list[BlobSpec], owners: dict) -> list[ParamSpec]:
    if len(msg.param) > len(specs):
        raise GraphError(
            f"layer '{layer_name}' gives {len(msg.param)} param {{}} specs but has "
            f"{len(specs)} learnable blobs"
        )
    out = []
    for i, spec in enumerate(specs):
        lr, decay, name = spec.lr_mult, spec.decay_mult, ""
        if i < len(msg.param):
            p = msg.param[i]
            lr = p.lr_mult if p.HasField("lr_mult") else lr
            decay = p.decay_mult if p.HasField("decay_mult") else decay
            name = p.name
        share = None
        if name:
            if name in owners:
                owner, idx, shape = owners[name]
                if _count(shape) != _count(spec.shape):
                    raise ShapeError(
                        f"layer '{layer_name}' shares param '{name}' with layer '{owner}' but the "
                        f"shapes differ: {list(spec.shape)} vs {list(shape)}"
                    )
                share = (owner, idx)
            else:
                owners[name] = (layer_name, i, spec.shape)
        out.append(
            ParamSpec(
                shape=tuple(spec.shape),
                filler=spec.filler,
                lr_mult=float(lr),
                decay_mult=float(decay),
                state=spec.state,
                name=name,
                share=share,
            )
        )
    return out


def _source_shapes(entry, attrs, tops: Sequence[str], overrides: Mapping) -> list[Shape]:
    """A source layer's top shapes with the caller's overrides applied. When the layer cannot
    tell its own shapes (its database is absent), tops not overridden are labels: (N,)."""
    try:
        own = [tuple(int(d) for d in s) for s in entry.shape(attrs, [])]
    except NinccError:
        batch = next(overrides[t][0] for t in tops if t in overrides and overrides[t])
        own = [(batch,)] * len(tops)
    return [overrides.get(t, s) for t, s in zip(tops, own)]


def _count(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _arity_ok(n: int, bounds: tuple[int, int | None]) -> bool:
    lo, hi = bounds
    return n >= lo and (hi is None or n <= hi)


def _arity_text(bounds: tuple[int, int | None]) -> str:
    lo, hi = bounds
    if hi == lo:
        return str(lo)
    return f"at least {lo}" if hi is None else f"{lo} to {hi}"


def build_graph(
    net: Any,
    phase: str | None = None,
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    insert_splits: bool = False,
) -> Graph:
    """Build the Graph of a current-format NetParameter for one NetState.

    ``input_shapes`` overrides the shapes of source layers' tops by blob name (e.g. a Data layer
    whose database is not at hand). ``insert_splits`` adds Caffe's implicit Split layers, so the
    graph's blobs are named exactly as Caffe's are.
    """
    state = net_state(net, phase, level, stages)
    overrides = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    current: dict[str, str] = {}  # blob name → current value id
    producers: dict[str, str] = {}  # blob name → first producing layer (for messages)
    values: list[Value] = []
    built: list[Layer] = []
    owners: dict[str, tuple[str, int, Shape]] = {}
    inputs: list[str] = []
    names: set[str] = set()
    for msg in net.layer:
        if not layer_included(msg, state):
            continue
        name = msg.name or f"layer{len(built)}"
        entry = table.lookup(msg.type, name)
        where = f"layer '{name}' ({msg.type})"
        if name in names:
            raise GraphError(f"{where}: another layer already has this name")
        names.add(name)
        top_names = list(msg.top)
        if entry.loss and not top_names:
            top_names = [AUTO_TOP]  # Caffe's AutoTopBlobs: a loss with no top still gets one
        nb, nt = len(msg.bottom), len(top_names)
        if not _arity_ok(nb, entry.n_bottoms):
            raise GraphError(
                f"{where} takes {_arity_text(entry.n_bottoms)} bottom(s), "
                f"got {nb}: {list(msg.bottom)}"
            )
        if not _arity_ok(nt, entry.n_tops):
            raise GraphError(
                f"{where} makes {_arity_text(entry.n_tops)} top(s), got {nt}: {list(msg.top)}"
            )
        try:
            attrs = entry.attrs(msg)
        except NinccError as e:
            raise type(e)(f"{where}: {e}") from None
        bottoms = []
        for b in msg.bottom:
            if b not in current:
                later = any(b in m.top for m in net.layer)
                why = " (it is produced only by a later layer)" if later else ""
                raise GraphError(f"{where}: unknown bottom blob '{b}'{why}")
            bottoms.append(current[b])
        bshapes = [values_by_id(values, v).shape for v in bottoms]
        try:
            if entry.source and any(t in overrides for t in top_names):
                tshapes = _source_shapes(entry, attrs, top_names, overrides)
            else:
                tshapes = [tuple(int(d) for d in s) for s in entry.shape(attrs, bshapes)]
            specs = entry.blobs(attrs, bshapes)
        except NinccError as e:
            raise type(e)(f"{where}: {e}") from None
        if len(tshapes) < nt:
            raise GraphError(f"{where} makes {len(tshapes)} top(s), got {nt}: {top_names}")
        tshapes = tshapes[:nt]
        tops = []
        for j, t in enumerate(top_names):
            inplace = j < nb and msg.bottom[j] == t
            if t in current and not inplace:
                raise GraphError(
                    f"{where}: top blob '{t}' is already produced by layer '{producers[t]}' "
                    "(a blob may be rewritten only in place, as top == bottom)"
                )
            vid = f"{t}@{name}" if inplace or t == AUTO_TOP else t
            if any(v.id == vid for v in values):
                vid = f"{t}@{name}#{j}"
            values.append(Value(vid, t, tshapes[j], name))
            producers.setdefault(t, name)
            if t != AUTO_TOP:
                current[t] = vid
            tops.append(vid)
            if entry.source:
                inputs.append(vid)
        params = _param_specs(msg, name, list(specs), owners)
        weights = list(msg.loss_weight)
        if weights and len(weights) != nt:
            raise GraphError(f"{where}: {len(weights)} loss_weight values for {nt} tops")
        if not weights:
            weights = [1.0 if (entry.loss and j == 0) else 0.0 for j in range(nt)]
        prop = list(msg.propagate_down)
        if prop and len(prop) != nb:
            raise GraphError(f"{where}: {len(prop)} propagate_down values for {nb} bottoms")
        built.append(
            Layer(
                name=name,
                type=entry.name,
                attrs=attrs,
                bottoms=tuple(bottoms),
                tops=tuple(tops),
                params=tuple(params),
                loss_weights=tuple(float(w) for w in weights),
                propagate_down=tuple(bool(p) for p in prop) or (True,) * nb,
                written_type=msg.type,
                explicit_loss=len(msg.loss_weight) > 0,
            )
        )
    if not built:
        raise GraphError(
            f"net '{net.name}' has no layers in phase {state.phase}"
            + (f" with stages {list(state.stages)}" if state.stages else "")
        )
    consumed = {b for layer in built for b in layer.bottoms}
    outputs = tuple(
        v.id
        for v in values
        if v.id not in consumed and current.get(v.blob) == v.id  # anonymous tops are no outputs
    )
    graph = Graph(
        name=net.name,
        phase=state.phase,
        layers=tuple(built),
        values=tuple(values),
        inputs=tuple(inputs),
        outputs=outputs,
        force_backward=bool(net.force_backward),
    )
    graph.verify()
    return insert_split_layers(graph) if insert_splits else graph


def values_by_id(values: list[Value], vid: str) -> Value:
    for v in reversed(values):
        if v.id == vid:
            return v
    raise KeyError(vid)


def insert_split_layers(graph: Graph) -> Graph:
    """Caffe's InsertSplits: a value read by several layers (or read and weighted as a loss)
    is fanned out by a Split layer named ``<blob>_<producer>_<top index>_split``."""
    uses: dict[str, int] = {}
    for layer in graph.layers:
        for b in layer.bottoms:
            uses[b] = uses.get(b, 0) + 1
    for layer in graph.layers:
        for t, w in zip(layer.tops, layer.loss_weights):
            if w and layer.explicit_loss and t in uses:  # Caffe counts written weights only
                uses[t] += 1
    split_entry = table.lookup("Split")
    layers: list[Layer] = []
    split_values: dict[str, Value] = {}
    renamed: dict[str, list[str]] = {}
    for layer in graph.layers:
        bottoms = []
        for b in layer.bottoms:
            bottoms.append(renamed[b].pop(0) if b in renamed else b)
        weights = list(layer.loss_weights)
        new_layer = replace(layer, bottoms=tuple(bottoms))
        splits = []
        for j, t in enumerate(layer.tops):
            n = uses.get(t, 0)
            if n <= 1:
                continue
            v = graph.value(t)
            sname = f"{v.blob}_{layer.name}_{j}_split"
            tops = [f"{sname}_{k}" for k in range(n)]
            for top in tops:
                split_values[top] = Value(top, top, v.shape, sname)
            split_w = [0.0] * n
            if weights[j] and layer.explicit_loss:
                split_w[0], weights[j] = weights[j], 0.0
            splits.append(
                Layer(
                    name=sname,
                    type="Split",
                    attrs=split_entry.attrs(None),
                    bottoms=(t,),
                    tops=tuple(tops),
                    loss_weights=tuple(split_w),
                    propagate_down=(True,),
                    written_type="Split",
                )
            )
            # a loss-weighted use is the last split top (Caffe keeps top 0 for the loss)
            renamed[t] = tops[1:] if split_w[0] else tops
        layers.append(replace(new_layer, loss_weights=tuple(weights)))
        layers.extend(splits)
    values = [
        split_values[t] if t in split_values else graph.value(t)
        for layer in layers
        for t in layer.tops
    ]
    consumed = {b for layer in layers for b in layer.bottoms}
    last = {v.blob: v.id for v in values if v.blob != AUTO_TOP}
    outputs = tuple(v.id for v in values if v.id not in consumed and last.get(v.blob) == v.id)
    out = Graph(
        name=graph.name,
        phase=graph.phase,
        layers=tuple(layers),
        values=tuple(values),
        inputs=graph.inputs,
        outputs=outputs,
        force_backward=graph.force_backward,
        notes=graph.notes,
    )
    out.verify()
    return out


def default_filler() -> Filler:
    return Filler()

"""The layer definitions a Caffe Net holds after setup, as `Net::ToProto` writes them.

A .caffemodel Caffe writes is not the prototxt it read: `Net::Init` filters the layers for the
NetState, inserts Split layers (renaming the bottoms that read a shared top), sets every layer's
`phase`, and layers edit their own definition during setup (a loss layer without `loss_weight`
gets `loss_weight: 1`; BatchNorm appends `param { lr_mult: 0 }` for each statistics blob without
a spec). `net_to_proto` rebuilds that message from the net definition and its built Graph, so a
weights file nincc writes carries the same definitions Caffe's would.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import caffe_pb2
from .build import NetState, layer_included, net_state
from .errors import GraphError
from .ir import Graph, Layer
from .layers.base import lookup

__all__ = ["full_blobs", "included_layers", "net_to_proto", "owned_blobs"]


def included_layers(net: Any, state: NetState) -> list[Any]:
    """The LayerParameters Caffe's FilterNet keeps for `state`, in order."""
    return [msg for msg in net.layer if layer_included(msg, state)]


def _phase_value(phase: str) -> int:
    return caffe_pb2.Phase.Value(phase)


def _explicit_loss_weight(msg: Any, top_index: int) -> float:
    """The loss weight InsertSplits sees for a top: only what the definition spells out."""
    return float(msg.loss_weight[top_index]) if top_index < len(msg.loss_weight) else 0.0


def _defined_layer(msg: Any, layer: Layer, graph: Graph, split_weighted: bool) -> Any:
    """A layer definition after InsertSplits, Net::Init and the layer's own SetUp."""
    out = caffe_pb2.LayerParameter()
    out.CopyFrom(msg)
    out.ClearField("blobs")
    del out.bottom[:]
    out.bottom.extend(graph.value(b).blob for b in layer.bottoms)
    if split_weighted:  # InsertSplits moves an explicit loss weight onto the Split layer
        out.ClearField("loss_weight")
    if not out.HasField("phase"):
        out.phase = _phase_value(graph.phase)
    if lookup(layer.type, layer.name).loss and not len(out.loss_weight):
        out.loss_weight.append(1.0)  # LossLayer::LayerSetUp: a loss counts once by default
    for index in range(len(out.param), len(layer.params)):
        if layer.params[index].state:
            # BatchNorm::LayerSetUp keeps running statistics out of the solver's reach.
            out.param.add(lr_mult=0.0)
    return out


def _split_layer(layer: Layer, graph: Graph, loss_weight: float) -> Any:
    """Caffe's ConfigureSplitLayer, with the phase Net::Init gives it."""
    out = caffe_pb2.LayerParameter(name=layer.name, type="Split")
    out.bottom.extend(graph.value(b).blob for b in layer.bottoms)
    out.top.extend(graph.value(t).blob for t in layer.tops)
    if loss_weight:
        out.loss_weight.extend([loss_weight] + [0.0] * (len(layer.tops) - 1))
    out.phase = _phase_value(graph.phase)
    return out


def net_to_proto(net: Any, graph: Graph, state: NetState | None = None) -> Any:
    """The NetParameter (name and layers, no blobs) Caffe's Net::ToProto writes for `net`
    built as `graph` (from `build_graph(net, ..., insert_splits=True)`; a graph without Split
    layers gives the definitions Caffe would hold for a net whose blobs each have one reader).

    `state` is the NetState the graph was built for; by default the graph's phase with the
    net's own level and stages. A graph that does not follow the net's filtered layers raises
    GraphError.
    """
    if len(net.layers):
        raise GraphError(
            f"net '{net.name}' uses legacy V1 'layers': upgrade it (nincc.load_net_param) first"
        )
    state = state or net_state(net, graph.phase, None, ())
    definitions = included_layers(net, state)
    producers: dict[str, tuple[Any, int]] = {}  # value id -> (definition, top index)
    out = caffe_pb2.NetParameter(name=net.name)
    pending: list[tuple[Layer, Any]] = []  # graph layers paired with their definitions
    index = 0
    for layer in graph.layers:
        msg = definitions[index] if index < len(definitions) else None
        if msg is not None and layer.name == (msg.name or f"layer{index}"):
            pending.append((layer, msg))
            for j, top in enumerate(layer.tops):
                producers[top] = (msg, j)
            index += 1
        elif layer.type == "Split" and layer.name.endswith("_split"):
            pending.append((layer, None))
        else:
            raise GraphError(
                f"graph layer '{layer.name}' does not follow the definitions of net '{net.name}' "
                f"in phase {state.phase} (expected '{msg.name if msg is not None else 'none'}')"
            )
    if index != len(definitions):
        raise GraphError(
            f"graph of net '{net.name}' lacks layer '{definitions[index].name}' of phase "
            f"{state.phase}"
        )
    weighted_splits: set[int] = set()  # ids of definitions whose loss moved onto a Split
    split_weights: dict[str, float] = {}
    for layer, msg in pending:
        if msg is None:
            source, top_index = producers[layer.bottoms[0]]
            weight = _explicit_loss_weight(source, top_index)
            split_weights[layer.name] = weight
            if weight:
                weighted_splits.add(id(source))
    for layer, msg in pending:
        if msg is None:
            out.layer.append(_split_layer(layer, graph, split_weights[layer.name]))
        else:
            out.layer.append(_defined_layer(msg, layer, graph, id(msg) in weighted_splits))
    return out


def full_blobs(graph: Graph, params: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """Every layer's blobs under Caffe's indices, shared ones copied from their owner in the
    sharing layer's shape, as Net::ToProto writes them. `params` holds each layer's owned blobs
    in order (`match_weights`' result, the params pytree)."""
    out: dict[str, list[Any]] = {}
    for layer in graph.layers:
        if not layer.params:
            continue
        blobs = []
        for index, spec in enumerate(layer.params):
            owner, owner_index = spec.share or (layer.name, index)
            source = params[owner][graph.layer(owner).owned_position(owner_index)]
            blobs.append(np.reshape(np.asarray(source, np.float32), spec.shape))
        out[layer.name] = blobs
    return out


def owned_blobs(graph: Graph, params: Mapping[str, Sequence[Any]]) -> dict[str, list[Any]]:
    """Every layer's blobs under Caffe's indices with None where the layer shares a blob, as
    Net::ToHDF5 writes them (only owners store data)."""
    out: dict[str, list[Any]] = {}
    for layer in graph.layers:
        if any(spec.share is None for spec in layer.params):
            out[layer.name] = [
                None
                if spec.share
                else np.asarray(params[layer.name][layer.owned_position(index)], np.float32)
                for index, spec in enumerate(layer.params)
            ]
    return out

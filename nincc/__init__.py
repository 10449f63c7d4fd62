"""nincc: Caffe networks compiled to jitted JAX.

The public API::

    import nincc
    graph = nincc.load_graph("zoo/nin_cifar10_deploy.prototxt", phase="TEST")
    net = nincc.compile(graph)                 # or nincc.load("...") for both steps
    params = net.init(seed=0)                  # Caffe's fillers
    blobs = net.apply(params, {"data": x})     # {blob name: array}, jitted
    probs = net.bind(params).outputs({"data": x})  # weights placed once: repeated inference
    loss = net.loss(params, {"data": x, "label": y})

Prototxt files in any format Caffe accepted (current, V1, V0) are upgraded on load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .build import NetState, build_graph
from .compile import BoundNet, CompiledNet, compile_graph
from .errors import (
    DataError,
    GraphError,
    InputError,
    NinccError,
    PrototxtError,
    ShapeError,
    SolverError,
    UnsupportedLayerError,
    UpgradeError,
    WeightsError,
)
from .ir import Graph, Layer, ParamSpec, Value
from .xla_flags import apply as _apply_xla_flags

_apply_xla_flags()  # before any JAX computation: XLA reads its flags once (nincc/xla_flags.py)

__version__ = "0.1.0"


def load_net_param(source: Any) -> Any:
    """A current-format caffe_pb2.NetParameter from a path, prototxt text or a message."""
    from . import prototxt

    if hasattr(source, "layer"):
        from .upgrade import upgrade_net

        return upgrade_net(source)[0]
    return prototxt.load_net(source)


def load_graph(
    source: Any,
    phase: str = "TEST",
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    insert_splits: bool = False,
) -> Graph:
    """Parse (and upgrade) a net and build its Graph for the given NetState."""
    return build_graph(
        load_net_param(source),
        phase=phase,
        level=level,
        stages=stages,
        input_shapes=input_shapes,
        insert_splits=insert_splits,
    )


def compile(graph: Graph, jit: bool = True, fast: bool | Sequence[str] = True) -> CompiledNet:  # noqa: A001
    """Compile a Graph to jitted JAX functions (see CompiledNet); ``fast=False`` keeps the
    layer table's reference lowerings only."""
    return compile_graph(graph, jit=jit, fast=fast)


def load(source: Any, phase: str = "TEST", **kwargs: Any) -> CompiledNet:
    """load_graph then compile, in one call."""
    return compile_graph(load_graph(source, phase=phase, **kwargs))


__all__ = [
    "BoundNet",
    "CompiledNet",
    "DataError",
    "Graph",
    "GraphError",
    "InputError",
    "Layer",
    "NetState",
    "NinccError",
    "ParamSpec",
    "PrototxtError",
    "ShapeError",
    "SolverError",
    "UnsupportedLayerError",
    "UpgradeError",
    "Value",
    "WeightsError",
    "build_graph",
    "compile",
    "compile_graph",
    "load",
    "load_graph",
    "load_net_param",
]

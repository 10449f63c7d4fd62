"""How a trainer holds weights between steps: Caffe's layout, or the one the kernels read.

Caffe stores a convolution's weights as (out, in, kh, kw). XLA's CPU convolutions read them
as (kh, kw, in, out), so a step that takes Caffe's layout transposes every k×k weight on the
way in, and its update reads the weight gradient back through the opposite transpose: about
45 ms of a 400 ms NIN ImageNet b16 step for its conv4 alone (docs/performance.md, section 16).
Held as (kh, kw, in, out) between steps, the weights need neither: the step converts them to
Caffe's layout inside the traced function, where XLA cancels that transpose against the
convolution's own, and the gradient comes back in the held layout. Every Caffe solver update is
element-wise (and gradient clipping uses the global norm), so the solver's history is held in
the same layout without changing a single value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import onednn
from .ir import Graph

# (out, in, kh, kw) -> (kh, kw, in, out) and back
_TO_HELD = (2, 3, 1, 0)
_TO_CAFFE = (3, 2, 0, 1)

Layout = dict[str, tuple[bool, ...]]


def kernel_layout(graph: Graph, pointwise: bool = False) -> Layout:
    """Layer name → for each blob it owns, whether it is held (kh, kw, in, out).

    Convolution weights only, and by default k×k ones only: a train step's 1x1 convolutions are
    matrix products, whose weight is an operand in either layout. ``pointwise`` holds 1x1
    weights too, for a forward without gradients, where they run as XLA convolutions
    (nincc.fast). A blob another layer type shares keeps Caffe's layout.

    Where oneDNN runs the convolutions (nincc.onednn), nothing is held: its primitives read
    Caffe's (out, in, kh, kw) directly, and a held layout would cost a transpose each way.
    """
    if onednn.enabled():
        return {}
    foreign = {
        spec.share
        for layer in graph.layers
        if layer.type != "Convolution"
        for spec in layer.params
        if spec.share is not None
    }
    out: Layout = {}
    for layer in graph.layers:
        if layer.type != "Convolution":
            continue
        owned = [(i, s) for i, s in enumerate(layer.params) if s.share is None]
        flags = tuple(
            i == 0
            and not s.state
            and len(s.shape) == 4
            and (pointwise or tuple(s.shape[2:]) != (1, 1))
            and (layer.name, i) not in foreign
            for i, s in owned
        )
        if any(flags):
            out[layer.name] = flags
    return out


def _map(tree: Mapping[str, Sequence[Any]], layout: Layout, axes: tuple[int, ...]) -> dict:
    return {
        name: [
            a.transpose(axes) if held else a
            for a, held in zip(blobs, layout.get(name, ()) + (False,) * len(blobs))
        ]
        for name, blobs in tree.items()
    }


def to_held(tree: Mapping[str, Sequence[Any]], layout: Layout) -> dict:
    """A params-shaped tree (weights, gradients, solver history) in Caffe's layout → held."""
    return _map(tree, layout, _TO_HELD)


def to_caffe(tree: Mapping[str, Sequence[Any]], layout: Layout) -> dict:
    """The inverse of :func:`to_held`."""
    return _map(tree, layout, _TO_CAFFE)

"""The intermediate graph: plain, immutable Python data (no protobuf, no JAX).

A :class:`Graph` is what a prototxt means for one NetState: the layers that survive filtering, in
Caffe's order, each reading and writing *values*. A value is one write of a Caffe blob: in-place
layers (top == bottom) create a new value that keeps the blob's name, so "the blob called conv1"
is the last value written under that name, exactly what Caffe would hold there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import GraphError
from .layers.base import Filler, Shape


@dataclass(frozen=True)
class ParamSpec:
    """One learnable blob of a layer after the prototxt's ``param {}`` overrides.

    ``share`` names the (layer, index) that owns the data when ``param { name }`` shares it; the
    params pytree holds only owners' blobs.
    """

    shape: Shape
    filler: Filler
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    state: bool = False
    name: str = ""
    share: tuple[str, int] | None = None


@dataclass(frozen=True)
class Value:
    """One write of a Caffe blob: its unique id, the blob's name, shape and producing layer."""

    id: str
    blob: str
    shape: Shape
    producer: str


@dataclass(frozen=True)
class Layer:
    """One layer after filtering: its table type, resolved attrs and value ids in and out."""

    name: str
    type: str
    attrs: Any
    bottoms: tuple[str, ...]
    tops: tuple[str, ...]
    params: tuple[ParamSpec, ...] = ()
    loss_weights: tuple[float, ...] = ()
    propagate_down: tuple[bool, ...] = ()
    written_type: str = ""
    explicit_loss: bool = False  # loss_weight written in the prototxt (Caffe's split rule)

    @property
    def is_loss(self) -> bool:
        return any(w != 0 for w in self.loss_weights)

    def owned_position(self, index: int) -> int:
        """Where Caffe blob ``index`` of this layer sits among the blobs it owns: the params
        pytree holds only owned blobs, so a shared blob before it shifts it down."""
        return sum(1 for spec in self.params[:index] if spec.share is None)


@dataclass(frozen=True)
class Graph:
    """A net for one NetState: layers in order, values, the fed inputs and the net outputs."""

    name: str
    phase: str
    layers: tuple[Layer, ...]
    values: tuple[Value, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    force_backward: bool = False
    notes: tuple[str, ...] = ()
    _index: dict = field(default=None, compare=False, hash=False, repr=False)  # type: ignore

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {v.id: v for v in self.values})

    def value(self, vid: str) -> Value:
        return self._index[vid]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(name)

    def blob_values(self) -> dict[str, str]:
        """Caffe blob name → id of the last value written under that name."""
        last: dict[str, str] = {}
        for v in self.values:
            last[v.blob] = v.id
        return last

    def first_values(self) -> dict[str, str]:
        """Caffe blob name → id of the first value written under that name (its diff's owner)."""
        first: dict[str, str] = {}
        for v in self.values:
            first.setdefault(v.blob, v.id)
        return first

    def param_shapes(self) -> dict[str, list[Shape]]:
        """Layer name → the shapes of the blobs it owns (the params pytree's layout)."""
        return {
            layer.name: [p.shape for p in layer.params if p.share is None]
            for layer in self.layers
            if any(p.share is None for p in layer.params)
        }

    def weight_slots(self) -> dict[str, list[Shape | None]]:
        """Every layer → its blob shapes as a weights file holds them (``None``: shared from
        another layer), the layout Caffe's CopyTrainedLayersFrom matches a file against."""
        return {
            layer.name: [None if p.share else p.shape for p in layer.params]
            for layer in self.layers
        }

    def verify(self) -> None:
        """Check the invariants build guarantees: values defined before use, unique ids."""
        seen: set[str] = set()
        if len(self._index) != len(self.values):
            raise GraphError(f"net '{self.name}': duplicate value ids")
        for layer in self.layers:
            for b in layer.bottoms:
                if b not in seen:
                    raise GraphError(f"layer '{layer.name}' reads value '{b}' before it is written")
            for t in layer.tops:
                if t in seen:
                    raise GraphError(f"layer '{layer.name}' rewrites value '{t}'")
                seen.add(t)

    def dump(self) -> str:
        """A short text listing: one line per layer with its values and shapes."""
        lines = [f"net {self.name!r} phase {self.phase}"]
        for layer in self.layers:
            ins = ", ".join(f"{b}{list(self.value(b).shape)}" for b in layer.bottoms)
            outs = ", ".join(f"{t}{list(self.value(t).shape)}" for t in layer.tops)
            lines.append(f"  {layer.name} ({layer.type}): {ins} -> {outs}")
        return "\n".join(lines)

"""The layer table's entry type and the registry every layer family registers into.

A Caffe layer type is one :class:`LayerType`, keyed by its exact Caffe type string. It holds:

- ``attrs(msg)``: the only code that reads protobuf; returns a frozen, hashable object with Caffe's
  defaults resolved (closed over by ``jax.jit``, so it must be hashable);
- ``shape(attrs, bottom_shapes)``: integer arithmetic only, no JAX, so ``nincc inspect`` is instant;
- ``blobs(attrs, bottom_shapes)``: the learnable blobs in Caffe's order with their fillers;
- ``lower(attrs, params, bottoms, ctx)``: the JAX code, NCHW arrays in, NCHW arrays out;
- ``flops(attrs, bottom_shapes, top_shapes)``: forward FLOPs (a multiply-add counts as 2).

build, compile, caffemodel, report and cli never name a layer type: adding a layer is one entry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ShapeError, UnsupportedLayerError

Shape = tuple[int, ...]


@dataclass(frozen=True)
class Filler:
    """Caffe's FillerParameter with its defaults (caffe.proto); see nincc.fillers for the maths."""

    type: str = "constant"
    value: float = 0.0
    min: float = 0.0
    max: float = 1.0
    mean: float = 0.0
    std: float = 1.0
    sparse: int = -1
    variance_norm: str = "FAN_IN"

    @classmethod
    def from_proto(cls, msg: Any) -> Filler:
        """Read a caffe_pb2.FillerParameter (unset fields keep Caffe's defaults)."""
        names = type(msg).DESCRIPTOR.fields_by_name["variance_norm"].enum_type.values_by_number
        return cls(
            type=msg.type,
            value=float(msg.value),
            min=float(msg.min),
            max=float(msg.max),
            mean=float(msg.mean),
            std=float(msg.std),
            sparse=int(msg.sparse),
            variance_norm=names[msg.variance_norm].name,
        )


@dataclass(frozen=True)
class BlobSpec:
    """One learnable blob of a layer, as the layer defines it (before `param {}` overrides).

    ``state`` marks running statistics that forward updates and the solver never touches
    (BatchNorm's mean, variance and scale factor); Caffe still stores them in the caffemodel.
    """

    shape: Shape
    filler: Filler = Filler()
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    state: bool = False


class LowerCtx:
    """What a layer's ``lower`` may ask of the compiled net besides its params and bottoms.

    - ``phase``: "TRAIN" or "TEST".
    - ``key()``: a fresh PRNG key for this layer (dropout, DummyData's random fillers); raises if
      the caller gave no rng.
    - ``feeds``: the arrays fed to the net by Caffe blob name (for source layers: Input, Data).
    - ``top_names`` / ``top_shapes`` / ``bottom_shapes``: this layer's Caffe blob names and shapes.
    - ``set_state(arrays)``: new values for the layer's blobs that forward updates (BatchNorm).
    - ``layer_name``: for error messages.
    """

    def __init__(
        self,
        phase: str,
        layer_name: str,
        key: Any = None,
        feeds: dict[str, Any] | None = None,
        top_names: Sequence[str] = (),
        top_shapes: Sequence[Shape] = (),
        bottom_shapes: Sequence[Shape] = (),
    ):
        self.phase = phase
        self.layer_name = layer_name
        self._key = key
        self._nkeys = 0
        self.feeds = feeds or {}
        self.top_names = tuple(top_names)
        self.top_shapes = tuple(top_shapes)
        self.bottom_shapes = tuple(bottom_shapes)
        self.state: list[Any] | None = None

    @property
    def train(self) -> bool:
        return self.phase == "TRAIN"

    def key(self) -> Any:
        import jax

        from ..errors import InputError

        if self._key is None:
            raise InputError(
                f"layer '{self.layer_name}' needs randomness in phase {self.phase}: pass rng="
            )
        self._nkeys += 1
        return jax.random.fold_in(self._key, self._nkeys)

    def set_state(self, arrays: list[Any]) -> None:
        self.state = list(arrays)


def _no_blobs(attrs: Any, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    return []


def _no_flops(attrs: Any, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    return 0


@dataclass(frozen=True)
class LayerType:
    """One entry of the layer table. See the module docstring for the contract of each function."""

    name: str
    doc: str
    attrs: Callable[[Any], Any]
    shape: Callable[[Any, list[Shape]], list[Shape]]
    lower: Callable[[Any, list[Any], list[Any], LowerCtx], list[Any]]
    blobs: Callable[[Any, list[Shape]], list[BlobSpec]] = _no_blobs
    flops: Callable[[Any, list[Shape], list[Shape]], int] = _no_flops
    n_bottoms: tuple[int, int | None] = (1, 1)
    n_tops: tuple[int, int | None] = (1, 1)
    aliases: tuple[str, ...] = ()
    param_field: str | None = None
    loss: bool = False
    backward: bool = True
    no_grad_bottoms: tuple[int, ...] = ()
    source: bool = False
    family: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)


REGISTRY: dict[str, LayerType] = {}
_ALIASES: dict[str, str] = {}


def register(lt: LayerType) -> LayerType:
    """Add a layer type to the table (its name and aliases must be new)."""
    for key in (lt.name, *lt.aliases):
        if key in REGISTRY or key.lower() in _ALIASES:
            raise RuntimeError(f"layer type {key!r} registered twice")
    REGISTRY[lt.name] = lt
    for a in lt.aliases:
        _ALIASES[a.lower()] = lt.name
    return lt


def canonical_type(type_name: str) -> str | None:
    """The table's name for a Caffe type string (aliases such as CCCP in any case), or None."""
    if type_name in REGISTRY:
        return type_name
    return _ALIASES.get(type_name.lower())


def lookup(type_name: str, layer_name: str = "?") -> LayerType:
    """The entry for ``type_name``; an unknown type names the layer and lists what is supported."""
    canon = canonical_type(type_name)
    if canon is None:
        supported = ", ".join(sorted(REGISTRY))
        hint = ""
        if type_name == "Python":
            hint = " (Python layers run user code inside Caffe and cannot be compiled)"
        raise UnsupportedLayerError(
            f"layer '{layer_name}' has unsupported type '{type_name}'{hint}; supported types: "
            f"{supported}"
        )
    return REGISTRY[canon]


# ---------------------------------------------------------------- helpers for layer entries


def canonical_axis(axis: int, ndim: int, what: str = "axis") -> int:
    """Caffe's Blob::CanonicalAxisIndex: negative counts from the end; out of range is an error."""
    if not -ndim <= axis < max(ndim, 1):
        raise ShapeError(f"{what} {axis} out of range for a blob with {ndim} axes")
    return axis + ndim if axis < 0 else axis


def count(shape: Sequence[int], start: int = 0, end: int | None = None) -> int:
    """Caffe's Blob::count(start, end): the product of the dims in [start, end)."""
    n = 1
    for d in tuple(shape)[start:end]:
        n *= int(d)
    return n


def same_shape(attrs: Any, bottom_shapes: list[Shape]) -> list[Shape]:
    """Shape rule of element-wise layers: one top shaped like the first bottom."""
    return [tuple(bottom_shapes[0])]


def elementwise_flops(per_element: int) -> Callable[[Any, list[Shape], list[Shape]], int]:
    """FLOP rule of element-wise layers: ``per_element`` operations per top element."""

    def flops(attrs: Any, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
        return per_element * sum(count(s) for s in top_shapes)

    return flops


def no_attrs(msg: Any) -> None:
    """For layer types that read no parameters."""
    return None


def repeated(msg: Any, name: str) -> tuple:
    """A repeated proto field as a tuple (hashable)."""
    return tuple(getattr(msg, name))

"""A net's inference function as a serialized ``jax.export`` artefact that runs without nincc's
prototxt machinery, and the loader for it.

The artefact (``.jaxexport``) is a zip archive of three members:

- ``function.jaxexport``: ``jax.export.Exported.serialize()`` of
  ``f(params, inputs) -> outputs`` (StableHLO plus calling convention), where ``params`` is
  ``{layer name: [blobs in Caffe's order]}``, ``inputs`` and ``outputs`` are
  ``{blob name: float32 array}``; the phase is TEST (dropout is the identity);
- ``params.npz``: the weights, stored beside the program rather than baked into it, under the
  keys ``"<layer>/<index>"`` of nincc's .npz weights format (so the program stays small and
  the weights can be read or replaced with numpy alone);
- ``meta.json``: the format name and version, the net's name, its input and output blobs with
  their shapes (``"N"`` marks a symbolic batch axis), the batch and the platforms.

With a symbolic batch the program is the net at batch 1 mapped over the batch (``jax.vmap``),
so any batch size runs; this requires that samples do not interact, which the export checks
by comparing against the net built at batch 2.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import onednn
from .errors import GraphError, InputError, ShapeError, WeightsError
from .ir import Graph
from .lowered import check_lowerable, forward_fn, load_graph_at, output_blobs, random_inputs

FORMAT = "nincc.jaxexport"
VERSION = 1
_NOT_SYMBOLIC = "a symbolic batch needs every batch size to fit: export with --batch N"
_FUNCTION, _PARAMS, _META = "function.jaxexport", "params.npz", "meta.json"


# ---------------------------------------------------------------- building the net to export


def inference_graph(
    source: Any,
    batch: int | None = None,
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
) -> Graph:
    """The TEST-phase graph to export; a net with nothing to infer raises GraphError."""
    from . import load_net_param
    from .build import layer_included, net_state

    net = load_net_param(source)
    where = source if isinstance(source, (str, os.PathLike)) else f"net '{net.name}'"
    state = net_state(net, "TEST", level, stages)
    if not any(layer_included(m, state) for m in net.layer):
        raise GraphError(
            f"cannot export {where}: it has no layers in phase TEST (a TRAIN-only net); "
            "export its deploy prototxt"
        )
    graph = load_graph_at(net, batch, "TEST", level, stages, input_shapes)
    producers = {t: layer for layer in graph.layers for t in layer.tops}
    outs = output_blobs(graph)
    if all(producers[v].is_loss for v in outs.values()):
        raise GraphError(
            f"cannot export {where}: in phase TEST it outputs only loss blob(s) {sorted(outs)}; "
            "export a deploy prototxt (Input layer, no loss)"
        )
    check_lowerable(graph)
    return graph


def weights_for(graph: Graph, path: str | os.PathLike) -> dict[str, list[np.ndarray]]:
    """Params of ``graph`` from any weights file nincc reads, matched by Caffe's rules."""
    from .caffemodel import load_params, match_weights

    params, _ = match_weights(load_params(path), graph.weight_slots())
    missing = [n for n in graph.param_shapes() if n not in params]
    if missing:
        raise WeightsError(f"{path} has no blobs for layer(s) {missing}")
    holes = [n for n, blobs in params.items() if any(b is None for b in blobs)]
    if holes:
        raise WeightsError(f"{path} lacks some blobs of layer(s) {holes}")
    return {k: [np.asarray(a, np.float32) for a in v] for k, v in params.items()}


# ---------------------------------------------------------------- exporting


@dataclass(frozen=True)
class ExportInfo:
    """What an artefact holds: the net's name, input and output shapes (None: symbolic batch)."""

    net: str
    inputs: dict[str, tuple[int | None, ...]]
    outputs: dict[str, tuple[int | None, ...]]
    batch: int | None
    platforms: tuple[str, ...]


def _per_sample(graph1: Graph, blobs: Sequence[str] | None) -> Callable:
    """The batch-1 net as a function of one sample, mapped over a leading batch axis."""
    forward = forward_fn(graph1, blobs)

    def one(params, sample):
        out = forward(params, {k: v[None] for k, v in sample.items()})
        return {k: v[0] for k, v in out.items()}

    def batched(params, inputs):
        return jax.vmap(one, in_axes=(None, 0))(params, inputs)

    return batched


def _check_samples_independent(
    source: Any, graph1: Graph, params: Mapping, blobs, build_kwargs: dict
) -> None:
    """A symbolic batch maps the batch-1 net over samples: refuse nets where samples interact
    (shapes that do not scale with the batch, or different numbers at batch 2)."""
    what = f"net '{graph1.name}'"
    bad = [graph1.value(v).blob for v in graph1.outputs if graph1.value(v).shape[:1] != (1,)]
    if bad:
        raise GraphError(
            f"{what}: output blob(s) {bad} have no batch axis at batch 1, so the batch cannot be "
            "symbolic; export with --batch N"
        )
    try:
        graph2 = load_graph_at(source, 2, "TEST", **build_kwargs)
    except ShapeError as e:
        raise ShapeError(f"{e}; {_NOT_SYMBOLIC}") from None
    ref = forward_fn(graph2, blobs)
    inputs = random_inputs(graph2)
    jparams = jax.tree_util.tree_map(jnp.asarray, dict(params))
    want = jax.jit(ref)(jparams, inputs)
    got = jax.jit(_per_sample(graph1, blobs))(jparams, inputs)
    for name, w in want.items():
        g = got[name]
        w, g = np.asarray(w), np.asarray(g)
        scale = float(np.abs(w).max()) if w.size else 0.0
        if w.shape != g.shape or np.abs(w - g).max(initial=0.0) > 1e-4 * max(scale, 1e-30):
            raise GraphError(
                f"{what}: samples of a batch interact (blob '{name}' at batch 2 differs from "
                "two batch-1 runs), so the batch cannot be symbolic; export with --batch N"
            )


@onednn.disabled()  # the artefact runs without nincc: XLA's kernels, not its FFI handlers
def export_net(
    source: Any,
    params: Mapping[str, Sequence[Any]] | None = None,
    weights: str | os.PathLike | None = None,
    batch: int | None = None,
    symbolic_batch: bool = False,
    platforms: Sequence[str] | None = None,
    blobs: Sequence[str] | None = None,
    level: int | None = None,
    stages: Sequence[str] = (),
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    seed: int = 0,
) -> tuple[bytes, dict[str, list[np.ndarray]], ExportInfo]:
    """Export the TEST-phase forward of a net (path, text or NetParameter).

    Params come from ``params``, else the ``weights`` file, else the layers' fillers (``seed``).
    ``batch`` fixes the batch size (None: as written); ``symbolic_batch`` exports any batch size.
    Returns (serialized program, params, info); :func:`write_export` stores all three.
    """
    if symbolic_batch and batch is not None:
        raise InputError("give either a batch size or a symbolic batch, not both")
    build = {"level": level, "stages": stages, "input_shapes": input_shapes}
    try:
        graph = inference_graph(source, 1 if symbolic_batch else batch, **build)
    except ShapeError as e:
        if not symbolic_batch:
            raise
        raise ShapeError(f"{e}; {_NOT_SYMBOLIC}") from None
    if params is None:
        if weights is not None:
            params = weights_for(graph, weights)
        else:
            from .compile import compile_graph

            params = compile_graph(graph, jit=False).init(seed)
    arrays = {k: [np.asarray(a, np.float32) for a in v] for k, v in params.items()}
    pspecs = {k: [jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in v] for k, v in arrays.items()}
    shapes = {graph.value(v).blob: graph.value(v).shape for v in graph.inputs}
    if symbolic_batch:
        _check_samples_independent(source, graph, arrays, blobs, build)
        (n,) = jax.export.symbolic_shape("N")
        fn = _per_sample(graph, blobs)
        ispecs = {k: jax.ShapeDtypeStruct((n, *s[1:]), jnp.float32) for k, s in shapes.items()}
    else:
        fn = forward_fn(graph, blobs)
        ispecs = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    fn.__name__ = "forward"
    exp = jax.export.export(jax.jit(fn), platforms=tuple(platforms) if platforms else None)(
        pspecs, ispecs
    )
    out_tree = jax.tree_util.tree_unflatten(exp.out_tree, exp.out_avals)

    def dims(shape) -> tuple[int | None, ...]:
        return tuple(d if isinstance(d, int) else None for d in shape)

    info = ExportInfo(
        net=graph.name,
        inputs={k: dims(v.shape) for k, v in ispecs.items()},
        outputs={k: dims(v.shape) for k, v in out_tree.items()},
        batch=None if symbolic_batch else _batch_of(shapes),
        platforms=tuple(exp.platforms),
    )
    return bytes(exp.serialize()), arrays, info


def _batch_of(shapes: Mapping[str, Sequence[int]]) -> int | None:
    first = next(iter(shapes.values()), ())
    return first[0] if first else None


def _shape_json(shape: Sequence[int | None]) -> list[int | str]:
    return [d if d is not None else "N" for d in shape]


def write_export(
    path: str | os.PathLike, program: bytes, params: Mapping[str, Sequence[np.ndarray]], info
) -> None:
    """Write the artefact atomically (a temporary file renamed over ``path``)."""
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "net": info.net,
        "inputs": {k: _shape_json(v) for k, v in info.inputs.items()},
        "outputs": {k: _shape_json(v) for k, v in info.outputs.items()},
        "batch": info.batch if info.batch is not None else "N",
        "platforms": list(info.platforms),
    }
    weights = io.BytesIO()
    np.savez(weights, **{f"{k}/{i}": a for k, v in params.items() for i, a in enumerate(v)})
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as z:
            z.writestr(_META, json.dumps(meta, indent=1))
            z.writestr(_FUNCTION, program)
            z.writestr(_PARAMS, weights.getvalue())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------- loading


class ExportedNet:
    """A loaded artefact: call it with ``{blob: array}`` to get ``{blob: numpy array}``."""

    def __init__(self, exported: Any, params: dict[str, list[Any]], meta: dict, path: str):
        self.exported = exported
        self.params = params
        self.meta = meta
        self.path = path
        args = jax.tree_util.tree_unflatten(exported.in_tree, exported.in_avals)[0]
        self._inputs = args[1]

    @property
    def input_shapes(self) -> dict[str, tuple[int | None, ...]]:
        """Blob name → shape (None for a symbolic batch axis)."""
        return {
            k: tuple(d if isinstance(d, int) else None for d in v.shape)
            for k, v in self._inputs.items()
        }

    @property
    def output_names(self) -> list[str]:
        return list(self.meta["outputs"])

    def __call__(self, inputs: Mapping[str, Any]) -> dict[str, np.ndarray]:
        expected = self.input_shapes
        if set(inputs) != set(expected):
            raise InputError(
                f"{self.path} takes input blob(s) {sorted(expected)}, got {sorted(inputs)}"
            )
        feeds, batch = {}, None
        for name, arr in inputs.items():
            x = np.asarray(arr, np.float32)
            want = expected[name]
            fits = x.ndim == len(want) and all(w is None or w == d for w, d in zip(want, x.shape))
            if x.ndim and want and want[0] is None:
                fits = fits and (batch is None or batch == x.shape[0])
                batch = x.shape[0] if batch is None else batch
            if not fits:
                shown = ["N" if d is None else d for d in want]
                raise InputError(
                    f"input blob '{name}' has shape {list(x.shape)}, {self.path} expects {shown}"
                    + (" (N the same for every input)" if None in want else "")
                )
            feeds[name] = jnp.asarray(x)
        out = self.exported.call(self.params, feeds)
        return {k: np.asarray(v) for k, v in out.items()}


def load_exported(path: str | os.PathLike) -> ExportedNet:
    """Load a ``.jaxexport`` artefact written by ``nincc export``: a callable
    ``{input blob: array} -> {output blob: numpy array}`` (needs jax and numpy only)."""
    where = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as z:
            meta = json.loads(z.read(_META))
            program = z.read(_FUNCTION)
            stored = np.load(io.BytesIO(z.read(_PARAMS)), allow_pickle=False)
            flat = {k: stored[k] for k in stored.files}
    except (zipfile.BadZipFile, KeyError, ValueError) as e:
        raise InputError(f"{where} is not a nincc export artefact ({e})") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise InputError(
            f"{where}: format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this nincc reads {FORMAT!r} version {VERSION}"
        )
    params: dict[str, list[Any]] = {}
    for key in sorted(flat, key=lambda k: (k.rpartition("/")[0], int(k.rpartition("/")[2]))):
        layer, _, _ = key.rpartition("/")
        params.setdefault(layer, []).append(jnp.asarray(flat[key]))
    exported = jax.export.deserialize(bytearray(program))
    return ExportedNet(exported, params, meta, where)

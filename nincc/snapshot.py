"""Caffe's .solverstate: the iteration, the weights file and the solver's history blobs.

Two formats, chosen by file name as Caffe's Solver::Restore does: a binary SolverState message
(snapshot_format BINARYPROTO) or, for names ending in ``.h5``, an HDF5 file with the datasets
``iter``, ``current_step``, ``learned_net`` and ``history/<i>`` (snapshot_format HDF5).

The history blobs are one per learnable blob in net order (shared blobs once, with their owner);
AdaDelta and Adam store two sets: first every first-slot blob, then every second-slot blob.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import WeightsError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it over: never a partial file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".nincc-", suffix=".tmp", dir=directory)
    except OSError as e:
        raise WeightsError(f"cannot write {path}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WeightsError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@dataclass
class SolverSnapshot:
    """The content of a .solverstate file."""

    iter: int
    learned_net: str
    history: list[np.ndarray]
    current_step: int = 0


def snapshot_filename(prefix: str, iteration: int, extension: str) -> str:
    """Caffe's Solver::SnapshotFilename: ``<prefix>_iter_<N><extension>``."""
    return f"{prefix}_iter_{iteration}{extension}"


def is_hdf5(path: str | os.PathLike) -> bool:
    """Caffe picks the HDF5 reader for names ending in ``.h5``."""
    return os.fspath(path).endswith(".h5")


# ------------------------------------------------------------------------------ binary format


def _packed_floats(array: np.ndarray) -> bytes:
    """Wire bytes of BlobProto.data (field 5, packed float32), built without a Python loop."""
    payload = np.ascontiguousarray(array, dtype="<f4").tobytes()
    return _varint((5 << 3) | 2) + _varint(len(payload)) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _blob(arr: Any) -> Any:
    """Blob::ToProto: every dim in ``shape`` (none for a 0-axis blob) and float ``data``."""
    from . import caffe_pb2

    arr = np.asarray(arr, np.float32)
    b = caffe_pb2.BlobProto()
    if arr.ndim:
        b.shape.dim.extend(int(d) for d in arr.shape)
    if arr.size:
        b.MergeFromString(_packed_floats(arr))
    return b


def _history_array(b: Any, path: str, i: int) -> np.ndarray:
    legacy = any(b.HasField(f) for f in ("num", "channels", "height", "width"))
    if b.HasField("shape") or not legacy:
        shape = tuple(int(d) for d in b.shape.dim)
    else:
        shape = (b.num, b.channels, b.height, b.width)
    values = b.double_data if len(b.double_data) else b.data
    if len(values) != int(np.prod(shape)):
        raise WeightsError(
            f"{path}: history blob {i} has {len(values)} values for shape {list(shape)}"
        )
    return np.asarray(values, np.float32).reshape(shape)


def _write_binary(path: str | os.PathLike, snap: SolverSnapshot) -> None:
    from . import caffe_pb2

    msg = caffe_pb2.SolverState(
        iter=snap.iter, learned_net=snap.learned_net, current_step=snap.current_step
    )
    msg.history.extend(_blob(h) for h in snap.history)
    atomic_write_bytes(path, msg.SerializeToString())


def _read_binary(path: str | os.PathLike) -> SolverSnapshot:
    from google.protobuf.message import DecodeError

    from . import caffe_pb2

    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise WeightsError(f"cannot read solver state {path}: {e.strerror or e}") from None
    msg = caffe_pb2.SolverState()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        raise WeightsError(f"{path} is not a Caffe .solverstate (binary SolverState)") from None
    history = [_history_array(b, os.fspath(path), i) for i, b in enumerate(msg.history)]
    return SolverSnapshot(msg.iter, msg.learned_net, history, msg.current_step)


# ------------------------------------------------------------------------------ HDF5 format


def _h5py() -> Any:
    try:
        import h5py
    except ImportError:
        raise WeightsError("HDF5 solver states need h5py: pip install 'nincc[h5]'") from None
    return h5py


def _write_hdf5(path: str | os.PathLike, snap: SolverSnapshot) -> None:
    """SGDSolver::SnapshotSolverStateToHDF5: int datasets of one element, a fixed-length string."""
    h5py = _h5py()
    buffer = io.BytesIO()
    name = snap.learned_net.encode()
    with h5py.File(buffer, "w") as h5:
        h5.create_dataset("iter", data=np.array([snap.iter], np.int32))
        h5.create_dataset("learned_net", data=np.array(name, dtype=f"S{len(name) + 1}"))
        h5.create_dataset("current_step", data=np.array([snap.current_step], np.int32))
        group = h5.create_group("history")
        for i, h in enumerate(snap.history):
            group.create_dataset(str(i), data=np.asarray(h, np.float32))
    atomic_write_bytes(path, buffer.getvalue())


def _read_hdf5(path: str | os.PathLike) -> SolverSnapshot:
    h5py = _h5py()
    try:
        with h5py.File(path, "r") as h5:
            if "iter" not in h5 or "history" not in h5:
                raise WeightsError(f"{path}: no 'iter' or 'history' (not a Caffe .solverstate.h5)")
            it = int(np.asarray(h5["iter"][()]).reshape(-1)[0])
            step = (
                int(np.asarray(h5["current_step"][()]).reshape(-1)[0])
                if ("current_step" in h5)
                else 0
            )
            learned = ""
            if "learned_net" in h5:
                raw = h5["learned_net"][()]
                learned = raw.decode() if isinstance(raw, bytes) else str(raw)
            group = h5["history"]
            history = [np.asarray(group[str(i)][()], np.float32) for i in range(len(group))]
    except OSError as e:
        raise WeightsError(f"cannot read solver state {path}: {e}") from None
    except KeyError as e:
        raise WeightsError(f"{path}: history datasets are not numbered 0..n-1 ({e})") from None
    return SolverSnapshot(it, learned.rstrip("\0"), history, step)


# ------------------------------------------------------------------------------ public API


def write_solverstate(path: str | os.PathLike, snap: SolverSnapshot) -> None:
    """Write a solver state as Caffe's SGDSolver snapshot does (HDF5 if the name ends in .h5)."""
    (_write_hdf5 if is_hdf5(path) else _write_binary)(path, snap)


def read_solverstate(path: str | os.PathLike) -> SolverSnapshot:
    """Read a .solverstate (binary) or .solverstate.h5; a file that is not one is a WeightsError."""
    return (_read_hdf5 if is_hdf5(path) else _read_binary)(path)


def current_step(cfg: Any, iteration: int) -> int:
    """Caffe's ``current_step_`` once ``iteration`` updates are done: GetLearningRate sets it to
    ``iter / stepsize`` (step) or counts the stepvalues passed (multistep) on each update."""
    if iteration <= 0:
        return 0
    last = iteration - 1
    if cfg.lr_policy == "step":
        return last // cfg.stepsize
    if cfg.lr_policy == "multistep":
        return sum(1 for s in cfg.stepvalue if last >= s)
    return 0


def history_order(param_shapes: Mapping[str, Sequence[tuple[int, ...]]]) -> list[tuple[str, int]]:
    """(layer, index) of every learnable blob in Caffe's net order."""
    return [(name, i) for name, shapes in param_shapes.items() for i in range(len(shapes))]


def history_list(
    history: Mapping[str, Sequence[Any]],
    history2: Mapping[str, Sequence[Any]] | None,
    order: Sequence[tuple[str, int]],
) -> list[np.ndarray]:
    """The solver's history pytrees as Caffe's flat list: every first-slot blob, then the second."""
    out = [np.asarray(history[name][i], np.float32) for name, i in order]
    if history2 is not None:
        out += [np.asarray(history2[name][i], np.float32) for name, i in order]
    return out


def history_trees(
    blobs: Sequence[np.ndarray],
    param_shapes: Mapping[str, Sequence[tuple[int, ...]]],
    two_slots: bool,
    path: str = "<solverstate>",
) -> tuple[dict[str, list[np.ndarray]], dict[str, list[np.ndarray]] | None]:
    """Caffe's flat history list back into pytrees keyed like params; counts and shapes checked."""
    order = history_order(param_shapes)
    need = len(order) * (2 if two_slots else 1)
    if len(blobs) != need:
        raise WeightsError(
            f"{path} holds {len(blobs)} history blobs, the solver needs {need} "
            f"({len(order)} learnable blobs{' x 2 slots' if two_slots else ''})"
        )

    def tree(offset: int) -> dict[str, list[np.ndarray]]:
        out: dict[str, list[np.ndarray]] = {name: [] for name in param_shapes}
        for k, (name, i) in enumerate(order):
            arr = np.asarray(blobs[offset + k], np.float32)
            want = tuple(param_shapes[name][i])
            if arr.shape != want:
                if arr.size != int(np.prod(want)):
                    raise WeightsError(
                        f"{path}: history blob {offset + k} ({name} blob {i}) has shape "
                        f"{list(arr.shape)}, the net expects {list(want)}"
                    )
                arr = arr.reshape(want)  # legacy 4-D history blobs
            out[name].append(arr)
        return out

    return tree(0), tree(len(order)) if two_slots else None

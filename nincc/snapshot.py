"""Caffe's .solverstate (binary SolverState): the iteration, the weights file and the history.

The history blobs are one per learnable blob in net order (shared blobs once, with their owner);
AdaDelta and Adam store two sets: first every first-slot blob, then every second-slot blob.
"""

from __future__ import annotations

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


def _blob(arr: np.ndarray) -> Any:
    from . import caffe_pb2

    b = caffe_pb2.BlobProto()
    b.shape.dim.extend(int(d) for d in arr.shape)
    b.data.extend(np.asarray(arr, np.float32).ravel().tolist())
    return b


def write_solverstate(path: str | os.PathLike, snap: SolverSnapshot) -> None:
    """Write a binary SolverState as Caffe's SGDSolver::SnapshotSolverStateToBinaryProto does."""
    from . import caffe_pb2

    msg = caffe_pb2.SolverState(
        iter=snap.iter, learned_net=snap.learned_net, current_step=snap.current_step
    )
    msg.history.extend(_blob(h) for h in snap.history)
    atomic_write_bytes(path, msg.SerializeToString())


def read_solverstate(path: str | os.PathLike) -> SolverSnapshot:
    """Read a binary .solverstate; a file that is not one is a one-line WeightsError."""
    from google.protobuf.message import DecodeError

    from . import caffe_pb2

    try:
        data = open(path, "rb").read()
    except OSError as e:
        raise WeightsError(f"cannot read solver state {path}: {e.strerror or e}") from None
    msg = caffe_pb2.SolverState()
    try:
        msg.ParseFromString(data)
    except DecodeError:
        raise WeightsError(f"{path} is not a Caffe .solverstate (binary SolverState)") from None
    history = []
    for i, b in enumerate(msg.history):
        shape = tuple(b.shape.dim) if b.HasField("shape") else (b.num, b.channels, b.height, b.width)
        values = np.asarray(b.double_data if len(b.double_data) else b.data, np.float32)
        if values.size != int(np.prod(shape)):
            raise WeightsError(
                f"{path}: history blob {i} has {values.size} values for shape {list(shape)}"
            )
        history.append(values.reshape(shape))
    return SolverSnapshot(msg.iter, msg.learned_net, history, msg.current_step)


def history_order(param_shapes: Mapping[str, Sequence[tuple[int, ...]]]) -> list[tuple[str, int]]:
    """(layer, index) of every learnable blob in Caffe's net order."""
    return [(name, i) for name, shapes in param_shapes.items() for i in range(len(shapes))]

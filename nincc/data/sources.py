"""Caffe's data layers as host-side batch sources, one per source layer of a graph.

A source's ``next()`` returns ``{blob name: array}`` for one forward, in Caffe's record order
(wrapping around at the end, as Caffe's layers do). The compiled net never reads files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from ..errors import DataError
from ..ir import Graph


class BatchSource:
    """One data layer's stream of batches."""

    tops: tuple[str, ...] = ()

    def next(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next()


class HDF5Source(BatchSource):
    """Caffe's HDF5DataLayer: the files a list file names, rows in order across files, wrapping.

    Without shuffle the rows of file 0 come first, then file 1, ...; a batch may straddle the end
    of a file and of the list (then it continues with the first file again).
    """

    def __init__(self, layer_name: str, listfile: str, tops: tuple[str, ...], batch: int):
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise DataError("HDF5Data layers need h5py: pip install 'nincc[h5]'") from None
        try:
            with open(listfile) as f:
                self.files = [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise DataError(f"layer '{layer_name}': cannot read HDF5 list file {listfile}: {e}") from None
        if not self.files:
            raise DataError(f"layer '{layer_name}': HDF5 list file {listfile} names no files")
        self.layer, self.tops, self.batch = layer_name, tuple(tops), batch
        self.file_idx, self.row = 0, 0
        self.data = self._load(0)

    def _load(self, idx: int) -> dict[str, np.ndarray]:
        import h5py

        path = self.files[idx]
        try:
            with h5py.File(path, "r") as h:
                data = {t: np.asarray(h[t], np.float32) for t in self.tops}
        except (OSError, KeyError) as e:
            raise DataError(f"layer '{self.layer}': cannot read {path}: {e}") from None
        n = {len(v) for v in data.values()}
        if len(n) != 1 or 0 in n:
            raise DataError(f"layer '{self.layer}': datasets in {path} have different row counts")
        return data

    def next(self) -> dict[str, np.ndarray]:
        out: dict[str, list] = {t: [] for t in self.tops}
        for _ in range(self.batch):
            rows = len(next(iter(self.data.values())))
            if self.row >= rows:
                self.row = 0
                self.file_idx = (self.file_idx + 1) % len(self.files)
                if len(self.files) > 1:
                    self.data = self._load(self.file_idx)
            for t in self.tops:
                out[t].append(self.data[t][self.row])
            self.row += 1
        return {t: np.stack(v) for t, v in out.items()}


def _blob_names(graph: Graph, layer) -> tuple[str, ...]:
    return tuple(graph.value(t).blob for t in layer.tops)


def sources_for(graph: Graph, net_param: Any) -> list[BatchSource]:
    """A batch source for each data layer of the graph that reads files (Input is fed instead)."""
    by_name = {m.name: m for m in net_param.layer}
    out: list[BatchSource] = []
    for layer in graph.layers:
        msg = by_name.get(layer.name)
        if msg is None:
            continue
        if layer.type == "HDF5Data":
            p = msg.hdf5_data_param
            if not os.path.exists(p.source):
                raise DataError(
                    f"layer '{layer.name}': HDF5 list file '{p.source}' not found (paths are "
                    "relative to the working directory)"
                )
            out.append(HDF5Source(layer.name, p.source, _blob_names(graph, layer), p.batch_size))
    return out

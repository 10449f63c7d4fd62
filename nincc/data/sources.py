"""Caffe's data layers as host-side batch sources, one per source layer of a graph.

A source's ``next()`` returns ``{blob name: float32 array}`` for one forward, in Caffe's record
order (wrapping around at the end, as Caffe's layers do). The compiled net never reads files.

Layer types: Data (LMDB/LevelDB Datum records), ImageData (a list of image files), HDF5Data,
MemoryData (arrays handed over with ``MemorySource.reset``/``add``). Input and DummyData need no
source (Input is fed by the caller, DummyData is generated inside the compiled net).

Data-parallel training reads a :class:`Shard` of each source: Caffe's rule for several solvers
(DataLayer::Skip, HDF5DataLayer::Skip), record ``i`` of the stream goes to rank ``i % world``;
nincc applies the same rule to ImageData and MemoryData.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import DataError
from ..ir import Graph
from .db import Cursor, backend_name
from .images import read_image, read_list_file
from .records import parse_datum
from .transform import DataTransformer, TransformParam

NO_TRANSFORM = TransformParam()


@dataclass(frozen=True)
class Shard:
    """The consecutive ranks ``first .. first + count - 1`` of ``world`` data-parallel ranks.

    Caffe gives record ``i`` of a source (counted from the start, across wrap-arounds) to rank
    ``i % world``, each rank filling its own batch of ``batch_size`` records. Every batch of the
    ranks together is then exactly the batch of one reader with ``world * batch_size`` records
    (the same records, in another row order), so the gradient summed over ranks equals the
    combined batch's. A process that drives several ranks reads them with one source: its batch
    holds ``count * batch_size`` rows, rank by rank (rows of rank ``first`` first).
    """

    first: int = 0
    count: int = 1
    world: int = 1

    def __post_init__(self) -> None:
        if not (self.world >= 1 and self.count >= 1 and 0 <= self.first
                and self.first + self.count <= self.world):
            raise DataError(
                f"a data shard needs 0 <= first < first + count <= world, got ranks "
                f"{self.first}..{self.first + self.count - 1} of {self.world}"
            )

    @property
    def whole(self) -> bool:
        """Whether the shard is the whole stream (one rank)."""
        return self.world == 1

    def keeps(self, offset: int) -> bool:
        """Whether record number ``offset`` of the stream belongs to this shard's ranks."""
        return self.first <= offset % self.world < self.first + self.count

    def arrange(self, items: list) -> list:
        """Records in reading order (round by round, ranks ascending in each) → rank by rank."""
        if self.count == 1:
            return items
        return [items[j * self.count + r] for r in range(self.count)
                for j in range(len(items) // self.count)]


WHOLE = Shard()


class BatchSource:
    """One data layer's stream of batches.

    Subclasses implement ``produce()``; ``next()`` checks the first batch against ``expect``
    (blob name → shape the net was built for) when it is set. A source built with a
    :class:`Shard` returns the rows of the shard's ranks only (``count * batch`` rows).
    """

    layer: str = ""
    tops: tuple[str, ...] = ()
    expect: dict[str, tuple[int, ...]] | None = None
    shard: Shard = WHOLE
    offset: int = 0  # records of the stream passed so far (read or skipped)

    def _shard_rows(self, batch: int) -> int:
        """Rows one batch of this source holds: ``batch`` per rank of its shard."""
        return batch * self.shard.count

    def _kept(self, advance: Any) -> None:
        """Skip (``advance()``, one record each) the records of other ranks before the next."""
        while not self.shard.keeps(self.offset):
            advance()
            self.offset += 1

    def produce(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def next(self) -> dict[str, np.ndarray]:
        """The arrays of the next forward: {top blob name: array}."""
        batch = self.produce()
        if self.expect:
            for blob, want in self.expect.items():
                got = tuple(batch[blob].shape)
                if got != want:
                    raise DataError(
                        f"layer '{self.layer}': its source gives blob '{blob}' shape "
                        f"{list(got)}, the net was built for {list(want)}"
                    )
            self.expect = None
        return batch

    def close(self) -> None:
        """Release files and databases (the source cannot be used afterwards)."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        while True:
            yield self.next()

    def __enter__(self) -> BatchSource:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _transform_rng(seed: int, shard: Shard) -> np.random.Generator:
    """The generator of a source's random crops and mirrors: its own stream per rank, as each of
    Caffe's solvers seeds its own transformer (the record order does not depend on it)."""
    return np.random.default_rng(seed if shard.whole else [seed, shard.first])


def _labels(values: Sequence[int]) -> np.ndarray:
    return np.asarray(values, np.float32)


def _stack(arrays: list[np.ndarray], names: list[str], where: str) -> np.ndarray:
    """Stack records of one batch; Caffe shapes a batch by its first record and CHECKs the rest."""
    first = arrays[0].shape
    for a, name in zip(arrays, names, strict=True):
        if a.shape != first:
            raise DataError(
                f"{where}: record {name} has shape {list(a.shape)}, the batch's first record "
                f"{list(first)}; records of one batch must have one shape"
            )
    return np.stack(arrays)


# ---------------------------------------------------------------- Data (LMDB / LevelDB)


class DataSource(BatchSource):
    """Caffe's DataLayer: Datum records in key order from LMDB or LevelDB, transformed.

    Tops: data (N, C, H, W) and, if the layer has a second top, label (N,).
    """

    def __init__(
        self,
        layer: str,
        source: str,
        backend: str,
        batch: int,
        tops: Sequence[str],
        transform: TransformParam = NO_TRANSFORM,
        phase: str = "TEST",
        seed: int = 0,
        shard: Shard = WHOLE,
    ):
        if batch <= 0:
            raise DataError(f"layer '{layer}': batch_size must be > 0, got {batch}")
        self.layer, self.tops, self.batch, self.shard = layer, tuple(tops), batch, shard
        self.where = f"layer '{layer}'"
        self.cursor = Cursor(source, backend_name(backend), self.where)
        self.transformer = DataTransformer(transform, phase, _transform_rng(seed, shard), layer)
        self.decode = transform.decode_mode

    def produce(self) -> dict[str, np.ndarray]:
        arrays, labels, keys = [], [], []
        for _ in range(self._shard_rows(self.batch)):
            self._kept(self.cursor.next)
            key, value = self.cursor.next()
            self.offset += 1
            rec = parse_datum(value, f"{self.where}: record {key!r}", self.decode)
            arrays.append(rec.array)
            labels.append(rec.label)
            keys.append(repr(key))
        arrays, labels, keys = (self.shard.arrange(x) for x in (arrays, labels, keys))
        out = {self.tops[0]: self.transformer(_stack(arrays, keys, self.where))}
        if len(self.tops) > 1:
            out[self.tops[1]] = _labels(labels)
        return out

    def close(self) -> None:
        self.cursor.close()


# ---------------------------------------------------------------- ImageData


class ImageDataSource(BatchSource):
    """Caffe's ImageDataLayer: images named by a list file, optionally resized and shuffled.

    Paths are ``root_folder + path`` (plain concatenation, as Caffe does: give the folder a
    trailing '/'). With ``shuffle`` the list is permuted at start and after every pass.
    """

    def __init__(
        self,
        layer: str,
        listfile: str,
        batch: int,
        tops: Sequence[str],
        root_folder: str = "",
        new_height: int = 0,
        new_width: int = 0,
        is_color: bool = True,
        shuffle: bool = False,
        rand_skip: int = 0,
        transform: TransformParam = NO_TRANSFORM,
        phase: str = "TEST",
        seed: int = 0,
        shard: Shard = WHOLE,
    ):
        self.layer, self.tops, self.batch, self.shard = layer, tuple(tops), batch, shard
        self.where = f"layer '{layer}'"
        if batch <= 0:
            raise DataError(f"{self.where}: batch_size must be > 0, got {batch}")
        if (new_height > 0) != (new_width > 0):
            raise DataError(
                f"{self.where}: new_height and new_width must be set together, got "
                f"{new_height} and {new_width}"
            )
        if not os.path.exists(listfile):
            raise DataError(
                f"{self.where}: image list '{listfile}' not found (relative paths are read from "
                f"the working directory {os.getcwd()}); it holds one 'path label' line per image"
            )
        self.lines = read_list_file(listfile, self.where)
        if not self.lines:
            raise DataError(f"{self.where}: image list '{listfile}' names no images")
        self.root, self.size, self.is_color = root_folder, (new_height, new_width), is_color
        self.shuffle = shuffle
        # Every rank shuffles with the same generator (so the ranks share one permutation and
        # each takes its own records of it); with a shard the transforms draw from their own.
        self.rng = np.random.default_rng(seed)
        trng = self.rng if shard.whole else _transform_rng(seed, shard)
        self.transformer = DataTransformer(transform, phase, trng, layer)
        if shuffle:
            self._shuffle()
        self.pos = 0
        if rand_skip:
            self.pos = int(self.rng.integers(0, rand_skip))
            if self.pos >= len(self.lines):
                raise DataError(f"{self.where}: rand_skip {rand_skip} exceeds the image count")

    def _shuffle(self) -> None:
        self.lines = [self.lines[i] for i in self.rng.permutation(len(self.lines))]

    def _read(self, name: str) -> np.ndarray:
        path = self.root + name
        if not os.path.exists(path):
            hint = ""
            if self.root and not self.root.endswith(("/", os.sep)):
                hint = " (root_folder is prepended as is: end it with '/')"
            raise DataError(f"{self.where}: image '{path}' not found{hint}")
        img = read_image(path, self.is_color, *self.size)
        return np.ascontiguousarray(img.transpose(2, 0, 1))

    def _advance(self) -> None:
        self.pos += 1
        if self.pos >= len(self.lines):
            self.pos = 0
            if self.shuffle:
                self._shuffle()

    def produce(self) -> dict[str, np.ndarray]:
        arrays, labels, names = [], [], []
        for _ in range(self._shard_rows(self.batch)):
            self._kept(self._advance)
            name, label = self.lines[self.pos]
            arrays.append(self._read(name))
            labels.append(label)
            names.append(repr(name))
            self._advance()
            self.offset += 1
        arrays, labels, names = (self.shard.arrange(x) for x in (arrays, labels, names))
        out = {self.tops[0]: self.transformer(_stack(arrays, names, self.where))}
        if len(self.tops) > 1:
            out[self.tops[1]] = _labels(labels)
        return out


# ---------------------------------------------------------------- HDF5Data


class HDF5Source(BatchSource):
    """Caffe's HDF5DataLayer: the files a list file names, rows in order across files, wrapping.

    Without shuffle the rows of file 0 come first, then file 1, ...; a batch may straddle the end
    of a file and of the list (then it continues with the first file again). With shuffle the
    file order is permuted at start and after each pass over the list, and the rows of a file
    each time it is loaded (a single file: after each pass over it).
    """

    def __init__(
        self,
        layer_name: str,
        listfile: str,
        tops: tuple[str, ...],
        batch: int,
        shuffle: bool = False,
        seed: int = 0,
        shard: Shard = WHOLE,
    ):
        try:
            import h5py  # noqa: F401
        except ImportError:
            raise DataError("HDF5Data layers need h5py: pip install 'nincc[data]'") from None
        self.layer, self.tops, self.batch, self.shard = layer_name, tuple(tops), batch, shard
        self.where = f"layer '{layer_name}'"
        if batch <= 0:
            raise DataError(f"{self.where}: batch_size must be > 0, got {batch}")
        if not os.path.exists(listfile):
            raise DataError(
                f"{self.where}: HDF5 list file '{listfile}' not found (relative paths are read "
                f"from the working directory {os.getcwd()}); it lists .h5 files, one per line, "
                f"each holding datasets named {list(self.tops)}"
            )
        try:
            with open(listfile) as f:
                # Caffe reads the list with `>>`: whitespace-separated names.
                self.files = f.read().split()
        except OSError as e:
            raise DataError(
                f"{self.where}: cannot read HDF5 list file '{listfile}': {e.strerror or e}"
            ) from None
        if not self.files:
            raise DataError(f"{self.where}: HDF5 list file '{listfile}' names no files")
        self.shuffle = shuffle
        self.rng = np.random.default_rng(seed)
        self.file_order = np.arange(len(self.files))
        if shuffle:
            self.rng.shuffle(self.file_order)
        self.file_pos = 0
        self._load(self.file_order[0])

    def _load(self, idx: int) -> None:
        import h5py

        path = self.files[idx]
        if not os.path.exists(path):
            raise DataError(f"{self.where}: HDF5 file '{path}' (from the list file) not found")
        try:
            with h5py.File(path, "r") as h:
                missing = [t for t in self.tops if t not in h]
                if missing:
                    raise DataError(
                        f"{self.where}: {path} has no dataset {missing[0]!r} (it has "
                        f"{sorted(h.keys())}); each top reads the dataset of its name"
                    )
                data = {t: np.asarray(h[t], np.float32) for t in self.tops}
        except OSError as e:
            raise DataError(f"{self.where}: cannot read HDF5 file '{path}': {e}") from None
        rows = {t: (v.shape[0] if v.ndim else 0) for t, v in data.items()}
        if len(set(rows.values())) != 1 or 0 in rows.values():
            raise DataError(
                f"{self.where}: datasets in {path} must have one non-zero row count, got {rows}"
            )
        self.data = data
        self.rows = next(iter(rows.values()))
        self.row_order = np.arange(self.rows)
        if self.shuffle:
            self.rng.shuffle(self.row_order)
        self.row = 0

    def _advance(self) -> None:
        self.row += 1
        if self.row < self.rows:
            return
        if len(self.files) > 1:
            self.file_pos += 1
            if self.file_pos == len(self.files):
                self.file_pos = 0
                if self.shuffle:
                    self.rng.shuffle(self.file_order)
            self._load(self.file_order[self.file_pos])
        else:
            self.row = 0
            if self.shuffle:
                self.rng.shuffle(self.row_order)

    def produce(self) -> dict[str, np.ndarray]:
        out: dict[str, list] = {t: [] for t in self.tops}
        for _ in range(self._shard_rows(self.batch)):
            self._kept(self._advance)
            r = self.row_order[self.row]
            for t in self.tops:
                out[t].append(self.data[t][r])
            self._advance()
            self.offset += 1
        return {t: np.stack(self.shard.arrange(v)) for t, v in out.items()}


# ---------------------------------------------------------------- MemoryData


class MemorySource(BatchSource):
    """Caffe's MemoryDataLayer: batches cut from arrays handed over by the caller.

    ``reset(data, labels)`` takes (n, C, H, W) data used as is (Caffe does not transform arrays
    given to Reset); ``add(records, labels)`` transforms (n, C, H, W) records with the layer's
    transform_param first (Caffe's AddDatumVector/AddMatVector). n must be a multiple of the batch
    size; batches cycle through the arrays.
    """

    def __init__(
        self,
        layer: str,
        batch: int,
        shape: tuple[int, int, int],
        tops: Sequence[str],
        transform: TransformParam = NO_TRANSFORM,
        phase: str = "TEST",
        seed: int = 0,
        shard: Shard = WHOLE,
    ):
        self.layer, self.tops, self.batch, self.shape = layer, tuple(tops), batch, tuple(shape)
        self.shard = shard
        self.where = f"layer '{layer}'"
        if batch <= 0 or min(self.shape) <= 0:
            raise DataError(
                f"{self.where}: batch_size, channels, height and width must be > 0, got "
                f"{batch}, {list(self.shape)}"
            )
        self.transform = transform
        self.transformer: DataTransformer | None = None
        self.phase, self.seed = phase, seed
        self.data: np.ndarray | None = None
        self.labels: np.ndarray | None = None
        self.pos = 0

    def reset(self, data: np.ndarray, labels: np.ndarray) -> None:
        """Use these arrays as they are: data (n, C, H, W), labels (n,)."""
        data = np.asarray(data, np.float32)
        labels = np.asarray(labels, np.float32).reshape(-1)
        n = data.shape[0] if data.ndim else 0
        if data.ndim != 4 or data.shape[1:] != self.shape:
            raise DataError(
                f"{self.where}: data of shape {list(data.shape)} given, the layer takes "
                f"(n, {', '.join(map(str, self.shape))})"
            )
        if labels.shape[0] != n:
            raise DataError(f"{self.where}: {n} data rows but {labels.shape[0]} labels given")
        if n == 0 or n % self.batch:
            raise DataError(
                f"{self.where}: the number of rows ({n}) must be a positive multiple of "
                f"batch_size {self.batch}"
            )
        self.data, self.labels, self.pos, self.offset = data, labels, 0, 0

    def add(self, records: np.ndarray, labels: np.ndarray) -> None:
        """Transform (n, C, H, W) records with transform_param, then use them (as reset does)."""
        if self.transformer is None:
            self.transformer = DataTransformer(self.transform, self.phase, self.seed, self.layer)
        records = np.asarray(records)
        if records.ndim != 4:
            raise DataError(f"{self.where}: records must be (n, C, H, W), got {records.shape}")
        self.reset(self.transformer(records), labels)

    def produce(self) -> dict[str, np.ndarray]:
        if self.data is None or self.labels is None:
            raise DataError(
                f"{self.where}: MemoryData has no arrays; hand them over with "
                f"source.reset(data, labels) or source.add(records, labels) first"
            )
        n = self.data.shape[0]
        if self.shard.whole:
            rows: Any = slice(self.pos, self.pos + self.batch)
            self.pos = (self.pos + self.batch) % n
        else:
            picked = []  # record number -> row: the arrays cycle, so row = offset % n
            for _ in range(self._shard_rows(self.batch)):
                self._kept(lambda: None)
                picked.append(self.offset % n)
                self.offset += 1
            rows = np.asarray(self.shard.arrange(picked))
        out = {self.tops[0]: self.data[rows]}
        if len(self.tops) > 1:
            out[self.tops[1]] = self.labels[rows]
        return out


# ---------------------------------------------------------------- the graph's sources


def _blob_names(graph: Graph, layer) -> tuple[str, ...]:
    return tuple(graph.value(t).blob for t in layer.tops)


def _message_for(graph: Graph, layer, net_param: Any):
    """The LayerParameter a graph layer was built from (names repeat across phases)."""
    from ..build import NetState, layer_included

    tops = list(_blob_names(graph, layer))
    found = [m for m in net_param.layer if m.name == layer.name and list(m.top) == tops]
    if len(found) > 1:
        state = NetState(phase=graph.phase)
        found = [m for m in found if layer_included(m, state)] or found
    return found[0] if found else None


def _backend(msg) -> str:
    p = msg.data_param
    enum = type(p).DESCRIPTOR.fields_by_name["backend"].enum_type
    return enum.values_by_number[p.backend].name


def source_for_layer(
    msg: Any,
    tops: Sequence[str],
    phase: str = "TEST",
    seed: int = 0,
    type_: str | None = None,
    shard: Shard = WHOLE,
) -> BatchSource | None:
    """The batch source of one data LayerParameter; None for Input and DummyData.

    ``type_`` is the layer's table type (the graph's), defaulting to ``msg.type``; ``shard``
    the data-parallel ranks whose records the source reads.
    """
    t = type_ or msg.type
    name = msg.name
    tp = TransformParam.from_proto(msg.transform_param)
    if t == "Data":
        p = msg.data_param
        return DataSource(
            name, p.source, _backend(msg), p.batch_size, tops, tp, phase, seed, shard
        )
    if t == "ImageData":
        p = msg.image_data_param
        return ImageDataSource(
            name,
            p.source,
            p.batch_size,
            tops,
            p.root_folder,
            p.new_height,
            p.new_width,
            p.is_color,
            p.shuffle,
            p.rand_skip,
            tp,
            phase,
            seed,
            shard,
        )
    if t == "HDF5Data":
        p = msg.hdf5_data_param
        return HDF5Source(name, p.source, tuple(tops), p.batch_size, p.shuffle, seed, shard)
    if t == "MemoryData":
        p = msg.memory_data_param
        shape = (p.channels, p.height, p.width)
        return MemorySource(name, p.batch_size, shape, tops, tp, phase, seed, shard)
    if t in ("Input", "DummyData"):
        return None
    raise DataError(
        f"layer '{name}': {t} layers have no batch source in nincc; feed their blobs instead"
    )


_SOURCE_TYPES = ("Data", "ImageData", "HDF5Data", "MemoryData", "WindowData")


def sources_for(
    graph: Graph, net_param: Any, seed: int = 0, shard: Shard = WHOLE
) -> list[BatchSource]:
    """A batch source for each data layer of the graph that reads data, in layer order.

    Input and DummyData layers get none. Transforms use the graph's phase (random crops and
    mirroring in TRAIN); ``seed`` seeds the sources' random generators (layer i uses seed + i).
    Each source's first batch is checked against the shapes the graph was built for (the
    graph's batch per rank: a shard of ``count`` ranks gives ``count`` times its rows).
    """
    out: list[BatchSource] = []
    for i, layer in enumerate(graph.layers):
        if layer.type not in _SOURCE_TYPES:
            continue
        msg = _message_for(graph, layer, net_param)
        if msg is None:
            continue
        tops = _blob_names(graph, layer)
        src = source_for_layer(msg, tops, graph.phase, seed + i, layer.type, shard)
        if src is not None:
            src.expect = {}
            for t in layer.tops:
                shape = tuple(graph.value(t).shape)
                src.expect[graph.value(t).blob] = (shape[0] * shard.count, *shape[1:])
            out.append(src)
    return out


def data_record_shape(
    source: str, backend: str, transform: TransformParam = NO_TRANSFORM, where: str = "Data layer"
) -> tuple[int, int, int]:
    """(C, H, W) of a Data layer's data top, from its first record (Caffe's InferBlobShape).

    Encoded records are decoded (force_color/force_gray apply); crop_size replaces H and W.
    """
    with Cursor(source, backend_name(backend), where) as cur:
        key, value = cur.next()
    rec = parse_datum(value, f"{where}: record {key!r}", transform.decode_mode)
    c, h, w = rec.array.shape
    k = transform.crop_size
    if k and (h < k or w < k):
        raise DataError(f"{where}: crop_size {k} is larger than the record {h}x{w}")
    return (c, k, k) if k else (c, h, w)

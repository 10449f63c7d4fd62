"""Batch sources for the data layers: each yields the arrays of one layer's tops per forward.

``sources_for(graph, net_param)`` gives one source per data layer (Data, ImageData, HDF5Data,
MemoryData); ``Prefetcher(source, depth)`` runs a source in a background thread. The record
formats, databases and Caffe's DataTransformer are in the submodules.
"""

from __future__ import annotations

from .db import Cursor, Writer, iter_records
from .prefetch import Prefetcher
from .records import Record, make_datum, make_encoded_datum, parse_datum, read_blob_proto
from .sources import (
    BatchSource,
    DataSource,
    HDF5Source,
    ImageDataSource,
    MemorySource,
    Shard,
    source_for_layer,
    sources_for,
)
from .transform import DataTransformer, TransformParam

__all__ = [
    "BatchSource",
    "Cursor",
    "DataSource",
    "DataTransformer",
    "HDF5Source",
    "ImageDataSource",
    "MemorySource",
    "Prefetcher",
    "Record",
    "Shard",
    "TransformParam",
    "Writer",
    "iter_records",
    "make_datum",
    "make_encoded_datum",
    "parse_datum",
    "read_blob_proto",
    "source_for_layer",
    "sources_for",
]

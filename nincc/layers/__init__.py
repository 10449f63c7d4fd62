"""THE TABLE: every Caffe layer type nincc supports, one entry each, grouped by family.

Importing this package registers every family; ``REGISTRY`` maps Caffe type strings to entries.
"""

from . import common, data, loss, neuron, normalization, recurrent, vision  # noqa: F401
from .base import REGISTRY, BlobSpec, Filler, LayerType, LowerCtx, canonical_type, lookup

__all__ = ["REGISTRY", "BlobSpec", "Filler", "LayerType", "LowerCtx", "canonical_type", "lookup"]

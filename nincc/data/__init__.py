"""Batch sources for the data layers: each yields the arrays of one layer's tops per forward."""

from __future__ import annotations

from .sources import BatchSource, sources_for

__all__ = ["BatchSource", "sources_for"]

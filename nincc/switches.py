"""The ``NINCC_*`` environment switches that turn a default behaviour off (XLA flags, huge
pages, FFT convolutions, oneDNN's kernels): one reading of what "off" means for all of them."""

from __future__ import annotations

from collections.abc import Mapping

OFF = ("0", "false", "no", "off")


def switched_off(name: str, environ: Mapping[str, str]) -> bool:
    """Whether ``environ[name]`` says off: 0, false, no or off, in any case, spaces ignored
    (unset means on)."""
    return environ.get(name, "1").strip().lower() in OFF

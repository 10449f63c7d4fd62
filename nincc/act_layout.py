"""The memory layouts an activation (a 4-D blob) can be held in inside a compiled step.

- ``nchw``: Caffe's, (N, C, H, W);
- ``nhwc``: channels-last, (N, H, W, C), the fast lowerings' (nincc.fast);
- ``nChw16c``: oneDNN's blocked layout, channels in blocks of 16 innermost,
  (N, C/16, H, W, 16). oneDNN's kernels for 1x1 convolutions and for 3-channel stems run
  faster on it than on channels-last (docs/performance.md, section 31); nincc.blocked says
  where a step holds blobs this way.

XLA sees each as a plain row-major array of the shape above; :func:`convert` moves a blob
between them.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

NCHW, NHWC, BLOCKED = "nchw", "nhwc", "nChw16c"
BLOCK = 16
LAYOUTS = (NCHW, NHWC, BLOCKED)


def array_shape(nchw: tuple[int, int, int, int], layout: str) -> tuple[int, ...]:
    """The array shape of a blob of Caffe shape ``nchw`` held in ``layout``."""
    n, c, h, w = nchw
    if layout == NCHW:
        return (n, c, h, w)
    if layout == NHWC:
        return (n, h, w, c)
    if layout == BLOCKED:
        if c % BLOCK:
            raise ValueError(f"{BLOCKED} needs channels in multiples of {BLOCK}, got {c}")
        return (n, c // BLOCK, h, w, BLOCK)
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")


def caffe_shape(shape: tuple[int, ...], layout: str) -> tuple[int, int, int, int]:
    """The Caffe (NCHW) shape of an array of ``shape`` held in ``layout``."""
    if layout == NCHW:
        n, c, h, w = shape
    elif layout == NHWC:
        n, h, w, c = shape
    elif layout == BLOCKED:
        n, cb, h, w, b = shape
        c = cb * b
    else:
        raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    return (n, c, h, w)


def convert(x: Any, src: str, dst: str) -> Any:
    """``x``, held in ``src``, as held in ``dst`` (one transpose; XLA fuses it into the
    loops around it where it can)."""
    if src == dst:
        return x
    n, c, h, w = caffe_shape(x.shape, src)
    if src == BLOCKED:
        order = (0, 1, 4, 2, 3) if dst == NCHW else (0, 2, 3, 1, 4)
        x = jnp.transpose(x, order)
        return x.reshape(array_shape((n, c, h, w), dst))
    if dst == BLOCKED:
        if src == NCHW:
            return jnp.transpose(x.reshape(n, c // BLOCK, BLOCK, h, w), (0, 1, 3, 4, 2))
        return jnp.transpose(x.reshape(n, h, w, c // BLOCK, BLOCK), (0, 3, 1, 2, 4))
    return jnp.transpose(x, (0, 3, 1, 2) if src == NHWC else (0, 2, 3, 1))


def pad_end(x: Any, layout: str, rows_cols: tuple[int, int]) -> Any:
    """``x`` (held in ``layout``) with ``rows_cols`` zero rows and columns after its last."""
    if rows_cols == (0, 0):
        return x
    axis = 1 if layout == NHWC else 2
    widths = [(0, 0)] * x.ndim
    widths[axis], widths[axis + 1] = (0, rows_cols[0]), (0, rows_cols[1])
    return jnp.pad(x, widths)

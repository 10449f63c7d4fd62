"""Stride-1 k×k convolutions by FFT, for the train step's large-kernel layers.

A k×k correlation of an (S_h, S_w) padded plane costs k² products per output pixel and
channel pair; over the plane's 2-D real FFT it is one complex product per frequency, about
S_h (S_w / 2 + 1) of them, each a product over channels: per frequency an (n, c) @ (c, o)
complex matrix product. For NIN CIFAR-10's conv2 (5x5, 16x16 padded to 20x20) that is 7x
fewer real multiply-adds. The circular correlation wraps nothing into the outputs kept:
the transform covers the whole padded plane (rounded up to a fast size with zeros), so the
wrapped terms land only in the last k - 1 rows and columns, which a valid correlation
drops. Rounding errors stay near the direct method's (float32 FFTs err like a sum over the
plane: 3.4-5.3e-7 of max|y| against float64 on the zoo's layers, where XLA's direct
convolution errs 2.6-3.2e-7; docs/performance.md section 25).

It runs only under differentiation: the custom VJP's primal, which inference calls, is
XLA's direct convolution, the faster of the two there; the train step's forward and
backward both go through the frequency domain, where the backward's two products
(input and weight gradients) reuse the forward's transforms. XLA:CPU's batched products
need many rows per frequency to run well: below MIN_BATCH images the plane is cut in tiles
that count as images (overlap-save), or the direct path kept (:func:`tiles_for`).

Those thresholds were measured on CPUs, so the path is taken on the CPU backend only
(accelerators keep their vendors' convolutions), and ``NINCC_FFT=0`` turns it off
(:func:`enabled`): the gain depends on how fast the host's direct convolution is
(docs/performance.md sections 25 and 26).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .switches import switched_off

MIN_KERNEL = 5  # 3x3 layers lost in the step (NIN ImageNet b16 0.77x, b64 below 5x5 alone)
MIN_BATCH = 32  # NIN ImageNet's train step, one plane: 0.95x at batch 16, 1.17x at 32
MIN_CHANNELS = 64  # 32 -> 32 on a 112x112 plane, b32: 729 ms against 600 direct
MIN_TILE = 12  # NIN CIFAR-10 b16 as 2 x 2 tiles of 8 x 8 outputs: even with the direct path
MAX_TILE = 32  # larger planes in tiles: transforms of the sizes measured, kernels kept small

_CONV_DN = ("NHWC", "OIHW", "NHWC")
OPT_OUT = "NINCC_FFT"


def enabled(environ: Mapping[str, str] | None = None, backend: str | None = None) -> bool:
    """Whether convolutions may take the FFT path: on the CPU backend, unless ``NINCC_FFT``
    is 0 (or false, no, off)."""
    env = os.environ if environ is None else environ
    if switched_off(OPT_OUT, env):
        return False
    return (backend or jax.default_backend()) == "cpu"


def tiles_for(
    x_shape: tuple[int, ...],
    out_hw: tuple[int, int],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
) -> int:
    """How many tiles per side a channels-last convolution of input ``x_shape`` (output plane
    ``out_hw``) is cut into for the FFT path (0: not taken).

    Each frequency's product has one row per image and tile, and runs well only with many:
    at MIN_BATCH images and more the whole plane is one tile; from MIN_BATCH / 2, planes of
    at least 2 * MIN_TILE outputs a side are cut in 2 x 2 (NIN ImageNet's conv2 at batch
    16: 0.95x in the train step as one tile, 1.07x as four, 1.03x as nine). Planes of more
    than MAX_TILE outputs a side are cut so that no tile has more (64 -> 64 on 56x56 at
    batch 32, forward and backward: 406 ms as one plane, 404 as 2 x 2, 428 direct).
    """
    n, _, _, c = x_shape
    if not (
        tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and group == 1
        and min(kernel) >= MIN_KERNEL
        and c >= MIN_CHANNELS
    ):
        return 0
    if n >= MIN_BATCH:
        tiles = 1
    elif 2 * n >= MIN_BATCH and min(out_hw) >= 2 * MIN_TILE:
        tiles = 2
    else:
        return 0
    return max(tiles, -(-max(out_hw) // MAX_TILE))


def fft_size(n: int) -> int:
    """The smallest size >= n whose only prime factors are 2, 3, 5 and 7 (fast FFT sizes:
    NIN ImageNet's conv2 pads its 27x27 plane to 31, a prime; 32 runs faster)."""
    size = n
    while True:
        m = size
        for p in (2, 3, 5, 7):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


@lru_cache(maxsize=64)
def _kernel_basis(sh: int, sw: int, kh: int, kw: int) -> tuple[np.ndarray, np.ndarray]:
    """Real and imaginary parts of the (sh * (sw // 2 + 1), kh * kw) matrix that maps a
    kh x kw kernel to the conjugate of its zero-padded rfft2 (conjugate: correlation)."""
    fw = sw // 2 + 1
    eh = np.exp(2j * np.pi * np.outer(np.arange(sh), np.arange(kh)) / sh)
    ew = np.exp(2j * np.pi * np.outer(np.arange(fw), np.arange(kw)) / sw)
    basis = np.einsum("ai,bj->abij", eh, ew).reshape(sh * fw, kh * kw)
    return basis.real.astype(np.float32), basis.imag.astype(np.float32)


def correlate(x: Any, w: Any, padding: tuple[tuple[int, int], ...], tiles: int = 1) -> Any:
    """Caffe's stride-1 convolution through the FFT, with the output plane cut into
    ``tiles`` x ``tiles`` tiles (overlap-save): each tile's input window (its outputs plus
    kernel - 1 rows and columns) becomes an image of its own, so a small batch gives each
    frequency's product more rows, over smaller transforms; outputs past the plane's edge
    are computed and cropped."""
    if tiles == 1:
        return _correlate_plane(x, w, padding)
    n, h, wd, c = x.shape
    o, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    oh, ow = h + pt + pb - kh + 1, wd + pl + pr - kw + 1
    th, tw = -(-oh // tiles), -(-ow // tiles)
    pads = ((0, 0), (pt, tiles * th + kh - 1 - h - pt), (pl, tiles * tw + kw - 1 - wd - pl), (0, 0))
    xp = jnp.pad(x, pads)
    windows = [
        xp[:, i * th : i * th + th + kh - 1, j * tw : j * tw + tw + kw - 1, :]
        for i in range(tiles)
        for j in range(tiles)
    ]
    y = _correlate_plane(jnp.concatenate(windows, 0), w, ((0, 0), (0, 0)))
    y = y.reshape(tiles, tiles, n, th, tw, o).transpose(2, 0, 3, 1, 4, 5)
    return y.reshape(n, tiles * th, tiles * tw, o)[:, :oh, :ow, :]


def _correlate_plane(x: Any, w: Any, padding: tuple[tuple[int, int], ...]) -> Any:
    """Caffe's stride-1 convolution of channels-last ``x`` (n, h, w, c) with ``w`` (o, c,
    kh, kw), ``padding`` ((low, high), (low, high)), through the frequency domain.

    Written in differentiable jnp operations: autodiff turns each FFT into its transpose
    (another FFT) and the per-frequency product into two more, which is the backward wanted.
    """
    n, h, wd, c = x.shape
    o, _, kh, kw = w.shape
    (pt, pb), (pl, pr) = padding
    oh, ow = h + pt + pb - kh + 1, wd + pl + pr - kw + 1
    sh, sw = fft_size(h + pt + pb), fft_size(wd + pl + pr)
    fw = sw // 2 + 1
    # Caffe's padding, then zeros up to the FFT size: the extra zeros only widen the wrap.
    pads = ((0, 0), (0, 0), (pt, sh - h - pt), (pl, sw - wd - pl))
    xp = jnp.pad(jnp.transpose(x, (0, 3, 1, 2)), pads)
    xf = jnp.transpose(jnp.fft.rfft2(xp).reshape(n, c, sh * fw), (2, 0, 1))  # (freq, n, c)
    br, bi = _kernel_basis(sh, sw, kh, kw)
    taps = jnp.transpose(w.reshape(o * c, kh * kw))  # (kh kw, o c)
    wf = lax.complex(jnp.asarray(br) @ taps, jnp.asarray(bi) @ taps).reshape(sh * fw, o, c)
    yf = jnp.matmul(xf, jnp.swapaxes(wf, 1, 2))  # (freq, n, o)
    yf = jnp.transpose(yf, (1, 2, 0)).reshape(n, o, sh, fw)
    y = jnp.fft.irfft2(yf, s=(sh, sw))
    return jnp.transpose(y[:, :, :oh, :ow], (0, 2, 3, 1))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv(x: Any, w: Any, padding: tuple[tuple[int, int], ...], tiles: int) -> Any:
    """A stride-1 convolution: XLA's direct one when only the value is asked for, through
    the FFT (:func:`correlate`) when differentiated."""
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_CONV_DN)


def _conv_fwd(x, w, padding, tiles):
    return jax.vjp(partial(correlate, padding=padding, tiles=tiles), x, w)


def _conv_bwd(padding, tiles, pull, dy):
    return pull(dy)


conv.defvjp(_conv_fwd, _conv_bwd)

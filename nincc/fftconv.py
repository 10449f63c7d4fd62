"""Stride-1 k×k convolutions by FFT, for the train step's large-kernel layers.

A k×k correlation of an (S_h, S_w) padded plane costs k² products per output pixel and
channel pair; over the plane's 2-D real FFT it is one complex product per frequency, about
S_h (S_w / 2 + 1) of them, each a product over channels: per frequency an (n, c) @ (c, o)
complex matrix product. For NIN CIFAR-10's conv2 (5x5, 16x16 padded to 20x20) that is 7x
fewer real multiply-adds; the circular correlation wraps nothing into the outputs kept,
because the plane is padded by Caffe's pad only and the k - 1 wrapped rows and columns are
the ones a valid correlation drops. Rounding errors stay at the direct method's (float32
FFTs err like a sum of the plane's terms; measured 4-8e-7 of max|y| forward and backward,
where XLA's direct convolution errs 3-5e-7, docs/performance.md section 25).

It runs only under differentiation: the custom VJP's primal, which inference calls, is
XLA's direct convolution, the faster of the two there; the train step's forward and
backward both go through the frequency domain, where the backward's two products
(input and weight gradients) reuse the forward's transforms. XLA:CPU's batched products
need many images per frequency to run well, hence the batch floor (measured in section 25:
a train-step gain at batch 64, a loss at 16).
"""

from __future__ import annotations

from functools import lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

MIN_KERNEL = 5  # 3x3 layers lost in the step (NIN ImageNet b16 0.77x, b64 below 5x5 alone)
MIN_BATCH = 32  # NIN ImageNet's train step: 0.96x at batch 16, 1.06x at 64
MIN_CHANNELS = 32  # per-frequency products over fewer input channels are too narrow

_CONV_DN = ("NHWC", "OIHW", "NHWC")


def applies(
    x_shape: tuple[int, ...],
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    group: int,
) -> bool:
    """Whether a channels-last convolution of input ``x_shape`` takes the FFT path."""
    n, _, _, c = x_shape
    return (
        tuple(stride) == (1, 1)
        and tuple(dilation) == (1, 1)
        and group == 1
        and min(kernel) >= MIN_KERNEL
        and n >= MIN_BATCH
        and c >= MIN_CHANNELS
    )


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


def correlate(x: Any, w: Any, padding: tuple[tuple[int, int], ...]) -> Any:
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


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv(x: Any, w: Any, padding: tuple[tuple[int, int], ...]) -> Any:
    """A stride-1 convolution: XLA's direct one when only the value is asked for, through
    the FFT (:func:`correlate`) when differentiated."""
    return lax.conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=_CONV_DN)


def _conv_fwd(x, w, padding):
    return jax.vjp(partial(correlate, padding=padding), x, w)


def _conv_bwd(padding, pull, dy):
    return pull(dy)


conv.defvjp(_conv_fwd, _conv_bwd)

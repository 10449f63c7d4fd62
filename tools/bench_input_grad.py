"""Measure a stride-1 convolution's input gradient two ways: XLA's own (a transposed
convolution) and one product of dy with the kernel as (kh*kw*c, o) plus a fold of the
windows' gradients onto the input (docs/performance.md, section 20).

Usage: python tools/bench_input_grad.py [--repeat 15]
Prints, per shape, the median ms of the layer's full backward (both gradients) and of the
input gradient alone, and the largest difference of the two input gradients relative to
max |dx|. The kernel is held (kh, kw, in, out), as the CPU train step holds it.
"""

from __future__ import annotations

import argparse

import nincc.xla_flags

nincc.xla_flags.apply()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from bench_layout import median_time  # noqa: E402
from jax import lax  # noqa: E402

# (name, batch, square input size, in channels, out channels, kernel), stride 1, "same" pad
SHAPES = [
    ("nin_imagenet conv4", 16, 6, 384, 1024, 3),
    ("nin_imagenet conv4", 64, 6, 384, 1024, 3),
    ("nin_imagenet conv3", 16, 13, 256, 384, 3),
    ("nin_cifar10 conv3", 64, 8, 192, 192, 3),
    ("3x3 512->1024 (nin_zfnet-like)", 16, 13, 512, 1024, 3),
    ("nin_imagenet conv2", 16, 27, 96, 256, 5),
    ("nin_cifar10 conv2", 64, 16, 96, 192, 5),
]


def candidates(n: int, h: int, c: int, o: int, k: int):
    """The layer as XLA differentiates it, and with the product input gradient."""
    p = k // 2
    pads = [(p, p), (p, p)]

    def xla(x, wh):
        w = wh.transpose(3, 2, 0, 1)  # held -> Caffe's OIHW, as the train step does
        dn = ("NHWC", "OIHW", "NHWC")
        return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=dn)

    def fold(dy, wh):
        contract = (((1,), (1,)), ((), ()))
        dp = lax.dot_general(dy.reshape(-1, o), wh.reshape(k * k * c, o), contract)
        dp = dp.reshape(n, h, h, k, k, c)
        dx = sum(
            jnp.pad(dp[:, :, :, i, j, :], ((0, 0), (i, k - 1 - i), (j, k - 1 - j), (0, 0)))
            for i in range(k)
            for j in range(k)
        )
        return dx[:, p : p + h, p : p + h, :]

    @jax.custom_vjp
    def product(x, wh):
        return xla(x, wh)

    def product_fwd(x, wh):
        return xla(x, wh), (x, wh)

    def product_bwd(res, dy):
        x, wh = res
        dw = jax.vjp(lambda w: xla(x, w), wh)[1](dy)[0]
        return fold(dy, wh), dw

    product.defvjp(product_fwd, product_bwd)
    return {"xla": xla, "product": product}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()
    key = jax.random.PRNGKey(0)
    head = f"{'layer':32s} {'batch':>5s}  {'impl':8s} {'bwd ms':>8s} {'dx ms':>8s}"
    print(head + "  max|diff|/max|dx|")
    for name, n, h, c, o, k in SHAPES:
        kx, kw, kg = jax.random.split(key, 3)
        x = jax.random.normal(kx, (n, h, h, c))
        wh = jax.random.normal(kw, (k, k, c, o)) * 0.01
        g = jax.random.normal(kg, (n, h, h, o))
        ref = None
        for impl, f in candidates(n, h, c, o, k).items():
            bwd = jax.jit(lambda a, w, d, f=f: jax.vjp(f, a, w)[1](d))
            dx = jax.jit(lambda a, w, d, f=f: jax.vjp(lambda b: f(b, w), a)[1](d)[0])
            t_bwd = 1000 * median_time(bwd, x, wh, g, repeat=args.repeat)
            t_dx = 1000 * median_time(dx, x, wh, g, repeat=args.repeat)
            got = dx(x, wh, g)
            ref = got if ref is None else ref
            err = float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))
            print(f"{name:32s} {n:5d}  {impl:8s} {t_bwd:8.1f} {t_dx:8.1f}  {err:.1e}", flush=True)


if __name__ == "__main__":
    main()

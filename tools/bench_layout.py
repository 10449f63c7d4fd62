"""Measure NCHW against NHWC for the convolutions of the zoo nets on XLA (forward, fwd+bwd).

Usage: python tools/bench_layout.py [--repeat 5]
Prints the median time of each layout per layer shape and the ratio NHWC/NCHW.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# (name, batch, in channels, H, W, out channels, kernel, stride, pad) from the zoo nets
SHAPES = [
    ("nin_cifar10 conv1 5x5", 64, 3, 32, 32, 192, 5, 1, 2),
    ("nin_cifar10 cccp1 1x1", 64, 192, 32, 32, 160, 1, 1, 0),
    ("nin_cifar10 conv2 5x5", 64, 96, 16, 16, 192, 5, 1, 2),
    ("nin_imagenet conv1 11x11/4", 16, 3, 224, 224, 96, 11, 4, 0),
    ("nin_imagenet conv2 5x5", 16, 96, 27, 27, 256, 5, 1, 2),
    ("nin_imagenet cccp3 1x1", 16, 256, 27, 27, 256, 1, 1, 0),
]


def conv_fn(layout: str, stride: int, pad: int):
    dn = ("NCHW", "OIHW", "NCHW") if layout == "NCHW" else ("NHWC", "HWIO", "NHWC")

    def f(x, w):
        y = jax.lax.conv_general_dilated(
            x, w, (stride, stride), [(pad, pad), (pad, pad)], dimension_numbers=dn
        )
        return jnp.sum(jnp.maximum(y, 0))

    return jax.jit(f), jax.jit(jax.grad(f, argnums=(0, 1)))


def median_time(fn, *args, repeat: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{'layer':<28} {'mode':<8} {'NCHW ms':>9} {'NHWC ms':>9} {'NHWC/NCHW':>10}")
    for name, n, c, h, w, o, k, s, p in SHAPES:
        x = rng.standard_normal((n, c, h, w), np.float32)
        wt = rng.standard_normal((o, c, k, k), np.float32) * 0.01
        inputs = {
            "NCHW": (jnp.asarray(x), jnp.asarray(wt)),
            "NHWC": (jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(wt.transpose(2, 3, 1, 0))),
        }
        for mode in ("fwd", "fwd+bwd"):
            t = {}
            for layout in ("NCHW", "NHWC"):
                fwd, bwd = conv_fn(layout, s, p)
                fn = fwd if mode == "fwd" else bwd
                t[layout] = median_time(fn, *inputs[layout], repeat=args.repeat)
            print(
                f"{name:<28} {mode:<8} {t['NCHW'] * 1e3:9.2f} {t['NHWC'] * 1e3:9.2f} "
                f"{t['NHWC'] / t['NCHW']:10.2f}"
            )


if __name__ == "__main__":
    main()

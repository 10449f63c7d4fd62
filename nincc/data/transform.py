"""Caffe's DataTransformer: crop, mirror, mean subtraction and scaling of records.

For each record Caffe computes, in float32,

    out[c, h, w'] = (x[c, h_off + h, w_off + w] - mean[c, h_off + h, w_off + w]) * scale

where ``mean`` is the full-size mean_file blob (or ``mean_value[c]``, or 0), ``w' = width-1-w``
when the record is mirrored and ``w`` otherwise. With ``crop_size`` the offsets are uniform random
in TRAIN and centred ((H - crop) // 2, (W - crop) // 2) in TEST; ``mirror`` flips at random, in
either phase. Randomness comes from a seeded NumPy Generator: Caffe's RNG (Boost mt19937 streams
seeded per prefetch thread) cannot be reproduced, so random crops and flips follow Caffe's
distribution but not its draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .records import read_mean_file


@dataclass(frozen=True)
class TransformParam:
    """transform_param with Caffe's defaults resolved."""

    scale: float = 1.0
    mirror: bool = False
    crop_size: int = 0
    mean_file: str | None = None
    mean_values: tuple[float, ...] = ()
    force_color: bool = False
    force_gray: bool = False

    @classmethod
    def from_proto(cls, msg) -> TransformParam:
        """From a caffe_pb2.TransformationParameter."""
        return cls(
            scale=float(msg.scale),
            mirror=bool(msg.mirror),
            crop_size=int(msg.crop_size),
            mean_file=msg.mean_file if msg.HasField("mean_file") else None,
            mean_values=tuple(float(v) for v in msg.mean_value),
            force_color=bool(msg.force_color),
            force_gray=bool(msg.force_gray),
        )

    @property
    def decode_mode(self) -> str:
        """How encoded records are decoded: forced colour/grey, else as stored."""
        return "color" if self.force_color else "gray" if self.force_gray else "native"


class DataTransformer:
    """Applies one layer's transform_param to batches of (C, H, W) records.

    ``phase`` is "TRAIN" or "TEST" (random or centred crops); ``rng`` a seed or Generator.
    """

    def __init__(self, param: TransformParam, phase: str = "TEST", rng=0, layer: str = ""):
        where = f"layer '{layer}'"
        if param.mean_file is not None and param.mean_values:
            raise DataError(f"{where}: transform_param sets both mean_file and mean_value")
        if param.force_color and param.force_gray:
            raise DataError(f"{where}: transform_param sets both force_color and force_gray")
        if param.crop_size < 0:
            raise DataError(f"{where}: crop_size must be >= 0, got {param.crop_size}")
        self.param, self.phase, self.where = param, phase, where
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        self.scale = np.float32(param.scale)
        self.mean = None if param.mean_file is None else read_mean_file(param.mean_file, layer)
        self.mean_values = np.asarray(param.mean_values, np.float32)

    def out_shape(self, shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """The (C, H, W) a record of this shape becomes."""
        c, h, w = shape
        crop = self.param.crop_size
        return (c, crop, crop) if crop else (c, h, w)

    def check(self, shape: tuple[int, int, int]) -> None:
        """Raise DataError if records of this (C, H, W) do not fit the parameters (Caffe CHECKs)."""
        c, h, w = shape
        crop = self.param.crop_size
        if crop and (h < crop or w < crop):
            raise DataError(f"{self.where}: crop_size {crop} is larger than the record {h}x{w}")
        if self.mean is not None and self.mean.shape != (c, h, w):
            raise DataError(
                f"{self.where}: mean_file '{self.param.mean_file}' has shape "
                f"{list(self.mean.shape)}, the records are {[c, h, w]} (C, H, W before crop)"
            )
        nv = len(self.mean_values)
        if nv > 1 and nv != c:
            raise DataError(
                f"{self.where}: {nv} mean_value entries for {c}-channel records; give 1 or {c}"
            )

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Transform a stack of records (N, C, H, W), uint8 or float32, to float32 (N, C, h, w)."""
        if batch.ndim != 4:
            raise DataError(f"{self.where}: expected (N, C, H, W) records, got {list(batch.shape)}")
        n, c, h, w = batch.shape
        self.check((c, h, w))
        p = self.param
        # Caffe draws the mirror coin first, then the crop offsets.
        flips = self.rng.integers(0, 2, n).astype(bool) if p.mirror else np.zeros(n, bool)
        x = batch.astype(np.float32)
        if self.mean is not None:
            x = x - self.mean[None]
        elif len(self.mean_values):
            x = x - np.broadcast_to(self.mean_values, (c,))[None, :, None, None]
        x = x * self.scale
        if p.crop_size:
            k = p.crop_size
            if self.phase == "TRAIN":
                hs = self.rng.integers(0, h - k + 1, n)
                ws = self.rng.integers(0, w - k + 1, n)
                x = np.stack([x[i, :, hs[i] : hs[i] + k, ws[i] : ws[i] + k] for i in range(n)])
            else:
                ho, wo = (h - k) // 2, (w - k) // 2
                x = x[:, :, ho : ho + k, wo : wo + k]
        if flips.any():
            x = np.where(flips[:, None, None, None], x[..., ::-1], x)
        return np.ascontiguousarray(x, np.float32)

"""Source layers: the net's inputs (Input, DummyData and Caffe's data layers as graph inputs).

A source layer's tops are fed by the caller (``apply(params, {blob: array})``). The data layers'
shapes follow Caffe's DataLayerSetUp: the batch size from the layer, the record shape read from
the first record of the source when it is at hand, otherwise from ``transform_param.crop_size``.
Reading batches is the job of nincc.data, not of the compiled function.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import jax.numpy as jnp

from ..errors import DataError, InputError, ShapeError
from .base import Filler, LayerType, register

# ---------------------------------------------------------------- shared helpers


def _blob_shape(msg) -> tuple[int, ...]:
    return tuple(int(d) for d in msg.dim)


def _fed(attrs, params, bottoms, ctx):
    """Every top comes from ctx.feeds under its Caffe blob name, with the built shape."""
    out = []
    for name, shape in zip(ctx.top_names, ctx.top_shapes):
        if name not in ctx.feeds:
            raise InputError(
                f"layer '{ctx.layer_name}': no array fed for input blob '{name}' "
                f"(expected shape {list(shape)})"
            )
        x = jnp.asarray(ctx.feeds[name])
        if tuple(x.shape) != tuple(shape):
            raise InputError(
                f"input blob '{name}' has shape {list(x.shape)}, the net expects {list(shape)}"
            )
        out.append(x.astype(jnp.float32) if x.dtype != jnp.float32 else x)
    return out


def _crop_or(msg, what: str, batch: int, layer: str, source: str) -> list[tuple[int, ...]]:
    """Fallback shape when a source cannot be read: (batch, C, crop, crop) from transform_param."""
    tp = msg.transform_param
    if tp.crop_size:
        channels = len(tp.mean_value) if len(tp.mean_value) > 1 else 3
        return [(batch, channels, tp.crop_size, tp.crop_size)]
    raise DataError(
        f"{what} source '{source}' not found (relative paths are read from the working "
        f"directory, as in Caffe): the shape of its records cannot be inferred; create the "
        f"database (see `nincc` tools) or pass the input shape explicitly"
    )


# ---------------------------------------------------------------- Input


@dataclass(frozen=True)
class InputAttrs:
    shapes: tuple[tuple[int, ...], ...]


def _input_attrs(msg) -> InputAttrs:
    return InputAttrs(tuple(_blob_shape(s) for s in msg.input_param.shape))


def _input_shapes_for(a: InputAttrs, ntops: int) -> list[tuple[int, ...]]:
    if len(a.shapes) == 1:
        return [a.shapes[0]] * ntops
    if len(a.shapes) != ntops:
        raise ShapeError(f"input_param gives {len(a.shapes)} shapes for {ntops} tops")
    return list(a.shapes)


@dataclass(frozen=True)
class TopsAttrs:
    """Attrs wrapper carrying the number of tops (shape rules need it)."""

    ntops: int
    inner: object


def _with_tops(attrs_fn):
    return lambda msg: TopsAttrs(len(msg.top), attrs_fn(msg))


register(
    LayerType(
        name="Input",
        doc="net inputs fed by the caller; input_param.shape gives one shape or one per top",
        attrs=_with_tops(_input_attrs),
        shape=lambda a, b: _input_shapes_for(a.inner, a.ntops),
        lower=_fed,
        n_bottoms=(0, 0),
        n_tops=(1, None),
        param_field="input_param",
        source=True,
        family="data",
    )
)

# ---------------------------------------------------------------- DummyData


@dataclass(frozen=True)
class DummyAttrs:
    shapes: tuple[tuple[int, ...], ...]
    fillers: tuple[Filler, ...]


def _dummy_attrs(msg) -> TopsAttrs:
    p = msg.dummy_data_param
    n = len(msg.top)
    if len(p.shape):
        shapes = [_blob_shape(s) for s in p.shape]
    else:
        legacy = [p.num, p.channels, p.height, p.width]
        k = max(len(x) for x in legacy) if any(len(x) for x in legacy) else 0
        shapes = [tuple(int(x[i if len(x) > 1 else 0]) for x in legacy) for i in range(k)]
    if len(shapes) == 1:
        shapes = shapes * n
    if len(shapes) != n:
        raise ShapeError(f"dummy_data_param gives {len(shapes)} shapes for {n} tops")
    fillers = [Filler.from_proto(f) for f in p.data_filler]
    if not fillers:
        fillers = [Filler()]
    if len(fillers) == 1:
        fillers = fillers * n
    if len(fillers) != n:
        raise ShapeError(f"dummy_data_param gives {len(fillers)} data_fillers for {n} tops")
    return TopsAttrs(n, DummyAttrs(tuple(shapes), tuple(fillers)))


def _dummy_lower(a: TopsAttrs, params, bottoms, ctx):
    import jax

    out = []
    for name, shape, f in zip(ctx.top_names, ctx.top_shapes, a.inner.fillers):
        if name in ctx.feeds:
            out.extend(_fed(a, params, bottoms, _only(ctx, name, shape)))
        elif f.type == "constant":
            out.append(jnp.full(shape, f.value, jnp.float32))
        elif f.type == "uniform":
            out.append(jax.random.uniform(ctx.key(), shape, jnp.float32, f.min, f.max))
        elif f.type == "gaussian":
            out.append(f.mean + f.std * jax.random.normal(ctx.key(), shape, jnp.float32))
        else:
            raise InputError(
                f"layer '{ctx.layer_name}': DummyData filler '{f.type}' is not generated in the "
                "compiled net; feed the blob instead"
            )
    return out


def _only(ctx, name, shape):
    from .base import LowerCtx

    return LowerCtx(ctx.phase, ctx.layer_name, None, ctx.feeds, (name,), (shape,))


register(
    LayerType(
        name="DummyData",
        doc="tops filled from data_filler (constant, uniform, gaussian) unless fed",
        attrs=_dummy_attrs,
        shape=lambda a, b: list(a.inner.shapes),
        lower=_dummy_lower,
        n_bottoms=(0, 0),
        n_tops=(1, None),
        param_field="dummy_data_param",
        source=True,
        family="data",
    )
)

# ---------------------------------------------------------------- Data (LMDB / LevelDB)


@dataclass(frozen=True)
class DataAttrs:
    batch: int
    source: str
    backend: str
    ntops: int
    fallback: tuple[tuple[int, ...], ...]
    record: tuple[int, ...] | None


def _first_datum_shape(msg, source: str, backend: str) -> tuple[int, ...] | None:
    """(C, H, W) of the first record of the layer's database (decoded as its transform_param
    asks), or None where it cannot be read here (absent, or its reader not installed)."""
    import dataclasses
    import importlib.util

    from ..data.sources import data_record_shape
    from ..data.transform import TransformParam

    module = {"LMDB": "lmdb", "LEVELDB": "plyvel"}.get(backend)
    if module is None or not os.path.exists(source) or importlib.util.find_spec(module) is None:
        return None
    transform = dataclasses.replace(TransformParam.from_proto(msg.transform_param), crop_size=0)
    return data_record_shape(source, backend, transform, f"Data layer '{msg.name}'")


def _data_attrs(msg) -> DataAttrs:
    p = msg.data_param
    backend = type(p).DESCRIPTOR.fields_by_name["backend"].enum_type.values_by_number[p.backend]
    rec = _first_datum_shape(msg, p.source, backend.name)
    fallback: tuple = ()
    if rec is None:
        try:
            fallback = tuple(_crop_or(msg, "Data", p.batch_size, msg.name, p.source))
        except DataError:
            fallback = ()
    return DataAttrs(p.batch_size, p.source, backend.name, len(msg.top), fallback, rec)


def _crop_shape(rec: tuple[int, ...], crop: int) -> tuple[int, ...]:
    return (rec[0], crop, crop) if crop else rec


def _data_shape(a: DataAttrs, bottoms):
    if a.record is not None:
        data = (a.batch, *a.record)
    elif a.fallback:
        data = a.fallback[0]
    else:
        raise DataError(
            f"Data source '{a.source}' ({a.backend}) not found (relative paths are read from the "
            "working directory, as in Caffe), so its record shape is unknown; create the database "
            "or give the shape (CLI: --input-shape data=N,C,H,W)"
        )
    return [data, (a.batch,)][: a.ntops]


def _data_attrs_cropped(msg) -> DataAttrs:
    a = _data_attrs(msg)
    if a.record is not None and msg.transform_param.crop_size:
        a = DataAttrs(
            a.batch,
            a.source,
            a.backend,
            a.ntops,
            a.fallback,
            _crop_shape(a.record, msg.transform_param.crop_size),
        )
    return a


register(
    LayerType(
        name="Data",
        doc="Datum records from LMDB/LevelDB: tops data (N,C,H,W) and optional label (N,)",
        attrs=_data_attrs_cropped,
        shape=_data_shape,
        lower=_fed,
        n_bottoms=(0, 0),
        n_tops=(1, 2),
        param_field="data_param",
        source=True,
        family="data",
    )
)

# ---------------------------------------------------------------- ImageData, WindowData, MemoryData


@dataclass(frozen=True)
class FixedAttrs:
    shapes: tuple[tuple[int, ...], ...]


def _image_data_attrs(msg) -> FixedAttrs:
    p = msg.image_data_param
    crop = msg.transform_param.crop_size
    c = 3 if p.is_color else 1
    if crop:
        hw = (crop, crop)
    elif p.new_height and p.new_width:
        hw = (p.new_height, p.new_width)
    else:
        hw = _first_image_hw(p.source, p.root_folder)
    return FixedAttrs(((p.batch_size, c, *hw), (p.batch_size,))[: len(msg.top)])


def _first_image_hw(listfile: str, root: str) -> tuple[int, int]:
    try:
        with open(listfile) as f:
            first = f.readline().split()
        from PIL import Image

        with Image.open(os.path.join(root, first[0])) as img:
            return (img.height, img.width)
    except (OSError, IndexError, ImportError) as e:
        raise DataError(
            f"ImageData source '{listfile}' cannot be read to find the image size ({e}); set "
            "new_height/new_width or crop_size"
        ) from None


register(
    LayerType(
        name="ImageData",
        doc="images from a list file: data (N,C,H,W), label (N,); C is 3 unless is_color false",
        attrs=_image_data_attrs,
        shape=lambda a, b: list(a.shapes),
        lower=_fed,
        n_bottoms=(0, 0),
        n_tops=(1, 2),
        param_field="image_data_param",
        source=True,
        family="data",
    )
)


def _window_attrs(msg) -> FixedAttrs:
    p = msg.window_data_param
    crop = msg.transform_param.crop_size or p.crop_size
    if not crop:
        raise ShapeError("WindowData needs crop_size")
    return FixedAttrs(((p.batch_size, 3, crop, crop), (p.batch_size,))[: len(msg.top)])


register(
    LayerType(
        name="WindowData",
        doc="R-CNN style windows cropped from images: data (N,3,crop,crop), label (N,)",
        attrs=_window_attrs,
        shape=lambda a, b: list(a.shapes),
        lower=_fed,
        n_bottoms=(0, 0),
        n_tops=(1, 2),
        param_field="window_data_param",
        source=True,
        family="data",
    )
)


def _memory_attrs(msg) -> FixedAttrs:
    p = msg.memory_data_param
    return FixedAttrs(
        ((p.batch_size, p.channels, p.height, p.width), (p.batch_size,))[: len(msg.top)]
    )


register(
    LayerType(
        name="MemoryData",
        doc="arrays handed over in memory: data (N,C,H,W) and label (N,)",
        attrs=_memory_attrs,
        shape=lambda a, b: list(a.shapes),
        lower=_fed,
        n_bottoms=(0, 0),
        n_tops=(1, 2),
        param_field="memory_data_param",
        source=True,
        family="data",
    )
)

# ---------------------------------------------------------------- HDF5Data


@dataclass(frozen=True)
class HDF5Attrs:
    source: str
    batch: int
    tops: tuple[str, ...]


def _hdf5_attrs(msg) -> HDF5Attrs:
    p = msg.hdf5_data_param
    return HDF5Attrs(p.source, p.batch_size, tuple(msg.top))


def _hdf5_shape(a: HDF5Attrs, bottoms) -> list[tuple[int, ...]]:
    """(batch, *row shape) of each dataset, read from the first file the list names."""
    shapes = []
    try:
        with open(a.source) as f:
            files = [line.strip() for line in f if line.strip()]
        import h5py

        with h5py.File(files[0], "r") as h:
            for top in a.tops:
                shapes.append((a.batch, *h[top].shape[1:]))
    except (OSError, IndexError, KeyError, ImportError) as e:
        raise DataError(
            f"HDF5Data source '{a.source}' cannot be read to find the dataset shapes ({e}); "
            "it lists .h5 files holding one dataset per top"
        ) from None
    return shapes


register(
    LayerType(
        name="HDF5Data",
        doc="datasets named after the tops, read from the .h5 files a list file names",
        attrs=_hdf5_attrs,
        shape=_hdf5_shape,
        lower=_fed,
        n_bottoms=(0, 0),
        n_tops=(1, None),
        param_field="hdf5_data_param",
        source=True,
        family="data",
    )
)

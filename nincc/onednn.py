"""Convolutions through oneDNN, called in place from jitted code as XLA FFI custom calls.

XLA:CPU's own convolution kernels run the zoo's layers up to 2.9x slower than oneDNN's, the
kernels PyTorch uses (docs/performance.md section 27). This module reaches oneDNN without a
compiled extension: ``libdnnl`` (the ``onednn`` extra, oneDNN 3.x's C API, whose enums are
ABI-stable across 3.x) is loaded with ctypes, and each convolution geometry gets an FFI
handler -- a ctypes callback registered with :func:`jax.ffi.register_ffi_target` -- that
runs a cached oneDNN primitive directly on the buffers XLA passes: no copy in or out, unlike
a host callback. The scratch memory a primitive needs (its scratchpad, weights reordered
into its blocked layout) is an extra output of the custom call, so XLA owns every byte and
concurrent calls share nothing. Activations are NHWC (oneDNN's ``nhwc``), weights Caffe's
OIHW (``goihw`` with groups); dilation is Caffe's (oneDNN counts it from 0).

:func:`conv` is differentiable (custom VJP: oneDNN's backward-data and backward-weights
primitives, the bias gradient from the latter). It is used on the CPU backend when the
library loads, unless ``NINCC_ONEDNN=0`` (:func:`enabled`).
"""

from __future__ import annotations

import ctypes as C
import ctypes.util
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from functools import cache, cached_property, lru_cache, partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import act_layout
from .switches import switched_off

OPT_OUT = "NINCC_ONEDNN"

# oneDNN 3.x C API values (oneapi/dnnl/dnnl_types.h, dnnl_common_types.h)
_F32 = 3
_CPU_ENGINE = 1
_STREAM_IN_ORDER = 1
_TAG_ANY, _TAG_X, _TAG_NHWC, _TAG_OIHW, _TAG_GOIHW = 1, 2, 22, 5, 6
_TAG_NCHW, _TAG_NCHW16C = 5, 78  # abcd, aBcd16b
LAYOUT_TAGS = {act_layout.NHWC: _TAG_NHWC, act_layout.NCHW: _TAG_NCHW,
               act_layout.BLOCKED: _TAG_NCHW16C}
_FORWARD_TRAINING, _FORWARD_INFERENCE = 64, 96
_CONVOLUTION_DIRECT = 1
_ELTWISE_RELU = 0x20
_QUERY_IMPL_INFO = 8
_QUERY_WEIGHTS_MD, _QUERY_DIFF_WEIGHTS_MD, _QUERY_SCRATCHPAD_MD = 131, 132, 136
_SCRATCHPAD_USER = 1
_ARG_SRC, _ARG_DST, _ARG_WEIGHTS, _ARG_BIAS, _ARG_SCRATCHPAD = 1, 17, 33, 41, 80
_ARG_DIFF_SRC, _ARG_DIFF_DST, _ARG_DIFF_WEIGHTS, _ARG_DIFF_BIAS = 129, 145, 161, 169
_ARG_FROM, _ARG_TO = 1, 17

_vp = C.c_void_p
_DIMS = C.c_int64 * 12


class OneDNNError(RuntimeError):
    """A oneDNN call failed (its status code and what was being done)."""


# ---------------------------------------------------------------- loading the library


def _candidates() -> list[str]:
    """Where libdnnl may be: the environment's lib directory (the PyPI wheels install it
    there), then the system's search path."""
    names = []
    for prefix in dict.fromkeys((sys.prefix, sys.base_prefix)):
        names.append(os.path.join(prefix, "lib", "libdnnl.so.3"))
    found = ctypes.util.find_library("dnnl")
    if found:
        names.append(found)
    return names


@contextmanager
def _passive_openmp() -> Iterator[None]:
    """Load time only: OpenMP threads that sleep when a parallel region ends.

    The PyPI oneDNN runs on GNU OpenMP, whose idle threads spin by default; between two
    oneDNN calls such a spinning thread takes a core from XLA's own threads (with 2 cores:
    half the machine). libgomp reads the policy once, when it loads, so it is set for the
    load and then restored, leaving other OpenMP users (PyTorch's own copy) as they were. A
    policy the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``) is kept.
    """
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        yield
        return
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        yield
    finally:
        del os.environ["OMP_WAIT_POLICY"]


@lru_cache(maxsize=1)
def _lib() -> C.CDLL | None:
    for name in _candidates():
        try:
            with _passive_openmp():
                lib = C.CDLL(name)
        except OSError:
            continue
        lib.dnnl_version.restype = C.POINTER(C.c_int32 * 3)
        if lib.dnnl_version().contents[0] != 3:
            continue
        lib.dnnl_primitive_desc_query_md.restype = _vp
        lib.dnnl_memory_desc_get_size.restype = C.c_size_t
        return lib
    return None


def available() -> bool:
    """Whether a oneDNN 3.x library loads (``pip install 'nincc[onednn]'``) and this JAX has
    the FFI (``jax.ffi``) to call it."""
    return hasattr(jax, "ffi") and _lib() is not None


def version() -> str | None:
    """The loaded oneDNN's version, e.g. ``3.2.0`` (None without the library)."""
    lib = _lib()
    if lib is None:
        return None
    v = lib.dnnl_version().contents
    return ".".join(str(x) for x in v)


_off: ContextVar[bool] = ContextVar("nincc_onednn_off", default=False)


@contextmanager
def disabled() -> Iterator[None]:
    """XLA's kernels while tracing inside this block: for programs that must not name this
    process's FFI handlers (``jax.export`` artefacts run elsewhere)."""
    token = _off.set(True)
    try:
        yield
    finally:
        _off.reset(token)


def enabled(environ: Mapping[str, str] | None = None, backend: str | None = None) -> bool:
    """Whether convolutions (and MAX pooling and InnerProduct: nincc.onednn_pool,
    nincc.onednn_matmul) go through oneDNN: on the CPU backend, with the library
    present, unless ``NINCC_ONEDNN`` is 0 (or false, no, off) or inside :func:`disabled`."""
    env = os.environ if environ is None else environ
    if switched_off(OPT_OUT, env) or _off.get():
        return False
    return (backend or jax.default_backend()) == "cpu" and available()


def _check(status: int, what: str) -> None:
    if status != 0:
        raise OneDNNError(f"oneDNN {what} failed (status {status})")


@lru_cache(maxsize=1)
def _engine() -> _vp:
    eng = _vp()
    _check(_lib().dnnl_engine_create(C.byref(eng), _CPU_ENGINE, 0), "engine creation")
    return eng


_streams = threading.local()


def _stream() -> _vp:
    """One oneDNN stream per calling thread (XLA may run independent calls concurrently)."""
    s = getattr(_streams, "stream", None)
    if s is None:
        s = _vp()
        _check(_lib().dnnl_stream_create(C.byref(s), _engine(), _STREAM_IN_ORDER), "stream")
        _streams.stream = s
    return s


# ---------------------------------------------------------------- primitives


class _ExecArg(C.Structure):
    _fields_ = [("arg", C.c_int), ("memory", _vp)]


def _md(dims: tuple[int, ...], tag: int) -> _vp:
    md = _vp()
    _check(
        _lib().dnnl_memory_desc_create_with_tag(C.byref(md), len(dims), _DIMS(*dims), _F32, tag),
        "memory descriptor",
    )
    return md


def _md_size(md: _vp) -> int:
    return int(_lib().dnnl_memory_desc_get_size(md))


def _query_md(pd: _vp, what: int) -> _vp:
    return _vp(_lib().dnnl_primitive_desc_query_md(pd, what, 0))


def _impl(pd: _vp) -> str:
    info = C.c_char_p()
    _lib().dnnl_primitive_desc_query(pd, _QUERY_IMPL_INFO, 0, C.byref(info))
    return (info.value or b"?").decode()


def _user_attr(relu: float | None = None) -> _vp:
    """Primitive attributes: the scratchpad is the caller's; optionally a fused ReLU."""
    attr = _vp()
    lib = _lib()
    _check(lib.dnnl_primitive_attr_create(C.byref(attr)), "attribute creation")
    _check(lib.dnnl_primitive_attr_set_scratchpad_mode(attr, _SCRATCHPAD_USER), "scratchpad")
    if relu is not None:
        post_ops = _vp()
        _check(lib.dnnl_post_ops_create(C.byref(post_ops)), "post-ops creation")
        _check(
            lib.dnnl_post_ops_append_eltwise(
                post_ops, _ELTWISE_RELU, C.c_float(relu), C.c_float(0)
            ),
            "fused ReLU",
        )
        _check(lib.dnnl_primitive_attr_set_post_ops(attr, post_ops), "post-ops")
        lib.dnnl_post_ops_destroy(post_ops)
    return attr


@dataclass(frozen=True)
class ConvSpec:
    """One convolution's geometry: input (n, h, w, c), Caffe weights (o, c/g, kh, kw),
    output (n, oh, ow, o); padding low and high per axis, Caffe dilation. The input and the
    output are held as ``src`` and ``dst`` say (nincc.act_layout: NHWC unless the step
    holds them otherwise, nincc.blocked)."""

    n: int
    h: int
    w: int
    c: int
    o: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    pad_low: tuple[int, int]
    pad_high: tuple[int, int]
    dilation: tuple[int, int]
    group: int
    bias: bool
    relu: float | None = None  # forward only: a ReLU of this negative slope fused after
    src: str = act_layout.NHWC
    dst: str = act_layout.NHWC

    @property
    def y_nchw(self) -> tuple[int, int, int, int]:
        """The output's Caffe shape."""
        return (self.n, self.o, *self.out_hw)

    @property
    def out_hw(self) -> tuple[int, int]:
        return tuple(  # type: ignore[return-value]
            (i + lo + hi - ((k - 1) * d + 1)) // s + 1
            for i, lo, hi, k, d, s in zip(
                (self.h, self.w),
                self.pad_low,
                self.pad_high,
                self.kernel,
                self.dilation,
                self.stride,
                strict=True,
            )
        )

    def descs(self) -> dict[str, Any]:
        """oneDNN memory descriptors (logical NCHW dims, as oneDNN wants them)."""
        oh, ow = self.out_hw
        kh, kw = self.kernel
        g = self.group
        if g == 1:
            wdims, wtag = (self.o, self.c, kh, kw), _TAG_OIHW
        else:
            wdims, wtag = (g, self.o // g, self.c // g, kh, kw), _TAG_GOIHW
        return {
            "src": _md((self.n, self.c, self.h, self.w), LAYOUT_TAGS[self.src]),
            "dst": _md((self.n, self.o, oh, ow), LAYOUT_TAGS[self.dst]),
            "w_user": _md(wdims, wtag),
            "w_any": _md(wdims, _TAG_ANY),
            "bias": _md((self.o,), _TAG_X) if self.bias else None,
        }

    def geometry(self) -> tuple[_DIMS, _DIMS, _DIMS, _DIMS]:
        """strides, dilations (oneDNN's, from 0), padding low, padding high."""
        return (
            _DIMS(*self.stride),
            _DIMS(*(d - 1 for d in self.dilation)),
            _DIMS(*self.pad_low),
            _DIMS(*self.pad_high),
        )


class _Primitive:
    """A created oneDNN primitive, its implementation's name, its scratchpad's descriptor
    and size, and (``w_md``, ``reorder``) the weight layout it reads or writes and the
    reorder between that and Caffe's (None where they agree)."""

    def __init__(self, pd: _vp, w_md: _vp, reorder: _vp | None) -> None:
        self.pd = pd
        self.impl = _impl(pd)
        self.prim = _vp()
        _check(_lib().dnnl_primitive_create(C.byref(self.prim), pd), "primitive creation")
        self.scratchpad_md = _query_md(pd, _QUERY_SCRATCHPAD_MD)
        self.scratchpad_bytes = _md_size(self.scratchpad_md)
        self.w_md, self.reorder = w_md, reorder


def _reorder(src_md: Any, dst_md: Any) -> _vp:
    """A reorder primitive between two layouts of the same weights."""
    lib = _lib()
    pd, prim = _vp(), _vp()
    eng = _engine()
    _check(
        lib.dnnl_reorder_primitive_desc_create(C.byref(pd), src_md, eng, dst_md, eng, None),
        "weight reorder",
    )
    _check(lib.dnnl_primitive_create(C.byref(prim), pd), "reorder primitive")
    return prim


def _same_layout(a: Any, b: Any) -> bool:
    return bool(_lib().dnnl_memory_desc_equal(a, b))


class ConvPrimitives:
    """The forward, backward-data and backward-weights primitives of one ConvSpec, each
    created when first asked for (at trace time, so a call never creates one)."""

    def __init__(self, spec: ConvSpec) -> None:
        self.spec = spec
        self.d = spec.descs()

    def _fwd_pd(self, prop: int, attr: _vp | None) -> _vp:
        d, lib = self.d, _lib()
        pd = _vp()
        _check(
            lib.dnnl_convolution_forward_primitive_desc_create(
                C.byref(pd),
                _engine(),
                prop,
                _CONVOLUTION_DIRECT,
                d["src"],
                d["w_any"],
                d["bias"],
                d["dst"],
                *self.spec.geometry(),
                attr,
            ),
            "convolution forward",
        )
        return pd

    @cached_property
    def hint(self) -> _vp:
        """The training forward's descriptor, which oneDNN's backward descriptors take."""
        return self._fwd_pd(_FORWARD_TRAINING, None)

    def _primitive(self, pd: _vp, query: int, to_user: bool = False) -> _Primitive:
        """The primitive of ``pd`` with the reorder between Caffe's weight layout and the
        one it reads (``to_user``: writes) -- none where they agree."""
        wmd, user = _query_md(pd, query), self.d["w_user"]
        reorder = None
        if not _same_layout(wmd, user):
            reorder = _reorder(wmd, user) if to_user else _reorder(user, wmd)
        return _Primitive(pd, wmd, reorder)

    def _backward_pd(self, create: Any, descs: tuple, what: str) -> _vp:
        pd = _vp()
        geometry = self.spec.geometry()
        _check(
            create(C.byref(pd), _engine(), _CONVOLUTION_DIRECT, *descs, *geometry, self.hint,
                   _user_attr()),
            what,
        )
        return pd

    def descriptor(self, direction: str) -> tuple[_vp, int, bool]:
        """A new descriptor of one direction ("forward", "backward_data" or
        "backward_weights"; oneDNN's choice of kernel, which ``dnnl_primitive_desc_next_impl``
        moves on), the query for the weight layout it uses, and whether it writes weights."""
        d, lib = self.d, _lib()
        if direction == "forward":
            pd = self._fwd_pd(_FORWARD_INFERENCE, _user_attr(self.spec.relu))
            return pd, _QUERY_WEIGHTS_MD, False
        if direction == "backward_data":
            create = lib.dnnl_convolution_backward_data_primitive_desc_create
            descs = (d["src"], d["w_any"], d["dst"])
            pd = self._backward_pd(create, descs, "convolution backward data")
            return pd, _QUERY_WEIGHTS_MD, False
        if direction == "backward_weights":
            create = lib.dnnl_convolution_backward_weights_primitive_desc_create
            descs = (d["src"], d["w_any"], d["bias"], d["dst"])
            pd = self._backward_pd(create, descs, "convolution backward weights")
            return pd, _QUERY_DIFF_WEIGHTS_MD, True
        raise ValueError(f"unknown direction {direction!r}")

    @cached_property
    def forward(self) -> _Primitive:
        return self._primitive(*self.descriptor("forward"))

    @cached_property
    def backward_data(self) -> _Primitive:
        return self._primitive(*self.descriptor("backward_data"))

    @cached_property
    def backward_weights(self) -> _Primitive:
        return self._primitive(*self.descriptor("backward_weights"))


def _memory(md: Any, ptr: int) -> _vp:
    mem = _vp()
    _check(_lib().dnnl_memory_create(C.byref(mem), md, _engine(), _vp(ptr)), "memory object")
    return mem


def _execute(prim: _vp, args: dict[int, tuple[Any, int]]) -> None:
    """Run ``prim`` on the stream of this thread; ``args`` maps oneDNN argument ids to
    (memory descriptor, pointer). Memory objects are made per call: they are cheap, and a
    call then shares no state with one running concurrently on another thread."""
    lib = _lib()
    mems = [(arg, _memory(md, ptr)) for arg, (md, ptr) in args.items()]
    try:
        packed = (_ExecArg * len(mems))(*(_ExecArg(a, m) for a, m in mems))
        stream = _stream()
        _check(lib.dnnl_primitive_execute(prim, stream, len(mems), packed), "execution")
        _check(lib.dnnl_stream_wait(stream), "stream wait")
    finally:
        for _, m in mems:
            lib.dnnl_memory_destroy(m)


# ---------------------------------------------------------------- running the three directions


def _weights_in(p: ConvPrimitives, prim: _Primitive, w: int, outs: list[int]) -> int:
    """Caffe-layout weights ``w`` as ``prim`` reads them: reordered into the call's third
    output where the layouts differ (see :func:`_scratch`)."""
    if prim.reorder is None:
        return w
    _execute(prim.reorder, {_ARG_FROM: (p.d["w_user"], w), _ARG_TO: (prim.w_md, outs[2])})
    return outs[2]


def _run_forward(p: ConvPrimitives, ins: list[int], outs: list[int]) -> None:
    prim, d = p.forward, p.d
    x, w = ins[0], _weights_in(p, prim, ins[1], outs)
    y, scratch = outs[0], outs[1]
    args = {
        _ARG_SRC: (d["src"], x),
        _ARG_WEIGHTS: (prim.w_md, w),
        _ARG_DST: (d["dst"], y),
        _ARG_SCRATCHPAD: (prim.scratchpad_md, scratch),
    }
    if p.spec.bias:
        args[_ARG_BIAS] = (d["bias"], ins[2])
    _execute(prim.prim, args)


def _run_backward_data(p: ConvPrimitives, ins: list[int], outs: list[int]) -> None:
    prim, d = p.backward_data, p.d
    dy, w = ins[0], _weights_in(p, prim, ins[1], outs)
    dx, scratch = outs[0], outs[1]
    _execute(
        prim.prim,
        {
            _ARG_DIFF_DST: (d["dst"], dy),
            _ARG_WEIGHTS: (prim.w_md, w),
            _ARG_DIFF_SRC: (d["src"], dx),
            _ARG_SCRATCHPAD: (prim.scratchpad_md, scratch),
        },
    )


def _run_backward_weights(p: ConvPrimitives, ins: list[int], outs: list[int]) -> None:
    prim, d = p.backward_weights, p.d
    x, dy = ins
    dw = outs[0]
    rest = outs[1:]
    db = rest.pop(0) if p.spec.bias else None
    scratch = rest.pop(0)
    target = rest.pop(0) if prim.reorder is not None else dw
    args = {
        _ARG_SRC: (d["src"], x),
        _ARG_DIFF_DST: (d["dst"], dy),
        _ARG_DIFF_WEIGHTS: (prim.w_md, target),
        _ARG_SCRATCHPAD: (prim.scratchpad_md, scratch),
    }
    if db is not None:
        args[_ARG_DIFF_BIAS] = (d["bias"], db)
    _execute(prim.prim, args)
    if prim.reorder is not None:
        _execute(prim.reorder, {_ARG_FROM: (prim.w_md, target), _ARG_TO: (d["w_user"], dw)})


# ---------------------------------------------------------------- the XLA FFI side


def _struct(name: str, *fields: tuple[str, Any], head: bool = True) -> type:
    """A ctypes mirror of one struct of XLA's FFI C API (xla/ffi/api/c_api.h); most begin
    with ``struct_size`` and ``extension_start``."""
    base = [("struct_size", C.c_size_t), ("extension_start", _vp)] if head else []
    return type(name, (C.Structure,), {"_fields_": base + list(fields)})


_ExtBase = _struct("_ExtBase", ("struct_size", C.c_size_t), ("type", C.c_int), ("next", _vp),
                   head=False)
_ApiVersion = _struct("_ApiVersion", ("major", C.c_int), ("minor", C.c_int))
_Metadata = _struct(
    "_Metadata",
    ("struct_size", C.c_size_t),
    ("api_version", _ApiVersion),
    ("traits", C.c_uint32),
    ("state_type_id", C.c_int64),
    head=False,
)
_MetadataExtension = _struct(
    "_MetadataExtension", ("base", _ExtBase), ("metadata", C.POINTER(_Metadata)), head=False
)
_Buffer = _struct(
    "_Buffer",
    ("dtype", C.c_int),
    ("data", _vp),
    ("rank", C.c_int64),
    ("dims", C.POINTER(C.c_int64)),
)
# XLA_FFI_Args and XLA_FFI_Rets share this layout
_Buffers = _struct(
    "_Buffers", ("size", C.c_int64), ("types", _vp), ("items", C.POINTER(C.POINTER(_Buffer)))
)
_Attrs = _struct("_Attrs", ("size", C.c_int64), ("types", _vp), ("names", _vp), ("attrs", _vp))
_CallFrame = _struct(
    "_CallFrame",
    ("struct_size", C.c_size_t),
    ("extension_start", C.POINTER(_ExtBase)),
    ("api", _vp),
    ("ctx", _vp),
    ("stage", C.c_int),
    ("args", _Buffers),
    ("rets", _Buffers),
    ("attrs", _Attrs),
    ("future", _vp),
    head=False,
)
_ErrorCreateArgs = _struct("_ErrorCreateArgs", ("message", C.c_char_p), ("errc", C.c_int))

_ERROR_CREATE = C.CFUNCTYPE(_vp, C.POINTER(_ErrorCreateArgs))
_API_ERROR_CREATE = 6  # XLA_FFI_Api: size, extension, version (3 words), internal API, then it
_ERRC_INTERNAL = 13
_HANDLER = C.CFUNCTYPE(_vp, C.POINTER(_CallFrame))
_new_capsule = C.PYFUNCTYPE(C.py_object, _vp, C.c_char_p, _vp)(("PyCapsule_New", C.pythonapi))
_registered: dict[str, Any] = {}  # target name -> ctypes callback (kept alive)
_register_lock = threading.Lock()


def _error(frame: _CallFrame, message: str) -> int | None:
    """An XLA_FFI_Error for ``message``, made through the API table XLA passes."""
    table = C.cast(frame.api, C.POINTER(_vp))
    create = _ERROR_CREATE(table[_API_ERROR_CREATE])
    args = _ErrorCreateArgs(
        _ErrorCreateArgs.errc.offset + C.sizeof(C.c_int), None, message.encode(), _ERRC_INTERNAL
    )
    return create(C.byref(args))


def _handler(run: Any) -> Any:
    def handle(frame_ptr: Any) -> int | None:
        frame = frame_ptr.contents
        if frame.extension_start:  # XLA asks which FFI version the handler speaks
            ext = C.cast(frame.extension_start, C.POINTER(_MetadataExtension)).contents
            if ext.base.type == 1:
                meta = ext.metadata.contents
                meta.api_version.major, meta.api_version.minor = 0, 1
                meta.traits = 0
                return None
        try:
            ins = [frame.args.items[i].contents.data for i in range(frame.args.size)]
            outs = [frame.rets.items[i].contents.data for i in range(frame.rets.size)]
            run(ins, outs)
        except Exception as e:  # reported by XLA as the computation's error
            return _error(frame, f"nincc oneDNN call: {e}")
        return None

    return _HANDLER(handle)


def _target(name: str, run: Any) -> str:
    """Register ``run(ins, outs)`` as the CPU FFI target ``name`` (once)."""
    with _register_lock:
        if name not in _registered:
            callback = _handler(run)
            capsule = _new_capsule(C.cast(callback, _vp).value, None, None)
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
            _registered[name] = callback
    return name


@cache
def primitives(spec: ConvSpec) -> ConvPrimitives:
    """The (cached) primitives of one geometry."""
    return ConvPrimitives(spec)


def relu_tag(slope: float) -> str:
    """A fused ReLU's part of a custom call's target name: "relu0p25" for slope 0.25."""
    return "relu" + repr(slope).replace(".", "p").replace("-", "m")


def _name(spec: ConvSpec, direction: str) -> str:
    fields = [spec.n, spec.h, spec.w, spec.c, spec.o, *spec.kernel, *spec.stride]
    fields += [*spec.pad_low, *spec.pad_high, *spec.dilation, spec.group, int(spec.bias)]
    if spec.relu is not None:
        fields.append(relu_tag(spec.relu))
    if (spec.src, spec.dst) != (act_layout.NHWC, act_layout.NHWC):
        fields += [spec.src, spec.dst]
    return f"nincc_onednn_{direction}_" + "_".join(map(str, fields))


def _bytes(n: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((max(n, 1),), jnp.uint8)


def _scratch(prim: _Primitive) -> list[jax.ShapeDtypeStruct]:
    out = [_bytes(prim.scratchpad_bytes)]
    if prim.reorder is not None:
        out.append(_bytes(_md_size(prim.w_md)))
    return out


def forward(spec: ConvSpec, x: Any, w: Any, b: Any | None) -> Any:
    """y = conv(x, w) (+ b) (then the fused ReLU, if ``spec.relu``), one custom call."""
    p = primitives(spec)
    y = jax.ShapeDtypeStruct(act_layout.array_shape(spec.y_nchw, spec.dst), jnp.float32)
    name = _target(_name(spec, "fwd"), partial(_run_forward, p))
    args = (x, w) if b is None else (x, w, b)
    return jax.ffi.ffi_call(name, [y, *_scratch(p.forward)], vmap_method="sequential")(*args)[0]


def backward(spec: ConvSpec, x: Any, w: Any, dy: Any) -> tuple[Any, Any, Any | None]:
    """(dx, dw, db) of the convolution (not its fused ReLU) for dy: two custom calls."""
    spec = replace(spec, relu=None)
    p = primitives(spec)
    dx = _backward_data(spec, x.shape, w, dy)
    bw = p.backward_weights
    outs = [jax.ShapeDtypeStruct(w.shape, jnp.float32)]
    if spec.bias:
        outs.append(jax.ShapeDtypeStruct((spec.o,), jnp.float32))
    outs += _scratch(bw)
    res = jax.ffi.ffi_call(
        _target(_name(spec, "bwd_weights"), partial(_run_backward_weights, p)),
        outs,
        vmap_method="sequential",
    )(x, dy)
    return dx, res[0], (res[1] if spec.bias else None)


def _backward_data(spec: ConvSpec, x_shape: tuple[int, ...], w: Any, dy: Any) -> Any:
    """dx for dy, one custom call. Where oneDNN has only its reference kernel for the
    spec's layouts (a 3-channel stem reading NCHW, whose input gradient is seldom wanted),
    the call runs channels-last between two transposes instead. A negative high padding
    (input rows and columns past Caffe's last window) gets zeros there."""
    if min(spec.pad_high) < 0:  # rows and columns no window reads: a zero gradient
        cut = tuple(max(-p, 0) for p in spec.pad_high)
        inner = replace(
            spec, h=spec.h - cut[0], w=spec.w - cut[1],
            pad_high=tuple(max(p, 0) for p in spec.pad_high),
        )  # fmt: skip
        inner_shape = act_layout.array_shape((inner.n, inner.c, inner.h, inner.w), spec.src)
        dx = _backward_data(inner, inner_shape, w, dy)
        return act_layout.pad_end(dx, spec.src, cut)
    p = primitives(spec)
    if p.backward_data.impl.startswith("ref") and (spec.src, spec.dst) != (
        act_layout.NHWC,
        act_layout.NHWC,
    ):
        plain = replace(spec, src=act_layout.NHWC, dst=act_layout.NHWC)
        dx = _backward_data(
            plain,
            act_layout.array_shape((spec.n, spec.c, spec.h, spec.w), act_layout.NHWC),
            w,
            act_layout.convert(dy, spec.dst, act_layout.NHWC),
        )
        return act_layout.convert(dx, act_layout.NHWC, spec.src)
    return jax.ffi.ffi_call(
        _target(_name(spec, "bwd_data"), partial(_run_backward_data, p)),
        [jax.ShapeDtypeStruct(x_shape, jnp.float32), *_scratch(p.backward_data)],
        vmap_method="sequential",
    )(dy, w)[0]


def bias_arg(spec: ConvSpec, b: Any | None) -> Any:
    """The bias operand of a custom VJP over (x, w, b): ``b``, or an empty array where the
    convolution has no bias term."""
    return b if spec.bias else jnp.zeros((0,), jnp.float32)


def cotangents(spec: ConvSpec, x: Any, w: Any, dy: Any) -> tuple[Any, Any, Any]:
    """(dx, dw, db) for a custom VJP over (x, w, :func:`bias_arg`)."""
    dx, dw, db = backward(spec, x, w, dy)
    return dx, dw, db if spec.bias else jnp.zeros((0,), jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _conv(spec: ConvSpec, x: Any, w: Any, b: Any) -> Any:
    return forward(spec, x, w, b if spec.bias else None)


def _conv_fwd(spec, x, w, b):
    return _conv(spec, x, w, b), (x, w)


def _conv_bwd(spec, res, dy):
    return cotangents(spec, *res, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


@cache
def blocked_layout_ok() -> bool:
    """Whether the library's nChw16c tag is the layout nincc.act_layout computes (checked
    once by reordering a small array), so that a blocked array XLA holds means to oneDNN
    what it means to nincc."""
    dims = (1, 32, 2, 3)
    x = np.arange(np.prod(dims), dtype=np.float32).reshape(dims)
    block = act_layout.BLOCK  # NumPy, not act_layout.convert: this may run while tracing
    want = x.reshape(1, 32 // block, block, 2, 3).transpose(0, 1, 3, 4, 2).copy()
    try:
        src, dst = _md(dims, _TAG_NCHW), _md(dims, _TAG_NCHW16C)
        if _md_size(dst) != x.nbytes:
            return False
        out = np.zeros_like(want)
        _execute(_reorder(src, dst), {_ARG_FROM: (src, x.ctypes.data),
                                      _ARG_TO: (dst, out.ctypes.data)})
    except OneDNNError:
        return False
    return bool(np.array_equal(out, want))


def conv_of(spec: ConvSpec, x: Any, w: Any, b: Any | None) -> Any:
    """The convolution ``spec`` describes (its layouts included; no fused ReLU) of ``x``
    with Caffe-layout ``w`` plus ``b`` if given, differentiable in x, w and b."""
    return _conv(spec, x, w, bias_arg(spec, b))


def supports(x_dtype: Any, w_dtype: Any) -> bool:
    """oneDNN runs the float32 convolutions; other dtypes keep XLA's."""
    return np.dtype(x_dtype) == np.float32 and np.dtype(w_dtype) == np.float32


def per_device(x: Any) -> bool:
    """Whether ``x`` is traced inside a shard_map (its mesh has manual axes). The custom
    calls' results carry no per-device type, so convolutions inside a data-parallel step
    keep XLA's kernels."""
    mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
    manual = getattr(jax.sharding, "AxisType", None)
    return manual is not None and manual.Manual in tuple(getattr(mesh, "axis_types", ()))


def spec_of(
    x_shape: Sequence[int],
    w_shape: Sequence[int],
    bias: bool,
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int] = (1, 1),
    group: int = 1,
    relu: float | None = None,
) -> ConvSpec:
    """The ConvSpec of NHWC ``x_shape`` and Caffe-layout ``w_shape`` (o, c/group, kh, kw)."""
    n, h, w, c = x_shape
    o, _, kh, kw = w_shape
    return ConvSpec(
        n,
        h,
        w,
        c,
        o,
        (kh, kw),
        tuple(stride),
        (padding[0][0], padding[1][0]),
        (padding[0][1], padding[1][1]),
        tuple(dilation),
        group,
        bias,
        None if relu is None else float(relu),
    )


def conv(
    x: Any,
    w: Any,
    b: Any | None,
    stride: tuple[int, int],
    padding: tuple[tuple[int, int], tuple[int, int]],
    dilation: tuple[int, int] = (1, 1),
    group: int = 1,
) -> Any:
    """The convolution of NHWC ``x`` with Caffe-layout ``w`` (o, c/group, kh, kw), plus
    ``b`` if given: y (n, oh, ow, o), differentiable in x, w and b. (A fused ReLU is
    nincc.fast's, whose backward is the ReLU layer's.)"""
    spec = spec_of(x.shape, w.shape, b is not None, stride, padding, dilation, group)
    return _conv(spec, x, w, bias_arg(spec, b))


def implementation(spec: ConvSpec, direction: str = "forward") -> str:
    """oneDNN's name for the kernel it chose (e.g. ``brgconv:avx512_core``)."""
    return getattr(primitives(spec), direction).impl

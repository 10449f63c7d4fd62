"""oneDNN operations whose training forward leaves a workspace for the backward (MAX pooling's
window winners, LRN's scale): the three primitives of one geometry and the custom calls
that run them, shared by nincc.onednn_pool and nincc.onednn_lrn. The plumbing is
nincc.onednn's (XLA FFI custom calls on XLA's own buffers; each call's scratchpad is its
last output)."""

from __future__ import annotations

import ctypes as C
from functools import cached_property, partial
from typing import Any

import jax

from . import onednn
from .onednn import _FORWARD_INFERENCE, _FORWARD_TRAINING, _vp

_QUERY_WORKSPACE_MD = 135
ARG_WORKSPACE = 64


class WorkspacePrimitives:
    """The inference forward, the training forward (which writes the workspace) and the
    backward of one operation from ``src`` to ``dst`` (memory descriptors), each created
    when first asked for (at trace time). Subclasses make the primitive descriptors."""

    def __init__(self, src: _vp, dst: _vp) -> None:
        self.src, self.dst = src, dst

    def forward_pd(self, prop: int) -> _vp:
        raise NotImplementedError

    def backward_pd(self, hint: _vp) -> _vp:
        """The backward's descriptor, given the training forward's (``hint``)."""
        raise NotImplementedError

    @cached_property
    def forward(self) -> onednn._Primitive:
        return onednn._Primitive(self.forward_pd(_FORWARD_INFERENCE), None, None)

    @cached_property
    def training(self) -> onednn._Primitive:
        return onednn._Primitive(self.forward_pd(_FORWARD_TRAINING), None, None)

    @cached_property
    def workspace_md(self) -> _vp:
        return onednn._query_md(self.training.pd, _QUERY_WORKSPACE_MD)

    @cached_property
    def backward(self) -> onednn._Primitive:
        return onednn._Primitive(self.backward_pd(self.training.pd), None, None)

    def all(self) -> tuple[onednn._Primitive, ...]:
        """The three, created now if they were not yet (so that no call has to)."""
        return (self.forward, self.training, self.backward)


def descriptor(create: Any, what: str, *args: Any) -> _vp:
    """A primitive descriptor from oneDNN's C function ``create`` (its arguments after the
    descriptor's pointer and the engine); ``what`` names it in the error if that fails."""
    pd = _vp()
    onednn._check(create(C.byref(pd), onednn._engine(), *args), what)
    return pd


def execute(prim: onednn._Primitive, args: dict[int, tuple[Any, int]], scratchpad: int) -> None:
    """Run ``prim`` on ``args`` (oneDNN argument id -> (descriptor, pointer)) and its
    scratchpad at ``scratchpad``."""
    onednn._execute(prim.prim, {**args, onednn._ARG_SCRATCHPAD: (prim.scratchpad_md, scratchpad)})


def run_forward(p: WorkspacePrimitives, ins: list[int], outs: list[int]) -> None:
    """The inference forward: ins (src), outs (dst, scratchpad)."""
    execute(
        p.forward, {onednn._ARG_SRC: (p.src, ins[0]), onednn._ARG_DST: (p.dst, outs[0])}, outs[1]
    )


def run_training(p: WorkspacePrimitives, ins: list[int], outs: list[int]) -> None:
    """The training forward: ins (src), outs (dst, workspace, scratchpad)."""
    args = {
        onednn._ARG_SRC: (p.src, ins[0]),
        onednn._ARG_DST: (p.dst, outs[0]),
        ARG_WORKSPACE: (p.workspace_md, outs[1]),
    }
    execute(p.training, args, outs[2])


def call(name: str, run: Any, p: WorkspacePrimitives, outs: list, *args: Any) -> list:
    """The custom call ``name`` running ``run(p, ins, outs)`` on ``args``, with result types
    ``outs``."""
    target = onednn._target(name, partial(run, p))
    return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(*args)


def forward_types(p: WorkspacePrimitives, y: jax.ShapeDtypeStruct) -> list:
    """Result types of run_forward: the output ``y`` and the scratchpad."""
    return [y, onednn._bytes(p.forward.scratchpad_bytes)]


def training_types(p: WorkspacePrimitives, y: jax.ShapeDtypeStruct) -> list:
    """Result types of run_training: the output ``y``, the workspace and the scratchpad."""
    return [
        y,
        onednn._bytes(onednn._md_size(p.workspace_md)),
        onednn._bytes(p.training.scratchpad_bytes),
    ]


def backward_types(p: WorkspacePrimitives, dx: jax.ShapeDtypeStruct) -> list:
    """Result types of a backward call: the input gradient ``dx`` and the scratchpad."""
    return [dx, onednn._bytes(p.backward.scratchpad_bytes)]

"""Recurrent layers: RNN, LSTM and LSTMUnit, as Caffe 1.0's unrolled nets compute them.

Inputs are time-major: x (T, N, ...), cont (T, N) where cont[t, n] multiplies the previous
hidden (and cell) state of stream n before step t (0 starts a new sequence), and an optional
static input (N, ...) added to every step. The learnable blobs keep the order and shapes of the
InnerProduct layers of Caffe's unrolled net. The time loop is one ``lax.scan``.

Caffe never propagates to cont. With expose_hidden the initial states are extra bottoms and the
final states extra tops, but Caffe shares only their data with the unrolled net: no diff reaches
those bottoms and diffs given to those tops are ignored; both are reproduced here. Without
expose_hidden Caffe starts each forward from the previous forward's final state (visible only
where cont[0] is non-zero); here every forward starts from zero, as Caffe's first one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ..errors import GraphError, ShapeError
from .base import BlobSpec, Filler, LayerType, Shape, count, no_attrs, register


@dataclass(frozen=True)
class RecurrentAttrs:
    num_output: int
    weight_filler: Filler
    bias_filler: Filler
    expose_hidden: bool


@dataclass(frozen=True)
class _Layout:
    """The sizes a recurrent layer's bottoms give: T steps, N streams, I (and S) features."""

    steps: int
    streams: int
    inputs: int
    static: int | None
    hidden: tuple[int, ...]  # indices of the exposed initial-state bottoms


def _recurrent_attrs(n_states: int):
    def attrs(msg: Any) -> RecurrentAttrs:
        p = msg.recurrent_param
        a = RecurrentAttrs(
            num_output=int(p.num_output),
            weight_filler=Filler.from_proto(p.weight_filler),
            bias_filler=Filler.from_proto(p.bias_filler),
            expose_hidden=bool(p.expose_hidden),
        )
        if a.num_output <= 0:
            raise ShapeError(f"recurrent_param.num_output must be > 0, got {a.num_output}")
        want = 1 + (n_states if a.expose_hidden else 0)
        if len(msg.top) != want:
            raise GraphError(
                f"{msg.type} with expose_hidden {str(a.expose_hidden).lower()} makes {want} "
                f"top(s), got {len(msg.top)}"
            )
        return a

    return attrs


def _layout(a: RecurrentAttrs, n_states: int, bottom_shapes: list[Shape]) -> _Layout:
    exposed = n_states if a.expose_hidden else 0
    nb = len(bottom_shapes)
    if not 2 + exposed <= nb <= 3 + exposed:
        raise GraphError(
            f"takes x, cont, an optional static input and {exposed} initial state(s), "
            f"got {nb} bottoms"
        )
    x, cont = tuple(bottom_shapes[0]), tuple(bottom_shapes[1])
    if len(x) < 2:
        raise ShapeError(f"x must have at least 2 axes (T, N, ...), got {list(x)}")
    if cont != x[:2]:
        raise ShapeError(f"cont must have shape (T, N) = {list(x[:2])}, got {list(cont)}")
    static = None
    if nb > 2 + exposed:
        s = tuple(bottom_shapes[2])
        if len(s) < 1 or s[0] != x[1]:
            raise ShapeError(f"static input must have shape (N={x[1]}, ...), got {list(s)}")
        static = count(s, 1)
    first = 3 if static is not None else 2
    hidden = tuple(range(first, first + exposed))
    state = (1, x[1], a.num_output)
    for i in hidden:
        if tuple(bottom_shapes[i]) != state:
            raise ShapeError(
                f"initial state bottom {i} must have shape {list(state)}, "
                f"got {list(bottom_shapes[i])}"
            )
    return _Layout(x[0], x[1], count(x, 2), static, hidden)


def _recurrent_shape(n_states: int):
    def shape(a: RecurrentAttrs, bottom_shapes: list[Shape]) -> list[Shape]:
        lay = _layout(a, n_states, bottom_shapes)
        tops = [(lay.steps, lay.streams, a.num_output)]
        if a.expose_hidden:
            tops += [(1, lay.streams, a.num_output)] * n_states
        return tops

    return shape


def _inputs(a: RecurrentAttrs, lay: _Layout, params, bottoms, gate_width: int):
    """W x_t + b (+ W_static x_static) for every step, (T, N, width); and the remaining params."""
    w_x, b = params[0], params[1]
    x = bottoms[0].reshape(lay.steps, lay.streams, lay.inputs)
    pre = jnp.einsum("tni,gi->tng", x, w_x) + b.reshape(1, 1, gate_width)
    rest = list(params[2:])
    if lay.static is not None:
        w_s = rest.pop(0)
        xs = bottoms[2].reshape(lay.streams, lay.static)
        pre = pre + (xs @ w_s.T).reshape(1, lay.streams, gate_width)
    return pre, rest


def _initial(lay: _Layout, bottoms, hidden: int) -> list[Any]:
    if not lay.hidden:
        return [jnp.zeros((lay.streams, hidden), bottoms[0].dtype) for _ in range(2)]
    return [lax.stop_gradient(bottoms[i]).reshape(lay.streams, hidden) for i in lay.hidden]


def _x_blobs(a: RecurrentAttrs, lay: _Layout, width: int) -> list[BlobSpec]:
    specs = [BlobSpec((width, lay.inputs), a.weight_filler), BlobSpec((width,), a.bias_filler)]
    if lay.static is not None:
        specs.append(BlobSpec((width, lay.static), a.weight_filler))
    return specs


# ---------------------------------------------------------------- LSTMUnit


def _sigmoid(x: Any) -> Any:
    return 1.0 / (1.0 + jnp.exp(-x))


def _unit_forward(c_prev, gates, cont):
    h = c_prev.shape[-1]
    i = _sigmoid(gates[:, :h])
    # the forget gate is cont * sigmoid, and exactly 0 where cont is 0
    f = jnp.where(cont == 0, 0.0, cont * _sigmoid(gates[:, h : 2 * h]))
    o = _sigmoid(gates[:, 2 * h : 3 * h])
    g = jnp.tanh(gates[:, 3 * h :])
    c = f * c_prev + i * g
    tanh_c = jnp.tanh(c)
    return (c, o * tanh_c), (c_prev, i, f, o, g, tanh_c)


@jax.custom_vjp
def lstm_unit(c_prev: Any, gates: Any, cont: Any) -> tuple[Any, Any]:
    """Caffe's LSTMUnit on (N, H) cells, (N, 4H) gate inputs in order i, f, o, g and (N, 1) cont.

    Returns (c, h). The backward is Caffe's: the forget-gate diff uses f * (1 - f) with
    f = cont * sigmoid (the true derivative only for cont in {0, 1}); cont gets no diff.
    """
    return _unit_forward(c_prev, gates, cont)[0]


def _unit_bwd(res, diffs):
    c_prev, i, f, o, g, tanh_c = res
    dc, dh = diffs
    c_term = dc + dh * o * (1.0 - tanh_c * tanh_c)
    d_gates = jnp.concatenate(
        [
            c_term * g * i * (1.0 - i),
            c_term * c_prev * f * (1.0 - f),
            dh * tanh_c * o * (1.0 - o),
            c_term * i * (1.0 - g * g),
        ],
        axis=1,
    )
    return c_term * f, d_gates, jnp.zeros((f.shape[0], 1), f.dtype)  # cont: (N, 1), no diff


lstm_unit.defvjp(_unit_forward, _unit_bwd)


def _unit_shape(a: None, bottom_shapes: list[Shape]) -> list[Shape]:
    c, x, cont = (tuple(s) for s in bottom_shapes)
    if len(c) != 3 or len(x) != 3 or len(cont) != 2:
        raise ShapeError(
            f"LSTMUnit needs c_prev (1, N, H), gates (1, N, 4H) and cont (1, N), got "
            f"{list(c)}, {list(x)}, {list(cont)}"
        )
    if c[0] != 1 or x[0] != 1 or cont[0] != 1 or not c[1] == x[1] == cont[1]:
        raise ShapeError(
            f"LSTMUnit bottoms must be one step of the same N streams, got {list(c)}, "
            f"{list(x)}, {list(cont)}"
        )
    if x[2] != 4 * c[2]:
        raise ShapeError(f"LSTMUnit gates need 4 * H = {4 * c[2]} channels, got {x[2]}")
    return [c, c]


def _unit_lower(a: None, params, bottoms, ctx):
    c_prev, gates, cont = bottoms
    n, h = c_prev.shape[1], c_prev.shape[2]
    cont = lax.stop_gradient(cont).reshape(n, 1)
    c, hid = lstm_unit(c_prev.reshape(n, h), gates.reshape(n, 4 * h), cont)
    return [c.reshape(1, n, h), hid.reshape(1, n, h)]


_UNIT_FLOPS = 10  # four activations, cont * f, f * c, i * g, the sum, tanh(c), o * tanh(c)

register(
    LayerType(
        name="LSTMUnit",
        doc="one LSTM step: gates i, f, o, g; c = cont * f * c_prev + i * g; h = o * tanh(c)",
        attrs=no_attrs,
        shape=_unit_shape,
        lower=_unit_lower,
        flops=lambda a, b, t: _UNIT_FLOPS * count(t[0]),
        n_bottoms=(3, 3),
        n_tops=(2, 2),
        no_grad_bottoms=(2,),
        family="recurrent",
    )
)


# ---------------------------------------------------------------- LSTM


def _lstm_blobs(a: RecurrentAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    lay = _layout(a, 2, bottom_shapes)
    h = a.num_output
    # W_xc, b_c, [W_xc_static], W_hc
    return _x_blobs(a, lay, 4 * h) + [BlobSpec((4 * h, h), a.weight_filler)]


def _lstm_lower(a: RecurrentAttrs, params, bottoms, ctx):
    lay = _layout(a, 2, [tuple(b.shape) for b in bottoms])
    h = a.num_output
    pre, (w_h,) = _inputs(a, lay, params, bottoms, 4 * h)
    cont = lax.stop_gradient(bottoms[1]).reshape(lay.steps, lay.streams, 1)
    h0, c0 = _initial(lay, bottoms, h)

    def step(carry, inputs):
        h_prev, c_prev = carry
        pre_t, cont_t = inputs
        gates = pre_t + (cont_t * h_prev) @ w_h.T
        c_t, h_t = lstm_unit(c_prev, gates, cont_t)
        return (h_t, c_t), h_t

    (h_last, c_last), hs = lax.scan(step, (h0, c0), (pre, cont))
    tops = [hs]
    if a.expose_hidden:
        tops += [lax.stop_gradient(s).reshape(1, lay.streams, h) for s in (h_last, c_last)]
    return tops


def _lstm_flops(a: RecurrentAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    lay = _layout(a, 2, bottom_shapes)
    t, n, h = lay.steps, lay.streams, a.num_output
    flops = 2 * t * n * lay.inputs * 4 * h + t * n * 4 * h  # W_xc x + b_c
    if lay.static is not None:
        flops += 2 * n * lay.static * 4 * h + t * n * 4 * h
    flops += t * (n * h + 2 * n * h * 4 * h + n * 4 * h)  # cont * h, W_hc h, sum
    return flops + t * n * h * _UNIT_FLOPS


register(
    LayerType(
        name="LSTM",
        doc="LSTM over T steps (Caffe's unrolled net: W_xc, b_c, W_hc; gates i, f, o, g; "
        "cont resets h and c)",
        attrs=_recurrent_attrs(2),
        shape=_recurrent_shape(2),
        lower=_lstm_lower,
        blobs=_lstm_blobs,
        flops=_lstm_flops,
        n_bottoms=(2, 5),
        n_tops=(1, 3),
        no_grad_bottoms=(1,),
        param_field="recurrent_param",
        family="recurrent",
    )
)


# ---------------------------------------------------------------- RNN


def _rnn_blobs(a: RecurrentAttrs, bottom_shapes: list[Shape]) -> list[BlobSpec]:
    lay = _layout(a, 1, bottom_shapes)
    h = a.num_output
    # W_xh, b_h, [W_xh_static], W_hh, W_ho, b_o
    return _x_blobs(a, lay, h) + [
        BlobSpec((h, h), a.weight_filler),
        BlobSpec((h, h), a.weight_filler),
        BlobSpec((h,), a.bias_filler),
    ]


def _rnn_lower(a: RecurrentAttrs, params, bottoms, ctx):
    lay = _layout(a, 1, [tuple(b.shape) for b in bottoms])
    h = a.num_output
    pre, (w_hh, w_ho, b_o) = _inputs(a, lay, params, bottoms, h)
    cont = lax.stop_gradient(bottoms[1]).reshape(lay.steps, lay.streams, 1)
    h0 = _initial(lay, bottoms, h)[0]

    def step(h_prev, inputs):
        pre_t, cont_t = inputs
        h_t = jnp.tanh(pre_t + (cont_t * h_prev) @ w_hh.T)
        return h_t, h_t

    h_last, hs = lax.scan(step, h0, (pre, cont))
    out = jnp.tanh(jnp.einsum("tnh,oh->tno", hs, w_ho) + b_o.reshape(1, 1, h))
    tops = [out]
    if a.expose_hidden:
        tops.append(lax.stop_gradient(h_last).reshape(1, lay.streams, h))
    return tops


def _rnn_flops(a: RecurrentAttrs, bottom_shapes: list[Shape], top_shapes: list[Shape]) -> int:
    lay = _layout(a, 1, bottom_shapes)
    t, n, h = lay.steps, lay.streams, a.num_output
    flops = 2 * t * n * lay.inputs * h + t * n * h  # W_xh x + b_h
    if lay.static is not None:
        flops += 2 * n * lay.static * h + t * n * h
    flops += t * (n * h + 2 * n * h * h + 2 * n * h)  # cont * h, W_hh h, sum, tanh
    return flops + t * (2 * n * h * h + 2 * n * h)  # W_ho h + b_o, tanh


register(
    LayerType(
        name="RNN",
        doc="Elman RNN over T steps: h_t = tanh(W_xh x_t + b_h + W_hh cont_t h_{t-1}), "
        "o_t = tanh(W_ho h_t + b_o)",
        attrs=_recurrent_attrs(1),
        shape=_recurrent_shape(1),
        lower=_rnn_lower,
        blobs=_rnn_blobs,
        flops=_rnn_flops,
        n_bottoms=(2, 4),
        n_tops=(1, 2),
        no_grad_bottoms=(1,),
        param_field="recurrent_param",
        family="recurrent",
    )
)

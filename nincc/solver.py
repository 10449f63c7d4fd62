"""Caffe's solvers as optax GradientTransformations, with Caffe's exact order of operations.

One iteration, as Caffe's Solver::Step and SGDSolver::ApplyUpdate do it:
accumulate the gradients of ``iter_size`` forward/backward passes (a sum); clip by the global L2
norm; divide by ``iter_size``; add weight decay (L2: ``decay * w``, L1: ``decay * sign(w)``, scaled
by each blob's decay_mult); compute the update with ``local_rate = rate * lr_mult``;
``w -= update``.

Caffe's SGD keeps the learning rate *inside* the momentum buffer (``v = m v + rate g``), so after a
rate change it differs from optax's ``sgd`` (which scales ``m v + g`` by the new rate). Solver
hyperparameters are proto floats and Caffe's arithmetic is float32: constants are rounded to
float32 before use (Adam's ``1 - 0.999f`` is 9.99987e-4, not 1e-3).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .errors import SolverError
from .ir import Graph

SOLVER_TYPES = ("SGD", "Nesterov", "AdaGrad", "RMSProp", "AdaDelta", "Adam")
LR_POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")
_F = np.float32


@dataclass(frozen=True)
class SolverConfig:
    """The SolverParameter fields that define the update (Caffe's defaults where unset)."""

    type: str = "SGD"
    base_lr: float = 0.01
    lr_policy: str = "fixed"
    gamma: float = 0.0
    power: float = 0.0
    stepsize: int = 0
    stepvalue: tuple[int, ...] = ()
    max_iter: int = 0
    momentum: float = 0.0
    momentum2: float = 0.999
    delta: float = 1e-8
    rms_decay: float = 0.99
    weight_decay: float = 0.0
    regularization_type: str = "L2"
    clip_gradients: float = -1.0
    iter_size: int = 1

    @classmethod
    def from_proto(cls, sp: Any) -> SolverConfig:
        """From an upgraded caffe_pb2.SolverParameter; unknown type or policy is a SolverError."""
        cfg = cls(
            type=sp.type,
            base_lr=sp.base_lr,
            lr_policy=sp.lr_policy,
            gamma=sp.gamma,
            power=sp.power,
            stepsize=sp.stepsize,
            stepvalue=tuple(sp.stepvalue),
            max_iter=sp.max_iter,
            momentum=sp.momentum,
            momentum2=sp.momentum2,
            delta=sp.delta,
            rms_decay=sp.rms_decay,
            weight_decay=sp.weight_decay,
            regularization_type=sp.regularization_type,
            clip_gradients=sp.clip_gradients,
            iter_size=max(1, sp.iter_size),
        )
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.type not in SOLVER_TYPES:
            raise SolverError(
                f"unknown solver type '{self.type}'; supported: {', '.join(SOLVER_TYPES)}"
            )
        if self.lr_policy not in LR_POLICIES:
            raise SolverError(
                f"unknown lr_policy '{self.lr_policy}'; supported: {', '.join(LR_POLICIES)}"
            )
        if self.regularization_type not in ("L1", "L2"):
            raise SolverError(
                f"unknown regularization_type '{self.regularization_type}'; use L1 or L2"
            )
        if self.lr_policy in ("step", "sigmoid") and self.stepsize <= 0:
            raise SolverError(f"lr_policy '{self.lr_policy}' needs a positive stepsize")
        if self.lr_policy == "poly" and self.max_iter <= 0:
            raise SolverError("lr_policy 'poly' needs max_iter")


def learning_rate(cfg: SolverConfig, it: int) -> np.float32:
    """Caffe's SGDSolver::GetLearningRate at iteration ``it`` (0-based), as a float32."""
    base, gamma, power = float(_F(cfg.base_lr)), float(_F(cfg.gamma)), float(_F(cfg.power))
    p = cfg.lr_policy
    if p == "fixed":
        rate = base
    elif p == "step":
        rate = base * gamma ** (it // cfg.stepsize)
    elif p == "exp":
        rate = base * gamma**it
    elif p == "inv":
        rate = base * (1.0 + gamma * it) ** (-power)
    elif p == "multistep":
        rate = base * gamma ** sum(1 for s in cfg.stepvalue if it >= s)
    elif p == "poly":
        rate = base * (1.0 - it / cfg.max_iter) ** power
    elif p == "sigmoid":
        rate = base * (1.0 / (1.0 + math.exp(-gamma * (it - cfg.stepsize))))
    else:
        raise SolverError(f"unknown lr_policy '{p}'")
    return _F(rate)


class CaffeState(NamedTuple):
    """Solver state: the iteration count, the rate for the next update (set by the caller from
    :func:`learning_rate`, which needs Caffe's double-precision host arithmetic) and Caffe's
    history blobs (one set per param; two for AdaDelta and Adam)."""

    iter: Any
    rate: Any
    history: Any
    history2: Any


def with_rate(state: CaffeState, cfg: SolverConfig) -> CaffeState:
    """The state with ``rate`` set to Caffe's rate for the state's iteration."""
    return state._replace(rate=jnp.asarray(learning_rate(cfg, int(state.iter))))


def _tree_like(params: Mapping, value: Mapping[str, list[float]]) -> dict:
    return {k: [jnp.asarray(_F(value[k][i])) for i in range(len(v))] for k, v in params.items()}


def param_multipliers(graph: Graph) -> tuple[dict, dict]:
    """lr_mult and decay_mult of every owned blob, keyed like params (state blobs get 0, 0)."""
    lr: dict[str, list[float]] = {}
    decay: dict[str, list[float]] = {}
    for layer in graph.layers:
        owned = [p for p in layer.params if p.share is None]
        if owned:
            lr[layer.name] = [0.0 if p.state else p.lr_mult for p in owned]
            decay[layer.name] = [0.0 if p.state else p.decay_mult for p in owned]
    return lr, decay


def caffe_solver(
    cfg: SolverConfig, lr_mult: Mapping[str, list[float]], decay_mult: Mapping[str, list[float]]
) -> optax.GradientTransformation:
    """The GradientTransformation of one Caffe solver type.

    ``update(grads, state, params)`` takes the *summed* gradients of the iteration's
    ``iter_size`` passes and returns the updates to add to params (``-update`` in Caffe's terms).
    """
    cfg.validate()
    mom, mom2 = _F(cfg.momentum), _F(cfg.momentum2)
    delta, rms = _F(cfg.delta), _F(cfg.rms_decay)
    wd = _F(cfg.weight_decay)
    clip = _F(cfg.clip_gradients)
    inv_iter = _F(1.0) / _F(cfg.iter_size)
    two_hist = cfg.type in ("AdaDelta", "Adam")

    def init(params):
        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        z2 = jax.tree_util.tree_map(jnp.zeros_like, params) if two_hist else None
        return CaffeState(jnp.zeros((), jnp.int32), jnp.asarray(learning_rate(cfg, 0)), zeros, z2)

    def update(grads, state, params):
        if clip >= 0:
            sq = sum(jnp.sum(g * g) for g in jax.tree_util.tree_leaves(grads))
            norm = jnp.sqrt(sq)
            scale = jnp.where(norm > clip, clip / norm, _F(1))
            grads = jax.tree_util.tree_map(lambda g: g * scale, grads)
        rate = state.rate
        lrm = _tree_like(params, lr_mult)
        dm = _tree_like(params, decay_mult)

        def reg(g, w, d):
            g = g * inv_iter if cfg.iter_size > 1 else g
            local = wd * d
            if cfg.regularization_type == "L2":
                return g + local * w
            return g + local * jnp.sign(w)

        diffs = jax.tree_util.tree_map(reg, grads, params, dm)
        t = (state.iter + 1).astype(jnp.float32)
        h2 = state.history2

        def one(g, h, m, hh):
            lrate = rate * m
            if cfg.type == "SGD":
                h_new = mom * h + lrate * g
                return h_new, h_new, hh
            if cfg.type == "Nesterov":
                h_new = mom * h + lrate * g
                return (_F(1) + mom) * h_new - mom * h, h_new, hh
            if cfg.type == "AdaGrad":
                h_new = h + g * g
                return lrate * g / (jnp.sqrt(h_new) + delta), h_new, hh
            if cfg.type == "RMSProp":
                h_new = rms * h + (_F(1) - rms) * g * g
                return lrate * g / (jnp.sqrt(h_new) + delta), h_new, hh
            if cfg.type == "AdaDelta":
                h_new = mom * h + (_F(1) - mom) * g * g
                u = g * jnp.sqrt(hh + delta) / jnp.sqrt(h_new + delta)
                hh_new = mom * hh + (_F(1) - mom) * u * u
                return lrate * u, h_new, hh_new
            # Adam: history = first moment, history2 = second moment
            m_new = mom * h + (_F(1) - mom) * g
            v_new = mom2 * hh + (_F(1) - mom2) * g * g
            corr = jnp.sqrt(_F(1) - mom2**t) / (_F(1) - mom**t)
            return lrate * corr * m_new / (jnp.sqrt(v_new) + delta), m_new, v_new

        hh_tree = h2 if two_hist else jax.tree_util.tree_map(jnp.zeros_like, params)
        out = jax.tree_util.tree_map(one, diffs, state.history, lrm, hh_tree)
        leaves_def = jax.tree_util.tree_structure(params)
        triples = leaves_def.flatten_up_to(out)
        updates = leaves_def.unflatten([-t3[0] for t3 in triples])
        hist = leaves_def.unflatten([t3[1] for t3 in triples])
        hist2 = leaves_def.unflatten([t3[2] for t3 in triples]) if two_hist else None
        return updates, CaffeState(state.iter + 1, state.rate, hist, hist2)

    return optax.GradientTransformation(init, update)

"""Training: one jitted step = iter_size forward/backward passes + one Caffe solver update."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .compile import CompiledNet, run_graph, total_loss
from .layout import kernel_layout, to_caffe, to_held
from .solver import CaffeState, SolverConfig, caffe_solver, learning_rate, param_multipliers


def unrolled_scan(f, carry, xs):
    """``lax.scan`` semantics, unrolled over the (small, static) iter_size axis.

    Inside a scan body XLA:CPU keeps convolutions in the slow NCHW form; unrolled they get its
    fast kernels (measured about 20x on the zoo nets' train step, docs/performance.md).
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    outs = []
    for i in range(n):
        carry, out = f(carry, jax.tree_util.tree_map(lambda x, i=i: x[i], xs))
        outs.append(out)
    return carry, jax.tree_util.tree_map(lambda *ys: jnp.stack(ys), *outs)


@dataclass
class StepResult:
    """What one iteration reports: Caffe's loss (mean over the iter_size passes, accumulated in
    float32 as Solver::Step does), the rate, and the net outputs of the last pass (``outputs``
    when the Trainer was asked for them; Caffe's display prints them)."""

    loss: float
    rate: float
    losses: list[float]
    outputs: dict[str, Any] = field(default_factory=dict)
    # Data-parallel steps: the largest stop/snapshot request any process made (nincc.parallel).
    request: int = 0


def stack_feeds(feeds: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The iter_size feed dicts as one dict of float32 arrays with a leading pass axis.

    Traced inside the step, so the feeds go in as they are: no stacking copy and no extra
    dispatch before the step (a single pass's is only a reshape there)."""
    return {k: jnp.stack([jnp.asarray(f[k], jnp.float32) for f in feeds]) for k in feeds[0]}


def caffe_mean_loss(losses: Sequence[float]) -> float:
    """Solver::Step's ``loss += ForwardBackward()`` in float, then ``loss /= iter_size``."""
    total = np.float32(0)
    for x in losses:
        total = np.float32(total + np.float32(x))
    return float(total / np.float32(len(losses)))


def _convert(tree: Any, layout: Mapping[str, Any], fn) -> Any:
    if not layout:
        return tree
    if isinstance(tree, CaffeState):
        h2 = tree.history2
        return tree._replace(
            history=fn(tree.history, layout), history2=None if h2 is None else fn(h2, layout)
        )
    return fn(tree, layout)


class Trainer:
    """Runs Caffe's Solver::Step on a compiled TRAIN net.

    ``step(params, opt_state, feeds, rng)`` takes a list of ``iter_size`` feed dicts (one per
    forward) and returns ``(params, opt_state, StepResult)``. Blobs that forward updates
    (BatchNorm statistics) are carried from pass to pass, as in Caffe. ``outputs`` names blobs
    whose last-pass values the step also returns. The net's lowerings (``net.fast``) are used.

    With ``held_layout`` the step takes and returns k×k convolution weights, and their solver
    history, as the kernels read them ((kh, kw, in, out), :mod:`nincc.layout`): convert with
    :meth:`held` before the first step (params, or the state from :meth:`init` on Caffe-layout
    params) and with :meth:`caffe` to read or save them. Without it both are the identity.
    """

    def __init__(
        self,
        net: CompiledNet,
        cfg: SolverConfig,
        outputs: Sequence[str] = (),
        held_layout: bool = False,
    ):
        self.net, self.cfg = net, cfg
        self.layout = kernel_layout(net.graph) if held_layout else {}
        lr, decay = param_multipliers(net.graph)
        self.tx = caffe_solver(cfg, lr, decay)
        ids = net.graph.blob_values()
        self._outputs = [(b, ids[b]) for b in outputs]
        self._step = jax.jit(self._step_impl, donate_argnums=(0, 1))

    def init(self, params: Mapping[str, Sequence[Any]]) -> CaffeState:
        return self.tx.init(params)

    def held(self, tree: Any) -> Any:
        """Params (or a :class:`CaffeState`'s history) in Caffe's layout → the step's."""
        return _convert(tree, self.layout, to_held)

    def caffe(self, tree: Any) -> Any:
        """Params (or a :class:`CaffeState`'s history) in the step's layout → Caffe's."""
        return _convert(tree, self.layout, to_caffe)

    def _passes(self, params, feeds, keys):
        """The iter_size forward/backward passes of one iteration (traceable).

        Returns ``(params, grads, losses, outputs, state_layers)``: params with the blobs
        forward updates (BatchNorm statistics) as the last pass left them, the gradients summed
        over the passes, each pass's loss, the last pass's ``outputs`` and the names of the
        layers whose blobs forward updated.
        """
        graph, fast, outputs = self.net.graph, self.net.fast, self._outputs
        state_layers: set[str] = set()

        def loss_fn(p, f, k):
            env, state = run_graph(graph, to_caffe(p, self.layout), f, k, fast=fast)
            return total_loss(graph, env), (state, {b: env[v] for b, v in outputs})

        def one(carry, xs):
            p, acc = carry
            f, k = xs
            (loss, (state, outs)), g = jax.value_and_grad(loss_fn, has_aux=True)(p, f, k)
            acc = jax.tree_util.tree_map(jnp.add, acc, g)
            for name, arrays in to_held(state, self.layout).items():
                p = {**p, name: list(arrays)}
                state_layers.add(name)
            return (p, acc), (loss, outs)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
        (params, grads), (losses, outs) = unrolled_scan(one, (params, zeros), (feeds, keys))
        last = jax.tree_util.tree_map(lambda x: x[-1], outs)
        return params, grads, losses, last, sorted(state_layers)

    def _step_impl(self, params, opt_state, feeds, keys):
        """One iteration on ``feeds``, a tuple of iter_size feed dicts (traced)."""
        params, grads, losses, last, _ = self._passes(params, stack_feeds(feeds), keys)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, losses, last

    def _iteration(self, feeds: Sequence[Mapping[str, Any]], it: int, rng) -> tuple[float, Any]:
        """Check that there are iter_size feeds; the rate and the per-pass random keys of
        iteration ``it`` (from ``rng``, default PRNGKey(0))."""
        if len(feeds) != self.cfg.iter_size:
            raise ValueError(f"step needs {self.cfg.iter_size} feeds (iter_size), got {len(feeds)}")
        base = jax.random.PRNGKey(0) if rng is None else rng
        keys = jax.random.split(jax.random.fold_in(base, it), len(feeds))
        return learning_rate(self.cfg, it), keys

    def step(
        self,
        params,
        opt_state: CaffeState,
        feeds: Sequence[Mapping[str, Any]],
        rng=None,
        it: int | None = None,
    ):
        """One iteration. ``it`` (default: the state's iteration) sets the rate and the
        per-iteration random keys."""
        it = int(opt_state.iter) if it is None else it
        rate, keys = self._iteration(feeds, it, rng)
        opt_state = opt_state._replace(rate=jnp.asarray(rate))
        params, opt_state, losses, outputs = self._step(params, opt_state, tuple(feeds), keys)
        values = [float(x) for x in np.asarray(losses)]
        return params, opt_state, StepResult(caffe_mean_loss(values), float(rate), values, outputs)

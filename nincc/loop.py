"""Training, testing and timing, as Caffe's ``caffe train``, ``caffe test`` and ``caffe time`` do.

:class:`Solver` runs Caffe's Solver::Solve around the jitted step of :mod:`nincc.train`: test
rounds every ``test_interval`` on TEST-phase nets sharing the trained params, ``display`` lines
with the ``average_loss`` smoothed loss, snapshots every ``snapshot`` iterations and at the end
(``<prefix>_iter_<N>.caffemodel`` + ``.solverstate``, or the HDF5 pair), resuming from a
.solverstate, and fine-tuning from weights files by Caffe's copy-by-name rules. It adds what Caffe
lacks: a stop with a clear message when the loss is NaN or Inf (no snapshot of the diverged
weights is written), a check that snapshots can be written before the first iteration, a
progress line, a JSON-lines metrics file and random ("synthetic") inputs for runs without data.

Paths inside a solver (``net:``, ``snapshot_prefix``) and a net (data sources) are relative to
the working directory, as in Caffe.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import secrets
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import DataError, InputError, SolverError, WeightsError
from .ir import Graph
from .metrics import MetricsWriter, Progress, glog_logger, num, progress_text
from .snapshot import (
    SolverSnapshot,
    current_step,
    history_list,
    history_order,
    history_trees,
    read_solverstate,
    snapshot_filename,
    write_solverstate,
)
from .train import Trainer

LOG = logging.getLogger("nincc.train")
_QUIET = logging.getLogger("nincc.train.quiet")  # for weight copies Caffe does not report
_QUIET.addHandler(logging.NullHandler())
_QUIET.propagate = False
# Source layers that fill their own tops inside the compiled net when nothing is fed.
SELF_FILLING = ("DummyData",)
_NET_FIELDS = ("net", "net_param", "train_net", "train_net_param", "test_net", "test_net_param")


# ============================================================================ solver files


def _parses_as_solver(path: str) -> bool:
    """Whether ``path`` is a solver prototxt naming a net (a net prototxt does not parse as one)."""
    from .errors import PrototxtError
    from .prototxt import parse_solver_text, read_text

    try:
        sp = parse_solver_text(read_text(path), path)
    except PrototxtError:
        return False
    return any(sp.HasField(f) for f in ("net", "net_param", "train_net", "train_net_param"))


def solver_beside(net_path: str) -> str:
    """The solver Caffe's model zoo keeps next to a net: ``x.prototxt`` → ``x_solver.prototxt``."""
    stem = net_path[: -len(".prototxt")] if net_path.endswith(".prototxt") else net_path
    return f"{stem}_solver.prototxt"


def resolve_solver(target: str | None, solver: str | None = None) -> tuple[Any, str]:
    """The SolverParameter to run and its file, from ``nincc train``'s arguments.

    ``target`` is a solver file (its nets are used as written) or a net file, which then replaces
    the nets of ``solver`` or of the solver beside it (``x_solver.prototxt``).
    """
    from .prototxt import load_solver

    if target is None and solver is None:
        raise SolverError("give a net or solver prototxt (or --solver)")
    net_path = None
    if solver is None:
        if _parses_as_solver(target):
            return load_solver(target), target
        solver, net_path = solver_beside(target), target
        if not os.path.exists(solver):
            raise SolverError(
                f"no solver for net {target}: expected {solver} beside it; pass --solver"
            )
    elif target is not None:
        net_path = target
    sp = load_solver(solver)
    if net_path is not None:
        for field in _NET_FIELDS:
            sp.ClearField(field)
        sp.net = net_path
    return sp, solver


def _load_net_file(path: str, solver_path: str | None, field: str) -> Any:
    from . import load_net_param

    if not os.path.exists(path):
        hint = ""
        if solver_path:
            beside = os.path.join(os.path.dirname(solver_path), path)
            if os.path.exists(beside):
                hint = (
                    f"; it exists as {beside}, but Caffe reads solver paths relative to the "
                    f"working directory: run from {os.path.dirname(solver_path) or '.'}"
                )
        raise SolverError(f"solver {field} '{path}' not found{hint}")
    return load_net_param(path)


def _upgraded(msg: Any) -> Any:
    from . import load_net_param

    return load_net_param(msg)


@dataclass(frozen=True)
class NetSpec:
    """One net of a solver: its definition and the NetState Caffe instantiates it with."""

    net_param: Any
    phase: str
    level: int
    stages: tuple[str, ...]


def _merged_state(base_phase: str, net_param: Any, rule: Any | None) -> tuple[str, int, tuple]:
    """Caffe's ``NetState s; s.set_phase(X); s.MergeFrom(net.state()); s.MergeFrom(rule)``.

    Returns phase, level and the stages to add to those of the net file (build adds those).
    """
    phases = ("TRAIN", "TEST")
    phase, level = base_phase, 0
    for st in (net_param.state if net_param.HasField("state") else None, rule):
        if st is None:
            continue
        if st.HasField("phase"):
            phase = phases[st.phase]
        if st.HasField("level"):
            level = st.level
    return phase, level, tuple(rule.stage) if rule is not None else ()


def solver_nets(sp: Any, solver_path: str | None = None) -> tuple[NetSpec, list[NetSpec]]:
    """The train net and the test nets of a solver, by Caffe's InitTrainNet / InitTestNets."""
    given = [f for f in ("train_net_param", "train_net", "net_param", "net") if sp.HasField(f)]
    if not given:
        raise SolverError(
            "the solver specifies no train net: set one of net, net_param, train_net, "
            "train_net_param"
        )
    if len(given) > 1:
        raise SolverError(f"the solver sets more than one train net field: {', '.join(given)}")
    field = given[0]
    if field.endswith("_param"):
        train_param = _upgraded(getattr(sp, field))
    else:
        train_param = _load_net_file(getattr(sp, field), solver_path, field)
    rule = sp.train_state if sp.HasField("train_state") else None
    train = NetSpec(train_param, *_merged_state("TRAIN", train_param, rule))

    generic = sp.HasField("net") or sp.HasField("net_param")
    explicit = len(sp.test_net_param) + len(sp.test_net)
    n_iter = len(sp.test_iter)
    if (generic and n_iter < explicit) or (not generic and n_iter != explicit):
        raise SolverError(
            f"test_iter must be given once per test net: {n_iter} test_iter for {explicit} "
            "test_net/test_net_param"
        )
    params = [_upgraded(m) for m in sp.test_net_param]
    params += [_load_net_file(p, solver_path, "test_net") for p in sp.test_net]
    if generic:
        params += [train_param] * (n_iter - explicit)
    if len(sp.test_state) and len(sp.test_state) != len(params):
        raise SolverError(
            f"test_state must be given once per test net: {len(sp.test_state)} for {len(params)}"
        )
    if params and sp.test_interval <= 0:
        raise SolverError("the solver has test nets (test_iter) but no positive test_interval")
    tests = []
    for i, p in enumerate(params):
        rule = sp.test_state[i] if len(sp.test_state) else None
        tests.append(NetSpec(p, *_merged_state("TEST", p, rule)))
    return train, tests


def default_snapshot_prefix(sp: Any, solver_path: str | None) -> str:
    """Caffe's snapshot_prefix rule: unset → the solver path without extension; a directory →
    that directory plus the solver file's stem."""
    stem_path = os.path.splitext(solver_path)[0] if solver_path else "nincc"
    if not sp.snapshot_prefix:
        return stem_path
    if os.path.isdir(sp.snapshot_prefix):
        return os.path.join(sp.snapshot_prefix, os.path.basename(stem_path))
    return sp.snapshot_prefix


# ============================================================================ feeding nets


def output_blobs(graph: Graph) -> list[tuple[str, str, float]]:
    """(blob name, value id, loss weight) of the net outputs in Caffe's order (by blob name:
    Net::Init collects them in a std::set<string>)."""
    weights = {}
    for layer in graph.layers:
        weights.update(zip(layer.tops, layer.loss_weights, strict=True))
    outs = [(graph.value(v).blob, v, float(weights.get(v, 0.0))) for v in graph.outputs]
    return sorted(outs, key=lambda o: o[0].encode())


def _fed_blobs(graph: Graph) -> dict[str, tuple[tuple[int, ...], str]]:
    """Blob → (shape, layer) of every source-layer top the caller must feed."""
    from .layers import REGISTRY

    out = {}
    for layer in graph.layers:
        if REGISTRY[layer.type].source and layer.type not in SELF_FILLING:
            for vid in layer.tops:
                out[graph.value(vid).blob] = (graph.value(vid).shape, layer.name)
    return out


def _label_classes(graph: Graph) -> dict[str, int]:
    """Source blobs used as labels (a non-differentiable bottom after the first, as a loss's or
    Accuracy's label), with the class count read from the scores' axis 1."""
    from .layers import REGISTRY

    sources = {vid for layer in graph.layers if REGISTRY[layer.type].source for vid in layer.tops}
    out: dict[str, int] = {}
    for layer in graph.layers:
        entry = REGISTRY[layer.type]
        scores = graph.value(layer.bottoms[0]).shape if layer.bottoms else ()
        for j, vid in enumerate(layer.bottoms[1:], start=1):
            label = j in entry.no_grad_bottoms or not entry.backward
            if vid in sources and label:
                k = int(scores[1]) if len(scores) >= 2 and scores[1] > 0 else 2
                blob = graph.value(vid).blob
                out[blob] = min(out.get(blob, k), k)
    return out


def _class_label_limits(graph: Graph) -> dict[str, tuple[int, set[int], str]]:
    """Source blobs read as class indices (bottom 1 of SoftmaxWithLoss, Accuracy, ...): blob ->
    (class count, the consumers' ignore_labels, a consumer's name). Caffe reads such a label
    as an index without checking it; under jit an index out of range gives NaN, so the feeder
    checks it on the host instead."""
    from .layers import REGISTRY
    from .layers.base import canonical_axis

    sources = {vid for layer in graph.layers if REGISTRY[layer.type].source for vid in layer.tops}
    out: dict[str, tuple[int, set[int], str]] = {}
    for layer in graph.layers:
        if not REGISTRY[layer.type].extra.get("class_labels") or len(layer.bottoms) < 2:
            continue
        vid = layer.bottoms[1]
        if vid not in sources:
            continue
        scores = graph.value(layer.bottoms[0]).shape
        axis = canonical_axis(getattr(layer.attrs, "axis", 1), len(scores), "axis")
        k = int(scores[axis])
        ignore = getattr(layer.attrs, "ignore_label", None)
        blob = graph.value(vid).blob
        prev_k, prev_ignore, name = out.get(blob, (k, set(), layer.name))
        out[blob] = (min(k, prev_k), prev_ignore | ({ignore} if ignore is not None else set()),
                     name)
    return out


def check_class_labels(
    feeds: Mapping[str, np.ndarray], limits: Mapping[str, tuple[int, set[int], str]], where: str
) -> None:
    """DataError naming the first label outside [0, classes) that no ignore_label excuses."""
    for blob, (k, ignore, layer) in limits.items():
        labels = feeds.get(blob)
        if labels is None:
            continue
        flat = np.asarray(labels).ravel()
        bad = (flat < 0) | (flat >= k) | (flat != np.floor(flat))
        if ignore:
            bad &= ~np.isin(flat, sorted(ignore))
        if bad.any():
            i = int(np.argmax(bad))
            raise DataError(
                f"{where}: label {flat[i]:g} at row {i} of blob '{blob}' is not a class index "
                f"in [0, {k}) for layer '{layer}' (num_output {k}); check the data or the net"
            )


class Feeder:
    """The arrays fed to each forward of a net: its data sources' batches, or random arrays.

    Synthetic inputs are drawn per forward from a generator seeded by (seed, phase, index), so a
    resumed run sees exactly the inputs of an uninterrupted one. Labels are integers below the
    class count; other inputs are standard normal.

    With a data-parallel ``shard`` (nincc.data.Shard) the arrays hold the rows of the shard's
    ranks, rank after rank: records of the sources by Caffe's ``i % world`` rule, synthetic rows
    from one generator per rank (seeded by (seed, phase, index, rank)).
    """

    def __init__(
        self, graph: Graph, net_param: Any, synthetic: bool, seed: int, what: str,
        shard: Any = None,
    ):
        from .data.sources import WHOLE

        self.fed = _fed_blobs(graph)
        self.shard = shard or WHOLE
        self.synthetic, self.seed = synthetic, seed
        self.phase_tag = 0 if graph.phase == "TRAIN" else 1
        self.labels = _label_classes(graph) if synthetic else {}
        self.what = what
        self.class_labels = {} if synthetic else _class_label_limits(graph)
        self.sources: list[Any] = []
        if synthetic or not self.fed:
            return
        from .data import Prefetcher, sources_for

        sources = sources_for(graph, net_param, seed=seed, shard=self.shard)
        provided = {t for s in sources for t in s.tops}
        missing = [b for b in self.fed if b not in provided]
        if missing:
            for s in sources:
                s.close()
            b = missing[0]
            raise DataError(
                f"{what}: nothing feeds blob '{b}' of layer '{self.fed[b][1]}' (an input "
                "without a data source); use data layers (Data, HDF5Data, ImageData, ...) "
                "or --synthetic for random inputs"
            )
        self.sources = [Prefetcher(s) for s in sources]

    def _synthetic(self, seed: list[int]) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        out = {}
        for blob, (shape, _) in self.fed.items():
            if blob in self.labels:
                out[blob] = rng.integers(0, self.labels[blob], shape).astype(np.float32)
            else:
                out[blob] = rng.standard_normal(shape, dtype=np.float32)
        return out

    def next(self, index: int) -> dict[str, np.ndarray]:
        if self.synthetic:
            seed = [self.seed & 0xFFFFFFFF, self.phase_tag, index]
            if self.shard.whole:
                return self._synthetic(seed)
            ranks = range(self.shard.first, self.shard.first + self.shard.count)
            parts = [self._synthetic([*seed, r]) for r in ranks]
            return {b: np.concatenate([p[b] for p in parts]) for b in parts[0]}
        feeds: dict[str, np.ndarray] = {}
        for s in self.sources:
            feeds.update(s.next())
        check_class_labels(feeds, self.class_labels, f"{self.what}, batch {index}")
        return feeds

    def close(self) -> None:
        """Stop the prefetch threads and close the data sources."""
        for s in self.sources:
            s.close()
        self.sources = []


def _forward_fn(net: Any, params: Mapping[str, Sequence[Any]]) -> Callable:
    """``f(feeds, rng) -> ({output blob: array}, loss)`` on ``params``: the net's outputs only,
    so the compiled forward keeps its intermediates fused, and the weights bound once in the
    kernels' layout (nincc.compile.BoundNet)."""
    bound = net.bind(params)
    blobs = [blob for blob, _, _ in output_blobs(net.graph)]

    def forward(feeds, rng):
        values, _, loss = bound.run(feeds, rng, blobs, loss=True)
        return values, loss

    return forward


def copy_weights(
    params: dict[str, list], graph: Graph, stored: Any, source: str, log: logging.Logger = LOG
) -> dict[str, list]:
    """Params with the layers of ``stored`` copied in by name (Caffe's CopyTrainedLayersFrom:
    file layers the net lacks are ignored, a blob of another shape is an error)."""
    from .caffemodel import match_weights

    fitted, report = match_weights(stored, graph.weight_slots())
    out = dict(params)
    for name, arrays in fitted.items():
        if name not in out:
            continue  # a layer this pytree does not hold (e.g. shared with another net)
        owned = list(out[name])
        for i, arr in enumerate(arrays):
            if arr is not None:
                owned[i] = jnp.asarray(arr)
        out[name] = owned
    for line in report.lines():
        log.info("%s: %s", source, line)
    return out


# ============================================================================ the step


def _on_device(tree: Mapping[str, Sequence[Any]]) -> dict[str, list]:
    return {k: [jnp.asarray(a) for a in v] for k, v in tree.items()}


@jax.jit
def _all_finite(tree) -> Any:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else True


# ============================================================================ the solver


class _WarningsOnly(logging.LoggerAdapter):
    """A logger that passes warnings and errors only (processes other than 0 in a job)."""

    def isEnabledFor(self, level: int) -> bool:  # noqa: N802 - logging's name
        return level >= logging.WARNING and self.logger.isEnabledFor(level)


@contextmanager
def _signals(solver: Solver) -> Iterator[None]:
    """SIGINT/SIGTERM: snapshot and stop after the current iteration (Caffe's sigint_effect
    "stop"); SIGHUP: snapshot and go on. A second SIGINT interrupts at once."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        if solver._request == "stop" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        solver._request = "stop"

    def snap(signum, frame):
        solver._request = solver._request or "snapshot"

    wanted = {signal.SIGINT: stop, signal.SIGTERM: stop}
    if hasattr(signal, "SIGHUP"):
        wanted[signal.SIGHUP] = snap
    old = {s: signal.signal(s, h) for s, h in wanted.items()}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Solver:
    """Caffe's Solver for one SolverParameter: a TRAIN net, its TEST nets and the solver state.

    ``solve()`` runs to ``max_iter``; ``step(n)`` runs n iterations; ``restore(path)`` resumes
    from a .solverstate; ``snapshot()`` writes the weights and solver state. ``params`` and
    ``opt_state`` are the live pytrees (``{layer: [blobs]}`` and the solver's CaffeState).

    With ``parallel`` (a nincc.parallel.DataParallel layout) the train net runs data-parallel:
    ``batch_size`` is per device (``split_batch`` divides it over the devices instead), params
    and state are replicated global arrays, each process reads its own shard of the data, and
    only process 0 tests, writes snapshots and reports (``is_main``).
    """

    def __init__(
        self,
        sp: Any,
        solver_path: str | None = None,
        *,
        synthetic: bool = False,
        seed: int | None = None,
        input_shapes: Mapping[str, Sequence[int]] | None = None,
        metrics: MetricsWriter | None = None,
        progress: Progress | None = None,
        log: logging.Logger = LOG,
        fast: bool = True,
        parallel: Any = None,
        split_batch: bool = False,
    ):
        from . import compile as compile_net
        from .build import build_graph
        from .solver import SolverConfig

        self.parallel = parallel
        if not self.is_main:  # only process 0 reports
            log, metrics, progress = _WarningsOnly(log, {}), None, None
        self.sp, self.solver_path, self.log = sp, solver_path, log
        train, tests = solver_nets(sp, solver_path)
        if parallel is not None and split_batch:
            from dataclasses import replace

            from .parallel import split_batch as split

            net_param = split(train.net_param, parallel.world, train.phase, train.level,
                              train.stages)
            train = replace(train, net_param=net_param)
        self._train_spec, self._test_specs = train, tests
        self.cfg = SolverConfig.from_proto(sp)
        if seed is None:
            seed = int(sp.random_seed) if sp.random_seed >= 0 else secrets.randbits(31)
        self.seed = seed
        self.rng = jax.random.PRNGKey(seed)
        self.metrics, self.progress = metrics, progress
        self.snapshot_prefix = default_snapshot_prefix(sp, solver_path)
        self.snapshot_hdf5 = sp.snapshot_format == type(sp).HDF5

        def build(spec: NetSpec):
            graph = build_graph(
                spec.net_param, phase=spec.phase, level=spec.level, stages=spec.stages,
                input_shapes=input_shapes,
            )
            return compile_net(graph, fast=fast)

        self._input_shapes = input_shapes
        self._snapshot_definition: Any = None

        self.net = build(train)
        self.graph = self.net.graph
        if not self.net.has_loss:
            log.warning("the train net has no loss layer: nothing to minimise")
        outputs = [b for b, _, _ in output_blobs(self.graph)]
        if parallel is None:
            # Between steps XLA:CPU's convolutions want their weights (kh, kw, in, out)
            # (nincc.layout); `params` and `opt_state` still read and write Caffe's layout.
            cpu = jax.default_backend() == "cpu"
            self.trainer = Trainer(self.net, self.cfg, outputs, held_layout=cpu)
        else:
            self.trainer = parallel.trainer(self.net, self.cfg, outputs)
        self.params = self._place(self.net.init(seed))
        self.opt_state = self.trainer.init(self.params)
        self.iter = 0
        shard = parallel.shard if parallel is not None else None
        self.feeder = Feeder(self.graph, train.net_param, synthetic, seed, "the train net", shard)
        self.test_nets = [build(s) for s in tests]
        # Test nets run on process 0 only (Caffe's root solver), on one device.
        self.test_feeders = [
            Feeder(n.graph, s.net_param, synthetic, seed, f"test net #{i}")
            for i, (n, s) in enumerate(zip(self.test_nets, tests, strict=True))
        ] if self.is_main else []
        self._test_own = [
            {k: v for k, v in n.init(seed).items() if k not in self._params} for n in self.test_nets
        ]
        self._test_counts = [0] * len(self.test_nets)
        self._feed_count = 0
        first = [s[0] for s, _ in self.feeder.fed.values() if s]
        self.batch = (first[0] if first else 0) * (parallel.world if parallel is not None else 1)
        self._request: str | None = None
        self.requested_early_exit = False
        self.last_snapshot: str | None = None
        self.losses: list[np.float32] = []
        self.smoothed_loss = np.float32(0)

    # ---------------------------------------------------------------- placement

    @property
    def params(self) -> dict[str, list]:
        """The train net's weights, in Caffe's layout (replicated arrays when parallel)."""
        return self.trainer.caffe(self._params)

    @params.setter
    def params(self, value: Mapping[str, Sequence[Any]]) -> None:
        self._params = self.trainer.held(value)

    @property
    def opt_state(self) -> Any:
        """The solver state (iteration, rate, history), its history in Caffe's layout."""
        return self.trainer.caffe(self._opt_state)

    @opt_state.setter
    def opt_state(self, value: Any) -> None:
        self._opt_state = self.trainer.held(value)

    @property
    def is_main(self) -> bool:
        """Whether this process tests, logs and writes snapshots (always, unless process > 0)."""
        return self.parallel is None or self.parallel.is_main

    def _place(self, tree: Any) -> Any:
        """Host values → the trainer's arrays (replicated on every device when parallel)."""
        return tree if self.parallel is None else self.parallel.replicate(tree)

    def _host(self, tree: Any) -> Any:
        """The trainer's arrays → values this process can read (its own replica)."""
        return tree if self.parallel is None else self.parallel.host(tree)

    # ---------------------------------------------------------------- weights and state

    def copy_weights(self, spec: str) -> None:
        """Fine-tune: copy comma-separated weights files into the train and test nets by name."""
        from .caffemodel import load_params

        params = self._host(self.params)
        for path in [p for p in spec.split(",") if p]:
            self.log.info("Finetuning from %s", path)
            stored = load_params(path)
            params = copy_weights(params, self.graph, stored, path, self.log)
            for i, net in enumerate(self.test_nets):
                own = copy_weights(self._test_own[i], net.graph, stored, path, _QUIET)
                self._test_own[i] = {k: v for k, v in own.items() if k not in params}
        self.params = self._place(params)
        self.opt_state = self.trainer.init(self.params)

    def restore(self, state_path: str) -> None:
        """Resume: iteration, weights (``learned_net``) and history from a solver state file."""
        from .caffemodel import load_params

        self.log.info("Restoring previous solver status from %s", state_path)
        snap = read_solverstate(state_path)
        if snap.learned_net:
            weights = snap.learned_net
            if not os.path.exists(weights):
                beside = os.path.join(os.path.dirname(state_path), os.path.basename(weights))
                if not os.path.exists(beside):
                    raise WeightsError(
                        f"{state_path}: its weights file '{weights}' does not exist (read "
                        "relative to the working directory, as in Caffe)"
                    )
                weights = beside
            params = copy_weights(self._host(self.params), self.graph, load_params(weights),
                                  weights, _QUIET)
            self.params = self._place(params)
        shapes = self.graph.param_shapes()
        two = self.cfg.type in ("AdaDelta", "Adam")
        hist, hist2 = history_trees(snap.history, shapes, two, state_path)
        self.iter = int(snap.iter)
        self._feed_count = self.iter * self.cfg.iter_size  # synthetic inputs continue in step
        state = self.trainer.tx.init(self._host(self.params))
        self.opt_state = self._place(state._replace(
            iter=jnp.asarray(self.iter, jnp.int32),
            history=_on_device(hist),
            history2=_on_device(hist2) if hist2 is not None else None,
        ))

    def _check_replicas(self) -> None:
        """In a multi-process job: every process starts from the same iteration, weights and
        history (the same seed, weights file or snapshot), or all stop with one line."""
        if self.parallel is None or not self.parallel.distributed:
            return
        from .parallel import job_digest

        s = self.opt_state
        held = self._host((self.params, s.history, s.history2))
        leaves = [np.ascontiguousarray(a).tobytes() for a in jax.tree_util.tree_leaves(held)]
        self.parallel.check_same(
            "starting states (iteration, weights, solver history)", job_digest(self.iter, *leaves)
        )

    def check_snapshot_dir(self) -> None:
        """Fail before training if snapshots cannot be written (Caffe's write-permission probe);
        a missing directory is created. Only process 0 writes snapshots."""
        if not self.is_main:
            return
        directory = os.path.dirname(self.snapshot_prefix) or "."
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:
            raise SolverError(
                f"snapshot_prefix '{self.snapshot_prefix}': cannot create directory "
                f"'{directory}': {e.strerror or e}"
            ) from None
        probe = snapshot_filename(self.snapshot_prefix, self.iter, ".tempfile")
        try:
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as e:
            raise SolverError(
                f"cannot write snapshots to '{self.snapshot_prefix}_iter_*': "
                f"{e.strerror or e} (directory '{directory}')"
            ) from None

    def snapshot(self) -> tuple[str, str]:
        """Write ``<prefix>_iter_<N>.caffemodel`` and ``.solverstate`` (``.h5`` for HDF5).

        Every process checks its replica for NaN; only process 0 writes (all return the paths).
        """
        from .caffemodel import write_caffemodel, write_caffemodel_h5
        from .netdef import full_blobs, owned_blobs

        params = self._host(self.params)
        if not bool(_all_finite(params)):
            raise SolverError(
                f"iteration {self.iter}: the weights hold NaN or Inf; not writing a snapshot "
                f"(last good snapshot: {self.last_snapshot or 'none'})"
            )
        ext = ".h5" if self.snapshot_hdf5 else ""
        model = snapshot_filename(self.snapshot_prefix, self.iter, ".caffemodel" + ext)
        state = snapshot_filename(self.snapshot_prefix, self.iter, ".solverstate" + ext)
        if not self.is_main:
            self.last_snapshot = state
            return model, state
        kind = "HDF5 file" if self.snapshot_hdf5 else "binary proto file"
        self.log.info("Snapshotting to %s %s", kind, model)
        # Net::ToProto writes every layer's blobs, Net::ToHDF5 only the owners'
        blobs = owned_blobs if self.snapshot_hdf5 else full_blobs
        (write_caffemodel_h5 if self.snapshot_hdf5 else write_caffemodel)(
            model, self._snapshot_net(), blobs(self.graph, params)
        )
        order = history_order(self.graph.param_shapes())
        s = self._host(self.opt_state)
        history = history_list(s.history, s.history2, order)
        self.log.info("Snapshotting solver state to %s %s", kind, state)
        snap = SolverSnapshot(self.iter, model, history, current_step(self.cfg, self.iter))
        write_solverstate(state, snap)
        self.last_snapshot = state
        return model, state

    def _snapshot_net(self) -> Any:
        """The train net's definitions as Caffe's Net::ToProto writes them into a snapshot
        (Split layers included), built once."""
        if self._snapshot_definition is None:
            from .build import NetState, build_graph
            from .netdef import net_to_proto

            spec = self._train_spec
            split = build_graph(
                spec.net_param, phase=spec.phase, level=spec.level, stages=spec.stages,
                input_shapes=self._input_shapes, insert_splits=True,
            )
            state = NetState(spec.phase, spec.level, tuple(spec.stages))
            self._snapshot_definition = net_to_proto(spec.net_param, split, state)
        return self._snapshot_definition

    # ---------------------------------------------------------------- testing

    def test_params(self, i: int) -> dict[str, list]:
        """Test net ``i``'s params: the train net's layers by name (ShareTrainedLayersWith)."""
        out = dict(self._test_own[i])
        shapes = self.test_nets[i].graph.param_shapes()
        params = self._host(self.params)
        for name, want in shapes.items():
            if name in params:
                have = [tuple(np.shape(a)) for a in params[name]]
                if have != [tuple(s) for s in want]:
                    raise SolverError(
                        f"layer '{name}' has blobs {have} in the train net but {want} in test "
                        f"net #{i}; shared layers need equal shapes"
                    )
                out[name] = params[name]
        return out

    def test(self, i: int) -> dict[str, float] | None:
        """One test round of test net ``i`` (Caffe's Solver::Test); None if interrupted."""
        self.log.info("Iteration %d, Testing net (#%d)", self.iter, i)
        net = self.test_nets[i]
        fn = _forward_fn(net, self.test_params(i))
        n = int(self.sp.test_iter[i])
        sums: list[np.ndarray] | None = None
        loss = 0.0
        for _ in range(n):
            if self.parallel is not None:
                # The other processes wait in the next step: a request stays pending and rides
                # on that step, so all of them act on it together.
                if self._request == "stop":
                    self.log.info("Test interrupted.")
                    return None
            elif self._request == "snapshot":
                self._request = None
                self.snapshot()
            if self._request == "stop":
                self._request = None
                self.requested_early_exit = True
                self.log.info("Test interrupted.")
                return None
            feeds = self.test_feeders[i].next(self._test_counts[i])
            key = jax.random.fold_in(jax.random.fold_in(self.rng, 1 + i), self._test_counts[i])
            self._test_counts[i] += 1
            outs, it_loss = fn(feeds, key)
            loss += float(it_loss)
            vals = [np.asarray(outs[b], np.float64).ravel() for b, _, _ in output_blobs(net.graph)]
            sums = vals if sums is None else [s + v for s, v in zip(sums, vals, strict=True)]
        if self.sp.test_compute_loss and n:
            self.log.info("Test loss: %s", num(loss / n))
        results = _report_outputs(
            self.log, output_blobs(net.graph), sums or [], n, "    Test net output #{k}: "
        )
        if self.metrics is not None:
            self.metrics.write({"iter": self.iter, "test_net": i, "outputs": results})
        return results

    def test_all(self) -> list[dict[str, float] | None]:
        out: list[dict[str, float] | None] = []
        if not self.is_main:
            return out
        for i in range(len(self.test_nets)):
            if self.requested_early_exit:
                break
            out.append(self.test(i))
        return out

    # ---------------------------------------------------------------- training

    def _update_smoothed(self, loss: float, start_iter: int) -> None:
        """Caffe's UpdateSmoothedLoss: the mean of the last ``average_loss`` losses (float32)."""
        avg = max(1, int(self.sp.average_loss))
        loss32 = np.float32(loss)
        if len(self.losses) < avg:
            self.losses.append(loss32)
            size = len(self.losses)
            self.smoothed_loss = np.float32((self.smoothed_loss * (size - 1) + loss32) / size)
        else:
            idx = (self.iter - start_iter) % avg
            self.smoothed_loss = np.float32(self.smoothed_loss + (loss32 - self.losses[idx]) / avg)
            self.losses[idx] = loss32

    def _next_feeds(self) -> list[dict[str, np.ndarray]]:
        feeds = []
        for _ in range(self.cfg.iter_size):
            feeds.append(self.feeder.next(self._feed_count))
            self._feed_count += 1
        return feeds

    def step(self, iters: int) -> None:
        """Caffe's Solver::Step: ``iters`` iterations with tests, display and snapshots."""
        start_iter, stop_iter = self.iter, self.iter + iters
        self.losses, self.smoothed_loss = [], np.float32(0)
        display = int(self.sp.display)
        timer, iters_last = time.perf_counter(), self.iter
        images = self.batch * self.cfg.iter_size
        ema: float | None = None
        shown = 0.0
        while self.iter < stop_iter:
            ti = self.sp.test_interval
            if ti and self.iter % ti == 0 and (self.iter > 0 or self.sp.test_initialization):
                self.test_all()
                if self.requested_early_exit:
                    break
            show = display > 0 and self.iter % display == 0
            t0 = time.perf_counter()
            extra = {}
            if self.parallel is not None:  # this process's request rides on the step
                from .parallel import REQUESTS

                pending, self._request = self._request, None
                extra["request"] = REQUESTS[pending]
            self._params, self._opt_state, res = self.trainer.step(
                self._params, self._opt_state, self._next_feeds(), self.rng, it=self.iter, **extra
            )
            loss, rate, outputs = res.loss, res.rate, res.outputs
            if not math.isfinite(loss):
                raise SolverError(
                    f"iteration {self.iter}: the loss is {loss}; training diverged and stopped "
                    f"(last good snapshot: {self.last_snapshot or 'none'}); lower base_lr or "
                    "check the data"
                )
            self._update_smoothed(loss, start_iter)
            if self.metrics is not None:
                dt = time.perf_counter() - t0
                self.metrics.write(
                    {"iter": self.iter, "loss": loss, "lr": rate,
                     "images_per_s": images / dt if dt > 0 else None}
                )
            if show:
                lapse = time.perf_counter() - timer
                per_s = (self.iter - iters_last) / (lapse or 1.0)
                self.log.info(
                    "Iteration %d (%s iter/s, %ss/%d iters), loss = %s",
                    self.iter, num(per_s), num(lapse), display, num(self.smoothed_loss),
                )
                timer, iters_last = time.perf_counter(), self.iter
                outs = output_blobs(self.graph)
                vals = [np.asarray(outputs[b], np.float64).ravel() for b, _, _ in outs]
                _report_outputs(self.log, outs, vals, 1, "    Train net output #{k}: ")
                self.log.info("Iteration %d, lr = %s", self.iter, num(rate))
            self.iter += 1
            dt = time.perf_counter() - t0
            ema = dt if ema is None else 0.9 * ema + 0.1 * dt
            if self.progress is not None and time.perf_counter() - shown > 0.1:
                shown = time.perf_counter()
                self.progress.show(progress_text(
                    self.iter, stop_iter, float(self.smoothed_loss), rate,
                    images / ema if ema else 0.0, (stop_iter - self.iter) * ema,
                ))
            if self.parallel is not None:  # what all processes asked, agreed in the step
                from .parallel import REQUEST_NAMES

                request = REQUEST_NAMES.get(res.request)
            else:
                request, self._request = self._request, None
            snap_every = self.sp.snapshot
            if (snap_every and self.iter % snap_every == 0) or request == "snapshot":
                self.snapshot()
            if request == "stop":
                self.requested_early_exit = True
                break
        if self.progress is not None:
            self.progress.clear()

    def solve(self, resume: str | None = None, max_iter: int | None = None) -> int:
        """Caffe's Solver::Solve: restore, train to ``max_iter`` (default: the solver's), final
        snapshot, display and test. Returns the iteration reached."""
        self.log.info("Solving %s", self.graph.name)
        self.log.info("Learning Rate Policy: %s", self.cfg.lr_policy)
        self.requested_early_exit = False
        if resume:
            self.restore(resume)
        stop = self.sp.max_iter if max_iter is None else max_iter
        self._check_replicas()
        if self.sp.snapshot or self.sp.snapshot_after_train:
            self.check_snapshot_dir()
        start_iter = self.iter
        with _signals(self):
            self.step(max(0, stop - self.iter))
            after = self.sp.snapshot_after_train
            if after and (not self.sp.snapshot or self.iter % self.sp.snapshot != 0):
                self.snapshot()
            if self.requested_early_exit:
                self.log.info("Optimization stopped early.")
                return self.iter
            display = int(self.sp.display)
            if display and self.iter % display == 0 and self.is_main:
                loss = self._final_loss()
                self._update_smoothed(loss, start_iter)
                self.log.info("Iteration %d, loss = %s", self.iter, num(self.smoothed_loss))
            ti = self.sp.test_interval
            if ti and self.iter % ti == 0:
                self.test_all()
        self.log.info("Optimization Done.")
        return self.iter

    def close(self) -> None:
        """Stop the data sources' prefetch threads and close their files."""
        for feeder in [self.feeder, *self.test_feeders]:
            feeder.close()

    def _final_loss(self) -> float:
        """One more TRAIN forward, as Solve does for its last display line."""
        feeds = self.feeder.next(self._feed_count)
        self._feed_count += 1
        if self.parallel is not None:  # this process's first device's rows
            n = self.parallel.local_count
            feeds = {k: v[: len(v) // n] for k, v in feeds.items()}
        key = jax.random.fold_in(jax.random.fold_in(self.rng, 0), self.iter)
        _, loss = _forward_fn(self.net, self._host(self.params))(feeds, key)
        return float(loss)



def _report_outputs(
    log: logging.Logger,
    outs: list[tuple[str, str, float]],
    sums: list[np.ndarray],
    n: int,
    prefix: str,
) -> dict[str, float]:
    """Log each element of each output blob as Caffe does (``name = mean (* w = x loss)``)."""
    results: dict[str, float] = {}
    k = 0
    for (blob, _, weight), values in zip(outs, sums, strict=True):
        for j, total in enumerate(values):
            mean = float(np.float32(total / max(n, 1)))
            extra = f" (* {num(weight)} = {num(weight * mean)} loss)" if weight else ""
            log.info("%s%s = %s%s", prefix.format(k=k), blob, num(mean), extra)
            results[blob if len(values) == 1 else f"{blob}[{j}]"] = mean
            k += 1
    return results


# ============================================================================ test and time


def _graph_for(args: argparse.Namespace, phase: str) -> Any:
    from . import compile as compile_net
    from . import load_net_param
    from .build import build_graph

    net_param = load_net_param(args.net)
    graph = build_graph(
        net_param, phase=getattr(args, "phase", None) or phase,
        level=getattr(args, "level", None), stages=getattr(args, "stage", None) or (),
        input_shapes=_input_shapes(getattr(args, "input_shape", None)),
    )
    return compile_net(graph, fast=not getattr(args, "reference_lowerings", False)), net_param


def _input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    out = {}
    for text in specs or ():
        name, eq, dims = text.partition("=")
        try:
            if not eq:
                raise ValueError
            out[name] = tuple(int(d) for d in dims.replace("x", ",").split(","))
        except ValueError:
            raise InputError(f"--input-shape wants NAME=N,C,H,W, got {text!r}") from None
    return out


def score(
    net: Any,
    net_param: Any,
    params: Mapping[str, Sequence[Any]],
    iterations: int,
    synthetic: bool = False,
    seed: int = 0,
    log: logging.Logger = LOG,
) -> tuple[float, dict[str, float]]:
    """``caffe test``: forward ``iterations`` batches, log each batch's outputs, then the mean
    loss and each output's mean. Returns (mean loss, {output: mean})."""
    feeder = Feeder(net.graph, net_param, synthetic, seed, f"the {net.graph.phase} net")
    try:
        return _score(net, feeder, params, iterations, seed, log)
    finally:
        feeder.close()


def _score(
    net: Any, feeder: Feeder, params: Mapping[str, Sequence[Any]], iterations: int, seed: int,
    log: logging.Logger,
) -> tuple[float, dict[str, float]]:
    fn = _forward_fn(net, params)
    outs = output_blobs(net.graph)
    rng = jax.random.PRNGKey(seed)
    sums: list[np.ndarray] | None = None
    loss = 0.0
    log.info("Running for %d iterations.", iterations)
    for i in range(iterations):
        result, it_loss = fn(feeder.next(i), jax.random.fold_in(rng, i))
        loss += float(it_loss)
        vals = [np.asarray(result[b], np.float64).ravel() for b, _, _ in outs]
        for (blob, _, _), v in zip(outs, vals, strict=True):
            for x in v:
                log.info("Batch %d, %s = %s", i, blob, num(x))
        sums = vals if sums is None else [s + v for s, v in zip(sums, vals, strict=True)]
    mean_loss = loss / max(iterations, 1)
    log.info("Loss: %s", num(mean_loss))
    return mean_loss, _report_outputs(log, outs, sums or [], iterations, "")


def diff_values(graph: Graph) -> set[str]:
    """The values Caffe's backward gives a diff (``blob_need_backward``): the tops of layers
    with a learnable blob (lr_mult != 0) or reading such a value where propagate_down allows;
    every value under ``force_backward``. Data and Input tops get none."""
    out: set[str] = set()
    for layer in graph.layers:
        learns = any(p.lr_mult != 0 and not p.state for p in layer.params)
        reads = any(b in out and d for b, d in zip(layer.bottoms, layer.propagate_down))
        if graph.force_backward or learns or reads:
            out.update(layer.tops)
    return out


def _median_ms(fn: Callable, args: tuple, iterations: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1000.0 * statistics.median(times)


@dataclass
class Timing:
    """``nincc time``'s result: median milliseconds per iteration, whole net and per layer."""

    forward_ms: float
    forward_backward_ms: float
    # (layer, forward ms, backward ms or None, lowering: "fast" or "table")
    layers: list[tuple[str, float, float | None, str]]


def time_net(
    net: Any, params: Mapping[str, Sequence[Any]], iterations: int = 50, seed: int = 0,
    per_layer: bool = True,
) -> Timing:
    """Time the jitted forward and forward+backward on random inputs (median of ``iterations``).

    Per-layer times come from jitting each layer alone, with the lowering (and the activation
    layout) the train step uses, on the inputs the whole forward gives it. A layer's backward
    is the vector-Jacobian product for a ones top diff, with respect to its blobs and to the
    bottoms Caffe's backward gives a diff (:func:`diff_values`; not a Data layer's tops), as
    ``caffe time`` runs it: timed alone, from the residuals a forward already saved. XLA
    fuses across layers in the whole net, so the per-layer sum differs from the whole-net
    time.
    """
    from . import act_layout, blocked
    from .compile import (
        blocked_placements,
        channels_last_lowering,
        choose_lowering,
        layer_ctx,
        layer_params,
        run_graph,
        total_loss,
    )
    from .layers import REGISTRY

    graph = net.graph
    feeds = {k: jnp.asarray(v) for k, v in Feeder(graph, None, True, seed, "net").next(0).items()}
    rng = jax.random.PRNGKey(seed)
    outs = output_blobs(graph)

    def objective(p, f, k):
        env, _ = run_graph(graph, p, f, k, fast=net.fast)
        if net.has_loss:
            return total_loss(graph, env)
        return sum((jnp.sum(env[v]) for _, v, _ in outs), jnp.zeros((), jnp.float32))

    fwd = jax.jit(objective)
    fwd_bwd = jax.jit(jax.value_and_grad(objective))
    forward_ms = _median_ms(fwd, (params, feeds, rng), iterations)
    fb_ms = _median_ms(fwd_bwd, (params, feeds, rng), iterations)
    layers: list[tuple[str, float, float | None, str]] = []
    if per_layer:
        needs_diff = diff_values(graph)
        placed = blocked_placements(graph, net.fast)
        env, _ = jax.jit(lambda p, f, k: run_graph(graph, p, f, k, fast=net.fast))(
            params, feeds, rng
        )
        for index, layer in enumerate(graph.layers):
            entry = REGISTRY[layer.type]
            lparams = layer_params(params, layer, graph)
            bottoms = [env[b] for b in layer.bottoms]
            key = jax.random.fold_in(rng, index)

            lower, kind = choose_lowering(
                layer, [graph.value(b).shape for b in layer.bottoms], net.fast
            )
            nhwc = channels_last_lowering(layer, layer_ctx(graph, layer, key, feeds), net.fast)
            # As in the step: bottoms in the layout the layer reads, and no transposes timed.
            place = placed.get(layer.name)
            src = act_layout.NCHW
            if place is not None:  # the layouts nincc.blocked places it in
                lower, src = blocked.lowering(layer, place), place.src
            elif nhwc is not None:  # channels-last in and out
                lower, src = nhwc, act_layout.NHWC
            bottoms = [act_layout.convert(b, act_layout.NCHW, src) for b in bottoms]

            def run(lp, bs, f, k, layer=layer, lower=lower):
                return lower(layer.attrs, lp, bs, layer_ctx(graph, layer, k, f))

            f_ms = _median_ms(jax.jit(run), (lparams, bottoms, feeds, key), iterations)
            b_ms = None
            wrt = [
                i
                for i, (b, d) in enumerate(zip(layer.bottoms, layer.propagate_down))
                if d and b in needs_diff
            ]
            if entry.backward and (lparams or wrt):

                def forward(lp, bs, f, k, run=run, wrt=wrt):
                    def fn(p_, diffed):
                        full = list(bs)
                        for i, b in zip(wrt, diffed):
                            full[i] = b
                        return run(p_, full, f, k)

                    tops, vjp = jax.vjp(fn, lp, [bs[i] for i in wrt])
                    return vjp, [jnp.ones_like(t) for t in tops]

                # The pullback (a pytree of the forward's residuals) and the top diffs are
                # arguments: the timed function is the backward alone, and XLA cannot fold
                # the ones top diff into a constant (a pooling's backward then took half a
                # minute to compile).
                pullback, diffs = jax.jit(forward)(lparams, bottoms, feeds, key)
                b_ms = _median_ms(jax.jit(lambda vjp, d: vjp(d)), (pullback, diffs), iterations)
            layers.append((layer.name, f_ms, b_ms, kind))
    return Timing(forward_ms, fb_ms, layers)


# ============================================================================ the commands


@contextmanager
def _command_log(progress_line: bool = False) -> Iterator[tuple[logging.Logger, Progress | None]]:
    """The glog-style stderr logger of one command (and its progress line on a terminal)."""
    progress = Progress() if progress_line else None
    if progress is not None and not progress.enabled:
        progress = None
    log = glog_logger(progress=progress)
    try:
        yield log, progress
    finally:
        for handler in list(log.handlers):
            log.removeHandler(handler)


def cmd_train(args: argparse.Namespace) -> int:
    """Train a net with its Caffe solver (resume with --snapshot, fine-tune with --weights);
    data-parallel over --devices, and over processes with --coordinator (nincc.parallel)."""
    from . import parallel as par

    if args.snapshot and args.weights:
        raise SolverError(
            "give a snapshot to resume training or weights to fine-tune, not both (as Caffe)"
        )
    cluster = par.cluster_from(
        args.coordinator, args.num_processes, args.process_id, args.init_timeout,
        args.heartbeat_timeout,
    )
    if cluster is not None:
        if par.ENV_WORKER not in os.environ:  # this process supervises; a worker trains
            return par.supervise(getattr(args, "argv", None) or sys.argv[1:], cluster)
        par.become_worker()
        par.initialize(cluster)
    dp = None
    if cluster is not None or args.devices is not None:
        dp = par.DataParallel(args.devices or "all")
        if dp.world == 1 and not dp.distributed:
            dp = None  # one device: the plain step is the same computation
    sp, solver_path = resolve_solver(args.target, args.solver)
    main = dp is None or dp.is_main
    metrics = MetricsWriter(args.metrics) if args.metrics and main else None
    try:
        with _command_log(not args.no_progress and main) as (log, progress):
            _train(args, sp, solver_path, log, progress, metrics, dp)
    finally:
        if metrics is not None:
            metrics.close()
    return 0


def _train(
    args: argparse.Namespace, sp: Any, solver_path: str, log: logging.Logger,
    progress: Progress | None, metrics: MetricsWriter | None, dp: Any = None,
) -> None:
    seed = args.seed
    if dp is not None and dp.distributed:
        from . import __version__
        from .parallel import job_digest

        if seed is None:  # every process initialises the weights from process 0's seed
            seed = int(sp.random_seed) if sp.random_seed >= 0 else secrets.randbits(31)
            seed = dp.agree_seed(seed)
        train, tests = solver_nets(sp, solver_path)
        dp.check_same(
            "nets, solvers or options",
            job_digest(
                __version__, sp, train.net_param, *[t.net_param for t in tests], dp.local_count,
                args.split_batch, args.synthetic, seed, args.max_iter, args.input_shape,
                args.stage, args.level, args.reference_lowerings, bool(args.snapshot),
                bool(args.weights),
            ),
        )
    solver = Solver(
        sp, solver_path, synthetic=args.synthetic, seed=seed,
        input_shapes=_input_shapes(args.input_shape), metrics=metrics, progress=progress, log=log,
        fast=not args.reference_lowerings, parallel=dp, split_batch=args.split_batch,
    )
    try:
        from .malloc import describe

        solver.log.info("malloc: %s.", describe())
        if args.seed is None and sp.random_seed < 0:
            solver.log.info("Random seed %d (pass --seed %d to repeat this run)", solver.seed,
                            solver.seed)
        if dp is not None:
            solver.log.info(
                "Data-parallel on %s: %d images per iteration (batch %d per device x %d x "
                "iter_size %d)", dp.describe(), solver.batch * solver.cfg.iter_size,
                solver.batch // dp.world, dp.world, solver.cfg.iter_size,
            )
        weights = args.weights or (",".join(sp.weights) if not args.snapshot else "")
        if weights:
            solver.copy_weights(weights)
        solver.solve(resume=args.snapshot, max_iter=args.max_iter)
    finally:
        solver.close()


def cmd_test(args: argparse.Namespace) -> int:
    """Score a net (TEST phase) for --iterations batches, as ``caffe test`` does."""
    if not args.weights and not args.synthetic:
        raise WeightsError("nincc test needs --weights (the model to score)")
    from .caffemodel import load_params

    net, net_param = _graph_for(args, "TEST")
    params = net.init(args.seed)
    with _command_log() as (log, _):
        for path in [p for p in (args.weights or "").split(",") if p]:
            params = copy_weights(params, net.graph, load_params(path), path, log)
        score(net, net_param, params, args.iterations, args.synthetic, args.seed, log)
    return 0


def cmd_time(args: argparse.Namespace) -> int:
    """Median forward and forward+backward times of a net, and per-layer times."""
    net, _ = _graph_for(args, "TRAIN")
    params = net.init(args.seed)
    with _command_log() as (log, _):
        _report_time(log, net, params, args)
    return 0


def _report_time(log: logging.Logger, net: Any, params: Any, args: argparse.Namespace) -> None:
    from .compile import blocked_placements
    from .fast import backward_note, forward_note
    from .malloc import describe

    log.info("*** Benchmark begins ***")
    log.info("malloc: %s.", describe())
    log.info("Timing for %d iterations (median; random inputs).", args.iterations)
    t = time_net(net, params, args.iterations, args.seed, per_layer=not args.no_layers)
    if t.layers:
        log.info("Median time per layer (each layer jitted alone, with the train step's lowering):")
        layers = {layer.name: layer for layer in net.graph.layers}
        placed = blocked_placements(net.graph, net.fast)
        for name, f_ms, b_ms, kind in t.layers:
            layer = layers[name]
            shapes = [net.graph.value(b).shape for b in layer.bottoms]
            tags = ["", ""]
            if kind == "fast":
                notes = (forward_note, backward_note)
                tags = [n(layer.type, layer.attrs, shapes) for n in notes]
                if name in placed:
                    tags = [f"{n}, {placed[name].dst}" for n in tags]
                tags = [f" [fast, {n}]" if n else " [fast]" for n in tags]
            log.info("%10s\tforward: %s ms.%s", name, num(f_ms), tags[0])
            if b_ms is not None:
                log.info("%10s\tbackward: %s ms.%s", name, num(b_ms), tags[1])
    log.info("Median Forward pass: %s ms.", num(t.forward_ms))
    log.info("Backward pass (forward-backward minus forward): %s ms.",
             num(max(0.0, t.forward_backward_ms - t.forward_ms)))
    log.info("Median Forward-Backward: %s ms.", num(t.forward_backward_ms))
    log.info("*** Benchmark ends ***")


def cmd_plot(args: argparse.Namespace) -> int:
    """Loss and accuracy curves of a metrics file (needs matplotlib)."""
    from .metrics import plot_curves, read_metrics

    plot_curves(read_metrics(args.metrics), args.output)
    print(f"wrote {args.output}")
    return 0


TRAIN_COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "train": (cmd_train, "train a net with its Caffe solver (snapshots, resume, fine-tune)"),
    "test": (cmd_test, "score a net's outputs over batches, as caffe test"),
    "time": (cmd_time, "forward / backward timings of a net, whole and per layer"),
    "plot": (cmd_plot, "loss and accuracy curves from a training metrics file"),
}


def _state_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--level", type=int, default=None, help="NetState level")
    p.add_argument("--stage", action="append", help="NetState stage (repeatable)")
    p.add_argument(
        "--input-shape", action="append", metavar="BLOB=N,C,H,W",
        help="shape of a source layer's top (e.g. a Data layer whose database is absent)",
    )
    p.add_argument(
        "--reference-lowerings", action="store_true",
        help="run the layer table's reference lowerings only, not nincc.fast's",
    )


def _parallel_args(p: argparse.ArgumentParser) -> None:
    from .parallel import DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_INIT_TIMEOUT

    g = p.add_argument_group(
        "data-parallel training",
        "batch_size in the prototxt is per device, as in Caffe's multi-GPU training; the update "
        "equals one device's with the combined batch. Several machines: one command per "
        "process, e.g. --coordinator host0:1234 --num-processes 2 --process-id 0 (or "
        "NINCC_COORDINATOR, NINCC_NUM_PROCESSES, NINCC_PROCESS_ID; --coordinator auto reads a "
        "SLURM or Open MPI job). Process 0 logs, tests and writes snapshots.",
    )
    g.add_argument("--devices", metavar="N|all",
                   help="train on N local devices (per process) or all of them")
    g.add_argument("--split-batch", action="store_true",
                   help="read the prototxt's batch_size as the combined batch of all devices "
                   "(it must divide evenly)")
    g.add_argument("--coordinator", metavar="HOST:PORT|auto",
                   help="process 0's address and a free port (process 0 serves it)")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the job")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    g.add_argument("--init-timeout", type=float, metavar="S",
                   help=f"seconds to wait for the coordinator and all processes "
                   f"(default {DEFAULT_INIT_TIMEOUT:g})")
    g.add_argument("--heartbeat-timeout", type=int, metavar="S",
                   help=f"seconds of silence after which a process counts as dead "
                   f"(default {DEFAULT_HEARTBEAT_TIMEOUT})")


def add_train_parsers(subparsers: Any) -> None:
    """Register the train, test, time and plot sub-commands on an argparse subparsers object."""
    p = subparsers.add_parser("train", help=TRAIN_COMMANDS["train"][1])
    p.add_argument(
        "target", nargs="?", metavar="NET_OR_SOLVER",
        help="a solver prototxt, or a net prototxt (its solver: x_solver.prototxt beside it)",
    )
    p.add_argument("--solver", help="solver prototxt (its nets are replaced by a given net)")
    p.add_argument("--weights", help="weights file(s), comma-separated, to fine-tune from")
    p.add_argument("--snapshot", help="resume from a .solverstate (or .solverstate.h5)")
    p.add_argument("--synthetic", action="store_true",
                   help="random inputs of the data layers' shapes instead of reading data")
    p.add_argument("--max-iter", type=int, help="stop at this iteration (lr schedule unchanged)")
    p.add_argument("--seed", type=int, help="filler, dropout and synthetic-data seed "
                   "(default: the solver's random_seed)")
    p.add_argument("--metrics", help="append JSON lines (iter, loss, lr, images/s, tests) here")
    p.add_argument("--no-progress", action="store_true", help="no progress line on a terminal")
    _state_args(p)
    _parallel_args(p)
    p = subparsers.add_parser("test", help=TRAIN_COMMANDS["test"][1])
    p.add_argument("net", help="net prototxt (TEST phase)")
    p.add_argument("--weights", help="weights file(s), comma-separated")
    p.add_argument("--iterations", type=int, default=50, help="batches to score (default 50)")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"])
    p.add_argument("--synthetic", action="store_true", help="random inputs instead of data")
    p.add_argument("--seed", type=int, default=0)
    _state_args(p)
    p = subparsers.add_parser("time", help=TRAIN_COMMANDS["time"][1])
    p.add_argument("net", help="net prototxt")
    p.add_argument("--iterations", type=int, default=50, help="timed runs (default 50)")
    p.add_argument("--phase", default="TRAIN", choices=["TRAIN", "TEST"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer timings")
    _state_args(p)
    p = subparsers.add_parser("plot", help=TRAIN_COMMANDS["plot"][1])
    p.add_argument("metrics", help="metrics file written by nincc train --metrics")
    p.add_argument("-o", "--output", default="curves.png", help="image file (default curves.png)")


__all__ = [
    "Feeder",
    "NetSpec",
    "Solver",
    "TRAIN_COMMANDS",
    "Timing",
    "add_train_parsers",
    "cmd_plot",
    "cmd_test",
    "cmd_time",
    "cmd_train",
    "copy_weights",
    "output_blobs",
    "resolve_solver",
    "score",
    "solver_nets",
    "time_net",
]

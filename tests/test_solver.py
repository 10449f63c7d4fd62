"""Caffe's solver trajectories: params, losses and rates after every iteration equal Caffe's."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import nincc
from nincc import onednn
from nincc.caffemodel import match_weights, read_caffemodel
from nincc.data import sources_for
from nincc.prototxt import load_solver
from nincc.solver import SolverConfig, learning_rate
from nincc.train import Trainer

from .conftest import FIXTURES
from .fixture_harness import close, param_split

CASES = sorted(p.name for p in FIXTURES.glob("solver_*")) if FIXTURES.is_dir() else []


def _run(case, monkeypatch, iters: int, held: bool = False):
    path = FIXTURES / case
    monkeypatch.chdir(path)
    sp = load_solver(path / "solver.prototxt")
    cfg = SolverConfig.from_proto(sp)
    net_param = nincc.load_net_param(path / sp.net)
    net = nincc.compile(nincc.build_graph(net_param, phase="TRAIN"))
    params, _ = match_weights(read_caffemodel(path / "init.caffemodel"), net.graph.param_shapes())
    params = {k: [jnp.asarray(a) for a in v] for k, v in params.items()}
    trainer = Trainer(net, cfg, held_layout=held)
    assert bool(trainer.layout) == held  # every case has a 3x3 convolution
    state = trainer.held(trainer.init(params))
    params = trainer.held(params)
    (source,) = sources_for(net.graph, net_param)
    results = []
    snapshots = []
    for _ in range(iters):
        feeds = [source.next() for _ in range(cfg.iter_size)]
        params, state, res = trainer.step(params, state, feeds)
        results.append(res)
        snapshots.append({k: [np.asarray(a) for a in v] for k, v in trainer.caffe(params).items()})
    return json.loads((path / "manifest.json").read_text()), results, snapshots


@pytest.mark.parametrize("held", [False, True], ids=["caffe_layout", "held_layout"])
@pytest.mark.parametrize("case", CASES)
def test_solver_trajectory(case, held, monkeypatch):
    """Caffe's layout on oneDNN's kernels where installed; the held layout on XLA's (oneDNN
    reads Caffe's layout, so nothing is held there)."""
    if held:
        monkeypatch.setenv(onednn.OPT_OUT, "0")
    m = json.loads((FIXTURES / case / "manifest.json").read_text())
    m, results, snapshots = _run(case, monkeypatch, m["iterations"], held)
    tol = m["tolerances"]
    with np.load(FIXTURES / case / "trajectory.npz", allow_pickle=False) as d:
        ref = {k: d[k] for k in d.files}
    problems = []
    for k, (res, params) in enumerate(zip(results, snapshots), start=1):
        msg = close(f"iter{k} lr", res.rate, ref["lr"][k - 1], tol["lr_rel"])
        msg = msg or close(f"iter{k} loss", res.loss, ref["loss"][k - 1], tol["loss_rel"])
        if msg:
            problems.append(msg)
        for key in ref:
            if key.startswith(f"iter{k}/"):
                layer, i = param_split(key.split("/", 1)[1])
                msg = close(key, params[layer][i], ref[key], tol["trajectory_rel"])
                if msg:
                    problems.append(msg)
    assert not problems, "\n".join(problems[:20])


def test_learning_rate_policies_match_caffe():
    """The rates Caffe used in every solver case, from the policy formulas."""
    for case in CASES:
        sp = load_solver(FIXTURES / case / "solver.prototxt")
        cfg = SolverConfig.from_proto(sp)
        with np.load(FIXTURES / case / "trajectory.npz", allow_pickle=False) as d:
            lrs = d["lr"]
        for it, ref in enumerate(lrs):
            assert abs(float(learning_rate(cfg, it)) - float(ref)) <= 1e-6 * abs(float(ref)), case


def test_unknown_solver_type_and_policy():
    with pytest.raises(nincc.SolverError, match="unknown solver type 'Foo'"):
        SolverConfig(type="Foo").validate()
    with pytest.raises(nincc.SolverError, match="unknown lr_policy 'cosine'"):
        SolverConfig(lr_policy="cosine").validate()

"""Solver states in Caffe's two formats, checked against the files real Caffe wrote."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nincc import caffe_pb2
from nincc.errors import WeightsError
from nincc.loop import Solver
from nincc.prototxt import load_solver, parse_solver_text
from nincc.snapshot import (
    SolverSnapshot,
    current_step,
    history_list,
    history_order,
    history_trees,
    read_solverstate,
    write_solverstate,
)
from nincc.solver import SolverConfig

from .conftest import FIXTURES, fixture_case

SOLVER_CASES = sorted(p.name for p in FIXTURES.glob("solver_*")) if FIXTURES.is_dir() else []


def _caffe_state(path) -> caffe_pb2.SolverState:
    msg = caffe_pb2.SolverState()
    msg.ParseFromString(path.read_bytes())
    return msg


def test_binary_round_trip_parses_as_caffe_solverstate(tmp_path):
    rng = np.random.default_rng(0)
    history = [rng.standard_normal((5, 1, 3, 3)).astype(np.float32),
               rng.standard_normal(5).astype(np.float32),
               np.array(2.5, np.float32),  # a 0-axis blob (shared PReLU slope)
               np.zeros((0, 4), np.float32)]
    path = tmp_path / "s.solverstate"
    write_solverstate(path, SolverSnapshot(42, "m_iter_42.caffemodel", history, 3))
    msg = _caffe_state(path)
    assert (msg.iter, msg.learned_net, msg.current_step) == (42, "m_iter_42.caffemodel", 3)
    assert [list(b.shape.dim) for b in msg.history] == [[5, 1, 3, 3], [5], [], [0, 4]]
    assert not msg.history[2].HasField("shape")  # Blob::ToProto writes no dims for 0 axes
    for blob, ref in zip(msg.history, history, strict=True):
        np.testing.assert_array_equal(np.asarray(blob.data, np.float32), ref.ravel())
    back = read_solverstate(path)
    assert (back.iter, back.learned_net, back.current_step) == (42, "m_iter_42.caffemodel", 3)
    for a, b in zip(back.history, history, strict=True):
        assert a.shape == b.shape
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", [c for c in SOLVER_CASES if c != "solver_sgd_hdf5_snapshot"])
def test_read_caffe_binary_solverstate(case):
    path = FIXTURES / case
    m = json.loads((path / "manifest.json").read_text())
    if not (path / "snapshot_iter_6.solverstate").exists():
        pytest.skip("snapshot not stored")
    snap = read_solverstate(path / "snapshot_iter_6.solverstate")
    info = m["solverstate"]
    assert snap.iter == info["iter"] and snap.current_step == info["current_step"]
    assert snap.learned_net == info["learned_net"]
    assert len(snap.history) == info["history_blobs"]
    order = [tuple(s) for _, s in m["params"]]
    slots = 2 if m["solver_class"] in ("AdamSolver", "AdaDeltaSolver") else 1
    assert [h.shape for h in snap.history] == order * slots


@pytest.mark.parametrize("case", SOLVER_CASES)
def test_current_step_matches_caffe(case):
    path = FIXTURES / case
    cfg = SolverConfig.from_proto(load_solver(path / "solver.prototxt"))
    for state in sorted(path.glob("snapshot_iter_*.solverstate*")):
        snap = read_solverstate(state)
        assert current_step(cfg, snap.iter) == snap.current_step, state.name


def test_hdf5_solverstate_is_caffes_layout(tmp_path):
    case = fixture_case("solver_sgd_hdf5_snapshot")
    h5py = pytest.importorskip("h5py")
    theirs = read_solverstate(case / "snapshot_iter_6.solverstate.h5")
    binary = read_solverstate(FIXTURES / "solver_sgd" / "snapshot_iter_6.solverstate")
    assert (theirs.iter, theirs.current_step) == (binary.iter, binary.current_step) == (6, 1)
    assert theirs.learned_net == "snapshot_iter_6.caffemodel.h5"
    for a, b in zip(theirs.history, binary.history, strict=True):  # the same run, two formats
        np.testing.assert_array_equal(a, b)

    out = tmp_path / "s.solverstate.h5"
    write_solverstate(out, theirs)
    with h5py.File(out, "r") as mine, h5py.File(case / "snapshot_iter_6.solverstate.h5") as ref:
        def layout(f):
            items = {}
            f.visititems(lambda name, obj: items.__setitem__(
                name, (obj.dtype.str, obj.shape) if isinstance(obj, h5py.Dataset) else "group"))
            return items

        assert layout(mine) == layout(ref)
        assert mine["learned_net"][()] == ref["learned_net"][()]
    back = read_solverstate(out)
    assert (back.iter, back.current_step, back.learned_net) == (6, 1, theirs.learned_net)
    for a, b in zip(back.history, theirs.history, strict=True):
        np.testing.assert_array_equal(a, b)


def test_history_trees_checks_count_and_shape():
    shapes = {"conv1": [(2, 1, 3, 3), (2,)], "ip": [(4, 8)]}
    order = history_order(shapes)
    assert order == [("conv1", 0), ("conv1", 1), ("ip", 0)]
    blobs = [np.full(s, i, np.float32) for i, s in enumerate([(2, 1, 3, 3), (2,), (4, 8)] * 2)]
    h1, h2 = history_trees(blobs, shapes, two_slots=True)
    assert h1["ip"][0][0, 0] == 2 and h2["conv1"][0][0, 0, 0, 0] == 3
    flat = history_list(h1, h2, order)
    assert [float(b.flat[0]) for b in flat] == [0, 1, 2, 3, 4, 5]
    with pytest.raises(WeightsError, match=r"s\.solverstate holds 6 history blobs, the solver "
                                           r"needs 3 \(3 learnable blobs\)"):
        history_trees(blobs, shapes, two_slots=False, path="s.solverstate")
    bad = [np.zeros((3, 3), np.float32)] + blobs[1:3]
    with pytest.raises(WeightsError, match=r"history blob 0 \(conv1 blob 0\) has shape \[3, 3\]"):
        history_trees(bad, shapes, two_slots=False)


def test_not_a_solverstate(tmp_path):
    bad = tmp_path / "x.solverstate"
    bad.write_bytes(b"\xff\xff\xff garbage")
    with pytest.raises(WeightsError, match=r"x\.solverstate is not a Caffe \.solverstate"):
        read_solverstate(bad)
    with pytest.raises(WeightsError, match="cannot read solver state"):
        read_solverstate(tmp_path / "missing.solverstate")


ADAM_NET = """
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "constant" value: 0.2 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.5 }
    bias_filler { type: "constant" value: 0.2 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def test_adam_snapshot_holds_both_slots_in_caffes_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.prototxt").write_text(ADAM_NET)
    sp = parse_solver_text(
        'net: "net.prototxt" type: "Adam" base_lr: 0.01 lr_policy: "fixed" momentum: 0.9 '
        'momentum2: 0.999 max_iter: 1 snapshot_prefix: "adam"'
    )
    solver = Solver(sp, "solver.prototxt", synthetic=True, seed=4)
    solver.step(1)
    model, state = solver.snapshot()
    assert (model, state) == ("adam_iter_1.caffemodel", "adam_iter_1.solverstate")
    msg = _caffe_state(tmp_path / state)
    assert msg.iter == 1 and msg.learned_net == model
    order = [(5, 6), (5,), (3, 5), (3,)]
    assert [tuple(b.shape.dim) for b in msg.history] == order * 2
    # After one step from zero: m = (1 - b1) g and v = (1 - b2) g^2, so v / m^2 is
    # (1 - b2) / (1 - b1)^2 in Caffe's float32 constants, whatever g is: first m's, then v's.
    b1, b2 = np.float32(0.9), np.float32(0.999)
    ratio = (np.float32(1) - b2) / (np.float32(1) - b1) ** 2
    for m_blob, v_blob in zip(msg.history[:4], msg.history[4:], strict=True):
        m = np.asarray(m_blob.data, np.float64)
        v = np.asarray(v_blob.data, np.float64)
        used = np.abs(m) > 1e-6
        assert used.any()
        np.testing.assert_allclose(v[used] / m[used] ** 2, ratio, rtol=1e-4)

"""The training driver: Caffe's Solve loop, snapshots and resume, tests, logs, and the commands.

References are independent of the driver: Caffe's own resumed run (fixtures), an uninterrupted
run of the same seed, and NumPy forwards of the written weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import nincc
from nincc import caffe_pb2, onednn
from nincc.caffemodel import load_params, save_params
from nincc.errors import DataError, InputError, NinccError, SolverError
from nincc.loop import TRAIN_COMMANDS, Solver, add_train_parsers, resolve_solver
from nincc.metrics import Progress, curves, glog_logger, progress_text, read_metrics
from nincc.prototxt import load_solver
from nincc.snapshot import read_solverstate

from .conftest import REPO, fixture_case

h5py = pytest.importorskip("h5py")

GLOG = re.compile(r"^[IWEF]\d{4} \d{2}:\d{2}:\d{2}\.\d{6} +\d+ [\w.]+:\d+\] (.*)$")
NUM = r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|nan|inf)"

TINY_NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  include { phase: TRAIN } hdf5_data_param { source: "train_list.txt" batch_size: 4 } }
layer { name: "data" type: "HDF5Data" top: "data" top: "label"
  include { phase: TEST } hdf5_data_param { source: "test_list.txt" batch_size: 5 } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { lr_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: 0.1 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1"
  dropout_param { dropout_ratio: 0.3 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "accuracy"
  include { phase: TEST } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

TINY_SOLVER = """
net: "tiny.prototxt"
test_iter: 2
test_interval: 4
base_lr: 0.1
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 3
display: 2
average_loss: 3
max_iter: 8
snapshot: 4
snapshot_prefix: "snap/tiny"
random_seed: 7
"""

# A net fed by Input layers: trained with --synthetic (no files at all).
INPUT_NET = """
name: "inputs"
layer { name: "in" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 8 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  inner_product_param { num_output: 5 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "relu1" type: "ReLU" bottom: "ip1" top: "ip1" }
layer { name: "drop1" type: "Dropout" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


def _write_data(d: Path, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.standard_normal((16, 8)).astype(np.float32),
        "train_y": rng.integers(0, 3, 16).astype(np.float32),
        "test_x": rng.standard_normal((10, 8)).astype(np.float32),
        "test_y": rng.integers(0, 3, 10).astype(np.float32),
    }
    for split in ("train", "test"):
        with h5py.File(d / f"{split}.h5", "w") as f:
            f["data"] = arrays[f"{split}_x"]
            f["label"] = arrays[f"{split}_y"]
        (d / f"{split}_list.txt").write_text(f"{split}.h5\n")
    return arrays


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    """A directory holding the tiny net, its solver and HDF5 data; the working directory."""
    (tmp_path / "tiny.prototxt").write_text(TINY_NET)
    (tmp_path / "tiny_solver.prototxt").write_text(TINY_SOLVER)
    arrays = _write_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path, arrays


def cli(*argv) -> int:
    """The sub-commands as `nincc` runs them (one error line, exit status 1)."""
    ap = argparse.ArgumentParser(prog="nincc")
    add_train_parsers(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args([str(a) for a in argv])
    try:
        return TRAIN_COMMANDS[args.command][0](args)
    except NinccError as e:
        print(f"nincc: error: {e}", file=sys.stderr)
        return 1


RUNNER = (
    "import argparse, sys\n"
    "from nincc.loop import TRAIN_COMMANDS, add_train_parsers\n"
    "ap = argparse.ArgumentParser(prog='nincc')\n"
    "add_train_parsers(ap.add_subparsers(dest='command', required=True))\n"
    "args = ap.parse_args(sys.argv[1:])\n"
    "sys.exit(TRAIN_COMMANDS[args.command][0](args))\n"
)


def _messages(err: str) -> list[str]:
    out = []
    for line in err.splitlines():
        m = GLOG.match(line)
        assert m, f"not a glog-format line: {line!r}"
        out.append(m.group(1))
    return out


def _forward(params, x):
    """The tiny net in TEST phase, in NumPy: ip1, ReLU, (Dropout = identity), ip2."""
    h = np.maximum(x @ params["ip1"][0].T + params["ip1"][1], 0)
    return h @ params["ip2"][0].T + params["ip2"][1]


def _softmax_loss(scores, labels):
    z = scores - scores.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return -logp[np.arange(len(labels)), labels.astype(int)].mean()


def _accuracy(scores, labels):
    true = scores[np.arange(len(labels)), labels.astype(int)]
    return float(np.mean((scores >= true[:, None]).sum(axis=1) <= 1))


# ----------------------------------------------------------------------------- train end to end


def test_train_log_snapshots_tests_and_metrics(tiny, capsys):
    d, arrays = tiny
    assert cli("train", "tiny.prototxt", "--metrics", "m.jsonl") == 0
    msgs = _messages(capsys.readouterr().err)

    # Snapshots every 4 iterations and none at the end (8 is a multiple of 4).
    assert sorted(p.name for p in (d / "snap").iterdir()) == [
        "tiny_iter_4.caffemodel", "tiny_iter_4.solverstate",
        "tiny_iter_8.caffemodel", "tiny_iter_8.solverstate",
    ]
    # Caffe's display lines: every 2 iterations, lr after the outputs, final loss line.
    shown = [int(m.group(1)) for x in msgs if (m := re.match(r"Iteration (\d+) \(", x))]
    assert shown == [0, 2, 4, 6]
    for x in msgs:
        if x.startswith("Iteration ") and "iter/s" in x:
            assert re.fullmatch(rf"Iteration \d+ \({NUM} iter/s, {NUM}s/2 iters\), loss = {NUM}", x)
    lrs = [(int(m.group(1)), float(m.group(2))) for x in msgs
           if (m := re.fullmatch(rf"Iteration (\d+), lr = ({NUM})", x))]
    assert lrs == [(0, 0.1), (2, 0.1), (4, 0.05), (6, 0.025)]  # step: 0.1 * 0.5^(it // 3)
    train_out = [x for x in msgs if x.lstrip().startswith("Train net output")]
    assert len(train_out) == 4
    assert all(re.fullmatch(rf"    Train net output #0: loss = {NUM} \(\* 1 = {NUM} loss\)", x)
               for x in train_out)
    last = [x for x in msgs if x.startswith("Iteration")][-2:]  # Solve's final display, test
    assert re.fullmatch(rf"Iteration 8, loss = {NUM}", last[0])
    assert last[1] == "Iteration 8, Testing net (#0)"
    assert msgs[-1] == "Optimization Done."
    # Tests at 0 (test_initialization), 4 and 8; outputs sorted by blob name as Caffe's set.
    testing = [x for x in msgs if "Testing net" in x]
    assert testing == [f"Iteration {i}, Testing net (#0)" for i in (0, 4, 8)]
    test_out = [x for x in msgs if "Test net output" in x]
    assert len(test_out) == 6
    assert re.fullmatch(rf"    Test net output #0: accuracy = {NUM}", test_out[-2])
    loss_line = rf"    Test net output #1: loss = {NUM} \(\* 1 = {NUM} loss\)"
    assert re.fullmatch(loss_line, test_out[-1])

    records = [json.loads(x) for x in (d / "m.jsonl").read_text().splitlines()]
    train = [r for r in records if "test_net" not in r]
    assert [r["iter"] for r in train] == list(range(8))
    # The displayed loss is Caffe's smoothed loss: the mean of the last average_loss (3) losses.
    disp = {int(m.group(1)): float(m.group(2)) for x in msgs
            if (m := re.fullmatch(rf"Iteration (\d+) \(.*\), loss = ({NUM})", x))}
    raw = [r["loss"] for r in train]
    for it, value in disp.items():
        window = raw[max(0, it - 2): it + 1]
        assert value == pytest.approx(np.mean(window), rel=1e-5)

    # The last test round, against a NumPy forward of the iteration-8 weights over the 10 rows.
    params = load_params(d / "snap" / "tiny_iter_8.caffemodel")
    scores = _forward(params, arrays["test_x"])
    y = arrays["test_y"]
    acc = np.mean([_accuracy(scores[i:i + 5], y[i:i + 5]) for i in (0, 5)])
    loss = np.mean([_softmax_loss(scores[i:i + 5], y[i:i + 5]) for i in (0, 5)])
    last = [r for r in records if r.get("test_net") == 0][-1]
    assert last["iter"] == 8
    assert last["outputs"]["accuracy"] == pytest.approx(acc, abs=1e-6)
    assert last["outputs"]["loss"] == pytest.approx(loss, rel=1e-5)


def test_resume_equals_uninterrupted_run(tiny):
    d, _ = tiny
    sp = load_solver("tiny_solver.prototxt")
    full = Solver(sp, "tiny_solver.prototxt")
    full.solve()
    full.close()
    ref = {k: [np.asarray(a) for a in v] for k, v in full.params.items()}
    ref_state = read_solverstate("snap/tiny_iter_8.solverstate")
    shutil.move("snap/tiny_iter_8.caffemodel", "ref.caffemodel")
    os.remove("snap/tiny_iter_8.solverstate")

    # The 4-iteration snapshot is an epoch boundary (16 rows, batch 4), so the restarted data
    # layer reads what the uninterrupted run read; dropout keys follow the iteration.
    resumed = Solver(load_solver("tiny_solver.prototxt"), "tiny_solver.prototxt")
    resumed.solve(resume="snap/tiny_iter_4.solverstate")
    resumed.close()
    assert resumed.iter == 8
    for name, blobs in ref.items():
        for a, b in zip(blobs, resumed.params[name], strict=True):
            np.testing.assert_array_equal(a, np.asarray(b))
    state = read_solverstate("snap/tiny_iter_8.solverstate")
    assert (state.iter, state.current_step) == (ref_state.iter, ref_state.current_step) == (8, 2)
    for a, b in zip(ref_state.history, state.history, strict=True):
        np.testing.assert_array_equal(a, b)
    ours = load_params("snap/tiny_iter_8.caffemodel")
    theirs = load_params("ref.caffemodel")
    for name in theirs:
        for a, b in zip(ours[name], theirs[name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_max_iter_option_stops_early_with_snapshot(tiny, capsys):
    d, _ = tiny
    assert cli("train", "tiny_solver.prototxt", "--max-iter", "3") == 0
    assert (d / "snap" / "tiny_iter_3.solverstate").exists()
    assert read_solverstate(d / "snap" / "tiny_iter_3.solverstate").iter == 3
    assert "Optimization Done." in capsys.readouterr().err


# ----------------------------------------------------------------------------- Caffe's own resume


def _resume_case(case: str, state: str, tmp_path, monkeypatch):
    src = fixture_case(case)
    work = tmp_path / case
    shutil.copytree(src, work)
    for f in work.glob("snapshot_iter_12*"):
        f.unlink()
    monkeypatch.chdir(work)
    m = json.loads((work / "manifest.json").read_text())
    solver = Solver(load_solver("solver.prototxt"), "solver.prototxt")
    solver.restore(state)
    return src, work, m, solver


def _close(got, ref, rel):
    ref = np.asarray(ref, np.float64)
    scale = np.abs(ref).max()
    return np.all(np.abs(np.asarray(got, np.float64) - ref) <= rel * (scale if scale else 1e-30))


@pytest.mark.parametrize(
    "case, state",
    [
        ("solver_sgd", "snapshot_iter_6.solverstate"),
        ("solver_sgd_hdf5_snapshot", "snapshot_iter_6.solverstate.h5"),
    ],
)
def test_resume_from_caffe_snapshot_reproduces_caffe(case, state, tmp_path, monkeypatch):
    src, work, m, solver = _resume_case(case, state, tmp_path, monkeypatch)
    tol = m["tolerances"]
    assert solver.iter == 6
    # On XLA's kernels the step holds the 3x3 weights (kh, kw, in, out), and restore, params
    # and snapshot convert; oneDNN's read Caffe's layout (nincc.layout).
    assert bool(solver.trainer.layout) != onednn.enabled()
    with np.load(work / "resume_trajectory.npz") as z:
        ref = {k: z[k] for k in z.files}
    for k in range(7, 13):
        solver.step(1)
        assert solver.iter == k
        for key in ref:
            if key.startswith(f"iter{k}/"):
                layer, i = key[len(f"iter{k}/"):].rsplit("/", 1)
                got = np.asarray(solver.params[layer][int(i)])
                assert _close(got, ref[key], tol["trajectory_rel"]), key
    solver.snapshot()
    solver.close()
    hdf5 = case.endswith("hdf5_snapshot")
    ext = ".h5" if hdf5 else ""
    ours = read_solverstate(work / f"snapshot_iter_12.solverstate{ext}")
    theirs = read_solverstate(src / f"snapshot_iter_12.solverstate{ext}")
    assert (ours.iter, ours.current_step, ours.learned_net) == (
        theirs.iter, theirs.current_step, theirs.learned_net
    )
    assert len(ours.history) == len(theirs.history) == m["solverstate"]["history_blobs"]
    for a, b in zip(ours.history, theirs.history, strict=True):
        assert a.shape == b.shape
        assert _close(a, b, tol["trajectory_rel"])
    if not hdf5:  # the weights file: Caffe's layer definitions, the trajectory's values
        mine, caffes = caffe_pb2.NetParameter(), caffe_pb2.NetParameter()
        mine.ParseFromString((work / "snapshot_iter_12.caffemodel").read_bytes())
        caffes.ParseFromString((src / "snapshot_iter_12.caffemodel").read_bytes())
        for net in (mine, caffes):
            for layer in net.layer:
                layer.ClearField("blobs")
        assert mine == caffes


def test_resume_cli_losses_match_caffe(tmp_path, monkeypatch, capsys):
    src, work, m, solver = _resume_case("solver_sgd", "snapshot_iter_6.solverstate", tmp_path,
                                   monkeypatch)
    solver.close()
    assert cli("train", "solver.prototxt", "--snapshot", "snapshot_iter_6.solverstate",
               "--metrics", "m.jsonl") == 0
    records = [json.loads(x) for x in Path("m.jsonl").read_text().splitlines()]
    with np.load(work / "resume_trajectory.npz") as z:
        losses, lrs = z["loss"], z["lr"]
    assert [r["iter"] for r in records] == list(range(6, 12))
    for r, loss, lr in zip(records, losses, lrs, strict=True):
        assert r["loss"] == pytest.approx(float(loss), rel=m["tolerances"]["loss_rel"])
        assert r["lr"] == pytest.approx(float(lr), rel=m["tolerances"]["lr_rel"])
    err = capsys.readouterr().err
    assert "Restoring previous solver status from snapshot_iter_6.solverstate" in err
    assert (work / "snapshot_iter_12.caffemodel").exists()


# ----------------------------------------------------------------------------- failures


def test_nan_loss_stops_with_message_and_keeps_last_snapshot(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("n.prototxt").write_text(
        """layer { name: "in" type: "Input" top: "x" top: "t"
             input_param { shape { dim: 2 dim: 4 } shape { dim: 2 dim: 3 } } }
           layer { name: "ip" type: "InnerProduct" bottom: "x" top: "y"
             inner_product_param { num_output: 3 weight_filler { type: "gaussian" } } }
           layer { name: "loss" type: "EuclideanLoss" bottom: "y" bottom: "t" top: "loss" }"""
    )
    Path("n_solver.prototxt").write_text(
        'net: "n.prototxt" base_lr: 1e25 lr_policy: "fixed" max_iter: 10 snapshot: 1 '
        'snapshot_prefix: "s/n"'
    )
    assert cli("train", "n.prototxt", "--synthetic", "--seed", "3") == 1
    err = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"nincc: error: iteration \d+: the loss is (inf|nan); training diverged and stopped "
        r"\(last good snapshot: s/n_iter_\d+\.solverstate\); lower base_lr or check the data",
        err[-1],
    ), err[-1]
    stopped = int(re.search(r"iteration (\d+)", err[-1]).group(1))
    last = read_solverstate(f"s/n_iter_{stopped}.solverstate")
    assert last.iter == stopped
    assert all(np.isfinite(a).all() for v in load_params(last.learned_net).values() for a in v)
    assert not Path(f"s/n_iter_{stopped + 1}.solverstate").exists()


def test_unwritable_snapshot_dir_fails_before_training(tiny, capsys):
    d, _ = tiny
    (d / "blocker").write_text("a file where the snapshot directory should be")
    text = TINY_SOLVER.replace('"snap/tiny"', '"blocker/sub/tiny"')
    (d / "bad_solver.prototxt").write_text(text)
    assert cli("train", "bad_solver.prototxt", "--metrics", "m.jsonl") == 1
    err = capsys.readouterr().err
    assert "nincc: error: snapshot_prefix 'blocker/sub/tiny': cannot create directory" in err
    assert "Iteration" not in err
    assert (d / "m.jsonl").read_text() == ""


def test_solver_resolution(tiny, capsys):
    d, _ = tiny
    sp, path = resolve_solver("tiny.prototxt")
    assert path == "tiny_solver.prototxt" and sp.net == "tiny.prototxt"
    sp, path = resolve_solver("tiny_solver.prototxt")
    assert path == "tiny_solver.prototxt" and sp.net == "tiny.prototxt"
    (d / "other.prototxt").write_text(TINY_NET)
    with pytest.raises(SolverError, match=r"no solver for net other.prototxt: expected "
                                          r"other_solver.prototxt beside it; pass --solver"):
        resolve_solver("other.prototxt")
    sp, path = resolve_solver("other.prototxt", "tiny_solver.prototxt")
    assert sp.net == "other.prototxt"
    # A solver whose net path is relative to its own directory, run from elsewhere.
    (d / "sub").mkdir()
    (d / "sub" / "s.prototxt").write_text('net: "tiny.prototxt"')
    shutil.copy(d / "tiny.prototxt", d / "sub" / "tiny.prototxt")
    os.remove(d / "tiny.prototxt")
    assert cli("train", "sub/s.prototxt") == 1
    assert ("solver net 'tiny.prototxt' not found; it exists as sub/tiny.prototxt, but Caffe "
            "reads solver paths relative to the working directory: run from sub") in (
        capsys.readouterr().err
    )


def test_input_net_without_synthetic_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("i.prototxt").write_text(INPUT_NET)
    Path("i_solver.prototxt").write_text('net: "i.prototxt" lr_policy: "fixed" max_iter: 2')
    assert cli("train", "i.prototxt") == 1
    assert ("nothing feeds blob 'data' of layer 'in' (an input without a data source); use data "
            "layers (Data, HDF5Data, ImageData, ...) or --synthetic") in capsys.readouterr().err


def test_finetune_copies_layers_by_name(tiny, capsys):
    d, _ = tiny
    rng = np.random.default_rng(5)
    ip1 = [rng.standard_normal((6, 8)).astype(np.float32),
           rng.standard_normal(6).astype(np.float32)]
    save_params(d / "w.caffemodel", {"ip1": ip1, "unrelated": [np.ones(3, np.float32)]})
    sp = load_solver("tiny_solver.prototxt")
    solver = Solver(sp, "tiny_solver.prototxt")
    before = np.asarray(solver.params["ip2"][0]).copy()
    solver.copy_weights("w.caffemodel")
    np.testing.assert_array_equal(np.asarray(solver.params["ip1"][0]), ip1[0])
    np.testing.assert_array_equal(np.asarray(solver.params["ip1"][1]), ip1[1])
    np.testing.assert_array_equal(np.asarray(solver.params["ip2"][0]), before)
    np.testing.assert_array_equal(np.asarray(solver.test_params(0)["ip1"][0]), ip1[0])
    solver.close()
    save_params(d / "bad.caffemodel", {"ip1": [np.ones((5, 8), np.float32), ip1[1]]})
    assert cli("train", "tiny.prototxt", "--weights", "bad.caffemodel") == 1
    assert "layer 'ip1' blob 0" in capsys.readouterr().err
    assert cli("train", "tiny.prototxt", "--weights", "w.caffemodel", "--snapshot", "x") == 1
    assert "not both" in capsys.readouterr().err


# ----------------------------------------------------------------------------- signals and kill -9


def _spawn(cwd: Path, *argv) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *map(str, argv)], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.time() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended early: {proc.communicate()[1][-2000:]}")
        if time.time() > end:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.02)


KILL_SOLVER = """net: "i.prototxt" base_lr: 0.05 momentum: 0.9 lr_policy: "inv" gamma: 0.01
power: 0.75 max_iter: {max_iter} snapshot: 100 snapshot_prefix: "s/i" """


def test_kill_9_then_resume_gives_the_uninterrupted_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("i.prototxt").write_text(INPUT_NET)
    Path("i_solver.prototxt").write_text(KILL_SOLVER.format(max_iter=3000))
    proc = _spawn(tmp_path, "train", "i.prototxt", "--synthetic", "--seed", "11")
    _wait_for(tmp_path / "s" / "i_iter_300.solverstate", proc)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    states = sorted(Path("s").glob("i_iter_*.solverstate"),
                    key=lambda p: int(re.search(r"_iter_(\d+)", p.name).group(1)))
    last = states[-1]
    assert 300 <= read_solverstate(last).iter < 3000
    proc = _spawn(tmp_path, "train", "i.prototxt", "--synthetic", "--seed", "11",
                  "--snapshot", last)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    resumed = load_params("s/i_iter_3000.caffemodel")

    ref = Solver(load_solver("i_solver.prototxt"), "i_solver.prototxt", synthetic=True, seed=11)
    ref.sp.snapshot, ref.sp.snapshot_after_train = 0, False
    ref.solve()
    assert ref.iter == 3000
    for name, blobs in ref.params.items():
        for a, b in zip(blobs, resumed[name], strict=True):
            np.testing.assert_array_equal(np.asarray(a), b)


def test_sigterm_snapshots_and_stops(tmp_path):
    (tmp_path / "i.prototxt").write_text(INPUT_NET)
    (tmp_path / "i_solver.prototxt").write_text(KILL_SOLVER.format(max_iter=10**7))
    proc = _spawn(tmp_path, "train", "i.prototxt", "--synthetic", "--seed", "1")
    _wait_for(tmp_path / "s" / "i_iter_100.solverstate", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-2000:]
    msgs = _messages(err)
    assert msgs[-1] == "Optimization stopped early."
    pattern = r"Snapshotting solver state to binary proto file (s/i_iter_(\d+)\.solverstate)"
    snap = re.fullmatch(pattern, msgs[-2])
    assert snap, msgs[-3:]
    assert read_solverstate(tmp_path / snap.group(1)).iter == int(snap.group(2)) >= 100


# ----------------------------------------------------------------------------- test, time, plot


def test_test_command_matches_numpy(tiny, capsys):
    d, arrays = tiny
    rng = np.random.default_rng(2)
    params = {
        "ip1": [rng.standard_normal((6, 8)).astype(np.float32),
                rng.standard_normal(6).astype(np.float32)],
        "ip2": [rng.standard_normal((3, 6)).astype(np.float32),
                rng.standard_normal(3).astype(np.float32)],
    }
    save_params(d / "w.caffemodel", params)
    assert cli("test", "tiny.prototxt", "--weights", "w.caffemodel", "--iterations", "3") == 0
    msgs = _messages(capsys.readouterr().err)
    x, y = arrays["test_x"], arrays["test_y"]
    rows = [np.arange(i * 5, i * 5 + 5) % 10 for i in range(3)]  # batches wrap around the file
    batch = [x for x in msgs if x.startswith("Batch ")]
    assert len(batch) == 6
    for i, r in enumerate(rows):
        scores = _forward(params, x[r])
        acc = re.fullmatch(rf"Batch {i}, accuracy = ({NUM})", batch[2 * i])
        loss = re.fullmatch(rf"Batch {i}, loss = ({NUM})", batch[2 * i + 1])
        assert float(acc.group(1)) == pytest.approx(_accuracy(scores, y[r]), abs=1e-5)
        assert float(loss.group(1)) == pytest.approx(_softmax_loss(scores, y[r]), rel=1e-5)
    mean_loss = np.mean([_softmax_loss(_forward(params, x[r]), y[r]) for r in rows])
    mean_acc = np.mean([_accuracy(_forward(params, x[r]), y[r]) for r in rows])
    assert float(re.fullmatch(rf"Loss: ({NUM})", msgs[-3]).group(1)) == pytest.approx(
        mean_loss, rel=1e-5)
    assert float(re.fullmatch(rf"accuracy = ({NUM})", msgs[-2]).group(1)) == pytest.approx(
        mean_acc, abs=1e-5)
    m = re.fullmatch(rf"loss = ({NUM}) \(\* 1 = ({NUM}) loss\)", msgs[-1])
    assert float(m.group(1)) == pytest.approx(mean_loss, rel=1e-5)


def test_time_command_runs(tiny, capsys):
    assert cli("time", "tiny.prototxt", "--iterations", "2") == 0
    msgs = [x.strip() for x in _messages(capsys.readouterr().err)]
    assert msgs[0] == "*** Benchmark begins ***" and msgs[-1] == "*** Benchmark ends ***"
    tag = r"( \[fast, oneDNN\])?"  # InnerProduct on oneDNN's matmul, where installed
    for layer in ("data", "ip1", "relu1", "drop1", "ip2", "loss"):
        assert any(re.fullmatch(rf"{layer}\tforward: {NUM} ms\.{tag}", x) for x in msgs), layer
    assert any(re.fullmatch(rf"ip1\tbackward: {NUM} ms\.{tag}", x) for x in msgs)
    assert any(re.fullmatch(rf"Median Forward-Backward: {NUM} ms\.", x) for x in msgs)


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    m = tmp_path / "m.jsonl"
    lines = [{"iter": i, "loss": 2.0 / (i + 1), "lr": 0.1, "images_per_s": 10.0}
             for i in range(20)]
    lines += [{"iter": i, "test_net": 0, "outputs": {"accuracy": i / 20, "loss": 1.0}}
              for i in (0, 10)]
    m.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "c.png"
    assert cli("plot", m, "-o", out) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    m = tmp_path / "m.jsonl"
    m.write_text('{"iter": 0, "loss": 1.0}\n')
    assert cli("plot", m, "-o", tmp_path / "c.png") == 1
    assert "plotting needs matplotlib: pip install 'nincc[plot]'" in capsys.readouterr().err


def test_zoo_net_finds_its_solver():
    sp, path = resolve_solver(str(REPO / "zoo" / "nin_cifar10.prototxt"))
    assert path.endswith("zoo/nin_cifar10_solver.prototxt")
    assert sp.net == str(REPO / "zoo" / "nin_cifar10.prototxt")
    assert sp.max_iter == 120000 and sp.snapshot_prefix == "snapshots/nin_cifar10"




class _Tty:
    """A text stream that says it is a terminal."""

    def __init__(self):
        self.text = ""

    def isatty(self) -> bool:
        return True

    def write(self, s: str) -> None:
        self.text += s

    def flush(self) -> None:
        pass


def test_progress_line_on_a_terminal_only():
    assert progress_text(1200, 120000, 1.23456789, 0.1, 850.4, 3 * 3600 + 12 * 60) == (
        "iter 1200/120000 (1.0%)  loss 1.2346  lr 0.1  850 img/s  ETA 3h12m"
    )
    tty = _Tty()
    p = Progress(tty)
    log = glog_logger("nincc.test.progress", stream=tty, progress=p)
    p.show("iter 1/2")
    log.info("Iteration 1, lr = 0.1")
    assert tty.text.startswith("\r\033[Kiter 1/2\r\033[K")  # the log line erases it first
    assert GLOG.match(tty.text.split("\r\033[K")[-1].strip())
    quiet = Progress(io.StringIO())
    assert not quiet.enabled
    quiet.show("x")


def test_curves_of_a_resumed_run_keep_the_latest_values(tmp_path):
    m = tmp_path / "m.jsonl"
    recs = [{"iter": 0, "loss": 3.0}, {"iter": 1, "loss": 2.0}, {"iter": 1, "loss": 2.5},
            {"iter": 2, "test_net": 0, "outputs": {"accuracy": 0.5}}]
    m.write_text("".join(json.dumps(r) + "\n" for r in recs) + "\n")
    series = curves(read_metrics(m))
    assert series == {"train loss": ([0, 1], [3.0, 2.5]), "test#0 accuracy": ([2], [0.5])}
    m.write_text('{"iter": 0}\nnot json\n')
    with pytest.raises(InputError, match=r"m\.jsonl:2: not a JSON metrics record"):
        read_metrics(m)


SMALL_CONV = """
name: "small"
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "cccp" type: "Convolution" bottom: "conv" top: "cccp"
        convolution_param { num_output: 4 kernel_size: 1 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "cccp" top: "pool"
        pooling_param { pool: MAX kernel_size: 3 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 2 weight_filler { type: "xavier" } } }
"""


@pytest.mark.parametrize("reference", [False, True])
def test_time_marks_the_layers_the_fast_lowerings_run(tmp_path, capsys, reference):
    """Per-layer times come from the lowering the train step uses: the convolutions and the
    pooling run nincc.fast's, the InnerProduct too where oneDNN runs it, else the table's;
    none with the reference."""
    (tmp_path / "small.prototxt").write_text(SMALL_CONV)
    extra = ["--reference-lowerings"] if reference else []
    assert cli("time", tmp_path / "small.prototxt", "--iterations", "1", *extra) == 0
    msgs = [x.strip() for x in _messages(capsys.readouterr().err)]
    tagged = {m.split("\t")[0] for m in msgs if re.search(r"\[fast(, oneDNN)?\]$", m)}
    with_onednn = not reference and onednn.enabled()
    fast_layers = {"conv", "cccp", "pool"} | ({"ip"} if with_onednn else set())
    assert tagged == (set() if reference else fast_layers)
    if with_onednn:  # the layers oneDNN runs name their kernels
        on_onednn = {m.split("\t")[0] for m in msgs if m.endswith("[fast, oneDNN]")}
        assert on_onednn == fast_layers
    assert any(
        re.fullmatch(rf"conv\tbackward: {NUM} ms\.( \[fast(, oneDNN)?\])?", x) for x in msgs
    )
    assert any(re.fullmatch(rf"ip\tforward: {NUM} ms\.( \[fast, oneDNN\])?", x) for x in msgs)


def test_time_marks_a_backward_through_the_fft(tmp_path, capsys, xla_kernels):
    """A 5x5 convolution at the FFT's batch floor: its backward line says so."""
    from nincc import fftconv

    (tmp_path / "fft.prototxt").write_text(f"""
name: "fft"
input: "data" input_shape {{ dim: {fftconv.MIN_BATCH} dim: {fftconv.MIN_CHANNELS} dim: 8 dim: 8 }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param {{ num_output: 4 kernel_size: 5 pad: 2
                            weight_filler {{ type: "xavier" }} }} }}
""")
    assert cli("time", tmp_path / "fft.prototxt", "--iterations", "1") == 0
    msgs = [x.strip() for x in _messages(capsys.readouterr().err)]
    assert any(re.fullmatch(rf"conv\tforward: {NUM} ms\. \[fast\]", x) for x in msgs), msgs
    assert any(re.fullmatch(rf"conv\tbackward: {NUM} ms\. \[fast, FFT\]", x) for x in msgs)


def test_a_label_outside_the_classes_is_one_clear_error(tiny, capsys):
    """Caffe indexes with the label unchecked; under jit that would be a NaN loss, so the
    feeder names the label, its row and the layer instead."""
    d, arrays = tiny
    y = arrays["train_y"].copy()
    y[6] = 3.0  # ip2 has num_output 3: classes 0, 1, 2
    with h5py.File(d / "train.h5", "w") as f:
        f["data"] = arrays["train_x"]
        f["label"] = y
    assert cli("train", "tiny_solver.prototxt", "--no-progress") == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("nincc: error: the train net, batch 1: label 3 at row 2 of blob 'label'")
    assert "[0, 3)" in err and "'loss'" in err


def test_ignore_label_is_not_an_error():
    from nincc.loop import check_class_labels

    limits = {"label": (3, {255}, "loss")}
    check_class_labels({"label": np.array([0.0, 2.0, 255.0])}, limits, "net")
    with pytest.raises(DataError, match="label -1 at row 1"):
        check_class_labels({"label": np.array([0.0, -1.0])}, limits, "net")
    with pytest.raises(DataError, match="label 1.5 at row 0"):
        check_class_labels({"label": np.array([1.5])}, limits, "net")


SHARED_NET = """
name: "shared"
layer { name: "data" type: "Input" top: "data" top: "label"
  input_param { shape { dim: 4 dim: 6 } shape { dim: 4 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1"
  param { name: "w" } param { name: "b1" }
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2"
  param { name: "w" } param { name: "b2" }
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 }
    bias_filler { type: "constant" value: 0.5 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""


@pytest.mark.parametrize("fmt", ["BINARYPROTO", "HDF5"])
def test_snapshot_of_a_net_sharing_a_blob_before_its_own(tmp_path, fmt):
    """ip2 shares ip1's weight (its blob 0) and owns its bias (blob 1, the first it owns):
    the snapshot holds ip2's bias as ip2's blob 1 (and, in a binary proto, the shared weight
    again as blob 0, as Net::ToProto writes it; HDF5 keeps it under its owner only)."""
    (tmp_path / "net.prototxt").write_text(SHARED_NET)
    sp = load_solver(
        f'net: "{tmp_path / "net.prototxt"}" base_lr: 0.1 lr_policy: "fixed" max_iter: 2 '
        f'snapshot_prefix: "{tmp_path / "s"}" snapshot_format: {fmt} random_seed: 1'
    )
    solver = Solver(sp, synthetic=True, log=glog_logger())
    try:
        solver.step(2)
        model, _ = solver.snapshot()
        params = {k: [np.asarray(a) for a in v] for k, v in solver.params.items()}
    finally:
        solver.close()
    stored = load_params(model)
    assert sorted(params) == ["ip1", "ip2"] and len(params["ip2"]) == 1  # ip2 owns its bias only
    np.testing.assert_array_equal(stored["ip1"][0], params["ip1"][0])
    np.testing.assert_array_equal(stored["ip2"][1], params["ip2"][0])
    if fmt == "BINARYPROTO":
        np.testing.assert_array_equal(stored["ip2"][0], params["ip1"][0])
    else:
        assert stored["ip2"][0] is None


def test_diff_values_follow_caffes_blob_need_backward(tmp_path):
    """``caffe time`` backs a layer up only into bottoms that get a diff: not the input, not
    the tops of a frozen layer reading it, not across propagate_down: false."""
    from nincc.loop import diff_values

    net = tmp_path / "net.prototxt"
    net.write_text(
        """
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "frozen" type: "Convolution" bottom: "data" top: "frozen"
        param { lr_mult: 0 } param { lr_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 } }
layer { name: "relu0" type: "ReLU" bottom: "frozen" top: "frozen" }
layer { name: "conv" type: "Convolution" bottom: "frozen" top: "conv"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "relu1" type: "ReLU" bottom: "conv" top: "relu1" }
layer { name: "cut" type: "Pooling" bottom: "relu1" top: "cut" propagate_down: false
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "join" type: "Eltwise" bottom: "relu1" bottom: "relu1" top: "join" }
"""
    )
    graph = nincc.load_graph(net)
    got = {graph.value(v).producer for v in diff_values(graph)}
    assert got == {"conv", "relu1", "join"}
    forced = nincc.load_graph(net)
    forced = dataclasses.replace(forced, force_backward=True)
    assert {forced.value(v).producer for v in diff_values(forced)} == {
        layer.name for layer in forced.layers
    }


def test_time_times_a_layers_backward_alone(tmp_path, monkeypatch):
    """The per-layer backward runs from the residuals the forward saved: its program holds
    InnerProduct's two backward products and not the forward's (nor a constant top diff)."""
    import jax

    from nincc import loop

    (tmp_path / "net.prototxt").write_text(INPUT_NET)
    net = nincc.compile(nincc.load_graph(tmp_path / "net.prototxt", phase="TRAIN"), fast=False)
    timed = []

    def record(fn, args, iterations):
        timed.append((fn, args))
        return 1.0

    monkeypatch.setattr(loop, "_median_ms", record)
    t = loop.time_net(net, net.init(0), iterations=1)
    names = [name for name, *_ in t.layers]
    # forward, forward+backward, then per layer: forward, and backward where it has one
    per_layer = timed[2:]
    ip2 = names.index("ip2")
    index = sum(1 + (t.layers[i][2] is not None) for i in range(ip2))
    fwd, bwd = per_layer[index], per_layer[index + 1]
    assert str(jax.make_jaxpr(fwd[0])(*fwd[1])).count("dot_general") == 1
    program = str(jax.make_jaxpr(bwd[0])(*bwd[1]))
    assert program.count("dot_general") == 2  # dx and dW
    assert "broadcast_in_dim" not in program  # the ones top diff is an argument

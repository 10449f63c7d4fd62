"""Data-parallel training: several devices of one process and several processes on 127.0.0.1.

The reference is always a one-device run of the combined batch (the same prototxt with
``world x batch_size``) reading the same LMDB: N devices, each reading its own records by
Caffe's ``i % world`` rule, must reach the same params. Multi-device runs need XLA's
host-platform device count, which is read once per process, so they run in subprocesses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from nincc.caffemodel import load_params
from nincc.data.sources import DataSource, HDF5Source, ImageDataSource, MemorySource, Shard
from nincc.errors import InputError
from nincc.loop import Feeder, Solver, resolve_solver
from nincc.parallel import DistributedError, cluster_from, split_batch
from nincc.prototxt import parse_net_text

from .conftest import REPO

pytest.importorskip("lmdb")

RECORDS = 30  # fewer than the records a run reads: the sources wrap around
NET = """name: "small"
layer {{ name: "d" type: "Data" top: "data" top: "label" include {{ phase: TRAIN }}
  transform_param {{ scale: 0.00390625 }}
  data_param {{ source: "train_lmdb" batch_size: {batch} backend: LMDB }} }}
layer {{ name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param {{ num_output: 16 kernel_size: 3
    weight_filler {{ type: "gaussian" std: 0.3 }}
    bias_filler {{ type: "constant" value: 0.1 }} }} }}
{extra}
layer {{ name: "pool" type: "Pooling" bottom: "conv" top: "pool"
  pooling_param {{ pool: MAX kernel_size: 2 stride: 2 }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 0.3 }} }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""
BATCHNORM = 'layer { name: "bn" type: "BatchNorm" bottom: "conv" top: "conv" }'
# fused into the convolution, its backward left to the MAX pooling (nincc.compile's
# ReluFusion "pooling"), where the convolution runs on XLA inside a data-parallel step too;
# with it the convolution and the pooling hold their outputs blocked (nincc.blocked), on
# oneDNN alone and through XLA's channels-last kernels inside the data-parallel step
LEAKY_RELU = (
    'layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" '
    "relu_param { negative_slope: 0.5 } }"
)
SOLVER = """net: "{name}.prototxt"
base_lr: 0.1
momentum: 0.9
weight_decay: 0.001
lr_policy: "step"
gamma: 0.5
stepsize: 2
display: 1
max_iter: 3
snapshot: 0
snapshot_prefix: "snap/{name}"
random_seed: 5
iter_size: {iter_size}
"""
B = 3  # batch_size per device


def write_job(d: Path, batches: dict[str, int], iter_size: int = 2, extra: str = "") -> None:
    """An LMDB of RECORDS 1x8x8 digits-like records and one net + solver per name."""
    from nincc.data.convert import write_array_db

    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (RECORDS, 1, 8, 8)).astype(np.uint8)
    y = rng.integers(0, 3, RECORDS)
    write_array_db(str(d / "train_lmdb"), x, y, "lmdb", 8, True)
    for name, batch in batches.items():
        (d / f"{name}.prototxt").write_text(NET.format(batch=batch, extra=extra))
        (d / f"{name}_solver.prototxt").write_text(SOLVER.format(name=name, iter_size=iter_size))


def worker_env(tmp: Path, devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={devices}"
    ).strip()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["TMPDIR"] = str(tmp)  # where a supervisor keeps a failed worker's native log
    for k in ("NINCC_COORDINATOR", "NINCC_NUM_PROCESSES", "NINCC_PROCESS_ID"):
        env.pop(k, None)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nincc(cwd: Path, env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "nincc.cli", *args], cwd=cwd, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def job(dirs: list[Path], env: dict[str, str], *args: str) -> list[subprocess.Popen]:
    """One `nincc train` per directory, as processes 0..n-1 of one job on 127.0.0.1."""
    port = free_port()
    return [
        nincc(d, env, "train", *args, "--coordinator", f"127.0.0.1:{port}", "--num-processes",
              str(len(dirs)), "--process-id", str(i))
        for i, d in enumerate(dirs)
    ]


def finish(procs: list[subprocess.Popen], timeout: float = 90) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        out.append((p.returncode, err))
    return out


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("nincc:")]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for k in a for x, y in zip(a[k], b[k], strict=True)
    )


def quiet() -> logging.Logger:
    log = logging.getLogger("nincc.test.parallel")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    return log


# ============================================================================ data shards


def _whole_and_shards(make, world: int, count: int, batches: int) -> None:
    """Rank r's batch j is the whole stream's rows r, r + world, ... of its batch j; a process
    reading ``count`` ranks returns them rank by rank."""
    whole = make(Shard())
    parts = [make(Shard(f, count, world)) for f in range(0, world, count)]
    for _ in range(batches):
        ref = whole.next()
        got = [p.next() for p in parts]
        for blob, rows in ref.items():
            for f, g in zip(range(0, world, count), got, strict=True):
                for r in range(count):
                    mine = g[blob][r * B:(r + 1) * B]
                    np.testing.assert_array_equal(mine, rows[f + r::world])


def test_shards_read_the_combined_batch_by_caffes_rank_rule(tmp_path):
    """DataSource, HDF5Source and MemorySource, over wrap-arounds (RECORDS is not a multiple
    of the combined batch)."""
    h5py = pytest.importorskip("h5py")
    write_job(tmp_path, {})
    rng = np.random.default_rng(1)
    x = rng.standard_normal((RECORDS, 2)).astype(np.float32)
    y = np.arange(RECORDS, dtype=np.float32)
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["data"], f["label"] = x, y
    (tmp_path / "list.txt").write_text(f"{tmp_path / 'a.h5'}\n")

    def lmdb(shard):
        batch = B * (4 if shard.whole else 1)
        return DataSource("d", str(tmp_path / "train_lmdb"), "LMDB", batch,
                          ["data", "label"], shard=shard)

    def hdf5(shard):
        batch = B * (4 if shard.whole else 1)
        return HDF5Source("d", str(tmp_path / "list.txt"), ("data", "label"), batch,
                          shard=shard)

    def memory(shard):
        batch = B * (4 if shard.whole else 1)
        src = MemorySource("d", batch, (1, 1, 2), ["data", "label"], shard=shard)
        src.reset(np.resize(x, (24, 1, 1, 2)), np.resize(y, 24))  # rows: a multiple of 12
        return src

    from PIL import Image

    (tmp_path / "img").mkdir()
    lines = []
    for i in range(10):  # a pass every 10 records: reshuffled each time, alike on every rank
        Image.fromarray(np.full((2, 2, 3), 20 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"{i}.png {i}")
    (tmp_path / "images.txt").write_text("\n".join(lines) + "\n")

    def images(shard):
        batch = B * (4 if shard.whole else 1)
        return ImageDataSource("d", str(tmp_path / "images.txt"), batch, ["data", "label"],
                               str(tmp_path / "img") + "/", shuffle=True, seed=3, shard=shard)

    for make in (lmdb, hdf5, memory, images):
        _whole_and_shards(make, 4, 1, 6)
        _whole_and_shards(make, 4, 2, 6)


def test_synthetic_rows_come_from_one_generator_per_rank():
    from nincc import load_graph

    graph = load_graph(parse_net_text(NET.format(batch=B, extra="")), phase="TRAIN",
                       input_shapes={"data": (B, 1, 8, 8)})
    two = Feeder(graph, None, True, 9, "net", Shard(1, 2, 4)).next(5)
    ones = [Feeder(graph, None, True, 9, "net", Shard(r, 1, 4)).next(5) for r in (1, 2)]
    for blob, rows in two.items():
        np.testing.assert_array_equal(rows, np.concatenate([o[blob] for o in ones]))
    assert not np.array_equal(ones[0]["data"], ones[1]["data"])


def test_split_batch_divides_the_train_net_batch():
    net = parse_net_text(NET.format(batch=12, extra=""))
    assert split_batch(net, 4).layer[0].data_param.batch_size == 3
    with pytest.raises(InputError, match=r"layer 'd' has batch_size 12, not divisible by the 5"):
        split_batch(net, 5)


def test_cluster_from_flags_and_environment():
    assert cluster_from(environ={}) is None
    c = cluster_from(environ={"NINCC_COORDINATOR": "h:1", "NINCC_NUM_PROCESSES": "4",
                              "NINCC_PROCESS_ID": "3"})
    assert (c.coordinator, c.num_processes, c.process_id) == ("h:1", 4, 3)
    c = cluster_from("h:2", 2, 0, environ={"NINCC_COORDINATOR": "x:1"})
    assert (c.coordinator, c.num_processes, c.process_id) == ("h:2", 2, 0)
    assert cluster_from("auto", environ={}).auto
    for args, msg in [
        (("h", 2, 0), "HOST:PORT"),
        (("h:1", None, 0), "needs --num-processes"),
        (("h:1", 2, 2), r"in 0\.\.1"),
        ((None, 2, 0), "need --coordinator"),
    ]:
        with pytest.raises(DistributedError, match=msg):
            cluster_from(*args, environ={})


# ============================================================================ devices


DEVICES_SCRIPT = """
import contextlib, io, json, logging, os, sys
import numpy as np
from nincc.cli import main
from nincc.loop import Solver, resolve_solver
from nincc.parallel import DataParallel
log = logging.getLogger("quiet"); log.addHandler(logging.NullHandler()); log.propagate = False

def run(name, dp=None, iters=3):
    sp, path = resolve_solver(name + ".prototxt")
    s = Solver(sp, path, parallel=dp, log=log)
    s.step(iters)
    params = DataParallel.host(s.params) if dp is not None else s.params
    s.close()
    return {k: [np.asarray(a) for a in v] for k, v in params.items()}, s

out = {}
os.chdir(sys.argv[1])
for n in (1, 2, 4):
    ref, _ = run(f"x{n}")
    got, s = run("x1", DataParallel(n))
    out[n] = max(float(np.abs(a - b).max()) for k in ref for a, b in zip(ref[k], got[k]))
os.chdir(sys.argv[2])  # a BatchNorm net: statistics averaged, replicas stay identical
dp = DataParallel(4)
_, s = run("x1", dp, iters=2)
same = all(
    all(np.array_equal(np.asarray(a.addressable_shards[0].data), np.asarray(sh.data))
        for sh in a.addressable_shards)
    for v in s.params.values() for a in v
)
err = io.StringIO()
with contextlib.redirect_stderr(err):
    codes = [main(["train", "x1.prototxt", "--devices", "4", "--split-batch"]),
             main(["train", "x1.prototxt", "--devices", "5"])]
print(json.dumps({"diff": out, "bn_replicas_identical": same, "codes": codes,
                  "errors": err.getvalue().splitlines()}))
"""


def test_1_2_4_devices_equal_one_device_with_the_combined_batch(tmp_path):
    """Params after 3 iterations (iter_size 2, momentum, weight decay, a step in the rate) on
    1, 2 and 4 virtual devices with batch 3 each equal one device's with batch 3, 6, 12."""
    write_job(tmp_path / "plain", {f"x{n}": B * n for n in (1, 2, 4)}, extra=LEAKY_RELU)
    write_job(tmp_path / "bn", {"x1": B}, extra=BATCHNORM)
    r = subprocess.run(
        [sys.executable, "-c", DEVICES_SCRIPT, str(tmp_path / "plain"), str(tmp_path / "bn")],
        env=worker_env(tmp_path, 4), capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for n, diff in res["diff"].items():
        assert diff < 2e-6, (n, diff)
    assert res["bn_replicas_identical"]
    assert res["codes"] == [1, 1]
    assert res["errors"] == [
        "nincc: error: --split-batch: layer 'd' has batch_size 3, not divisible by the 4 "
        "devices of the job",
        "nincc: error: --devices 5: this machine has 4 cpu devices (on CPU, "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N before the start gives N virtual "
        "devices)",
    ]


def test_more_devices_than_exist_is_one_line(tmp_path, capsys, monkeypatch):
    from nincc.cli import main

    write_job(tmp_path, {"x1": B})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "x1.prototxt", "--devices", "2"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("nincc: error: --devices 2: this machine has 1 cpu device")
    assert "\n" not in err


def test_trainer_refuses_rows_that_do_not_fit_the_devices():
    """The Python API's form of a batch that does not divide: this process's rows must be its
    devices' batches (batch_size per device)."""
    import nincc
    from nincc.parallel import DataParallel
    from nincc.solver import SolverConfig

    graph = nincc.load_graph(parse_net_text(NET.format(batch=B, extra="")), phase="TRAIN",
                             input_shapes={"data": (B, 1, 8, 8)})
    net = nincc.compile(graph)
    dp = DataParallel(1)
    trainer = dp.trainer(net, SolverConfig(base_lr=0.1))
    params = dp.replicate(net.init(0))
    state = trainer.init(params)
    feeds = [{"data": np.zeros((B + 1, 1, 8, 8), np.float32), "label": np.zeros(B + 1)}]
    with pytest.raises(InputError, match=r"blob 'data': 4 rows of shape \[1, 8, 8\] given; "
                       r"this process's 1 device take 1 x 3 rows"):
        trainer.step(params, state, feeds)
    feeds = [{"data": np.zeros((B, 1, 8, 8), np.float32), "label": np.zeros(B)}]
    _, _, res = trainer.step(params, state, feeds)
    assert np.isfinite(res.loss)


# ============================================================================ processes


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    """Two 'hosts' (own working directories, own copy of the data) and a reference folder."""
    root = tmp_path_factory.mktemp("hosts")
    for name in ("host0", "host1"):
        write_job(root / name, {"x1": B})
    write_job(root / "ref", {"x2": 2 * B})
    return root


def _reference(ref: Path, stop: int, more: int) -> tuple[dict, dict]:
    """One device, the combined batch: train to ``stop``, snapshot, resume, ``more`` more."""
    cwd = os.getcwd()
    os.chdir(ref)
    try:
        sp, path = resolve_solver("x2.prototxt")
        s = Solver(sp, path, log=quiet())
        s.step(stop)
        s.check_snapshot_dir()
        s.snapshot()
        first = {k: [np.asarray(a) for a in v] for k, v in s.params.items()}
        s.close()
        s = Solver(sp, path, log=quiet())
        s.restore(f"snap/x2_iter_{stop}.solverstate")
        s.step(more)
        second = {k: [np.asarray(a) for a in v] for k, v in s.params.items()}
        s.close()
        return first, second
    finally:
        os.chdir(cwd)


def _wait_for(proc: subprocess.Popen, stream_lines: list[str], pattern: str, limit: float):
    """Read ``proc``'s stderr until a line matches (lines kept in ``stream_lines``)."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        stream_lines.append(line)
        if rx.search(line):
            return
    raise AssertionError(f"no line matching {pattern!r}: {''.join(stream_lines)[-2000:]}")


def test_two_processes_stop_together_snapshot_on_process_0_and_resume(hosts, tmp_path):
    """Two processes (one device each, own directories) against one device with batch 6:
    process 1 is sent SIGTERM; both stop after the same iteration K; only process 0 writes the
    snapshot, logs and metrics; both resume from process 0's snapshot and go on 2 iterations.
    Params at K and K + 2 equal the reference's."""
    h0, h1 = hosts / "host0", hosts / "host1"
    env = worker_env(tmp_path)
    p0, p1 = job([h0, h1], env, "x1.prototxt", "--max-iter", "100000", "--metrics", "m.jsonl")
    lines0: list[str] = []
    _wait_for(p0, lines0, r"Iteration 3 \(", 90)
    p1.send_signal(signal.SIGTERM)
    (c0, e0), (c1, e1) = finish([p0, p1])
    e0 = "".join(lines0) + e0
    assert (c0, c1) == (0, 0), e0[-2000:] + e1[-2000:]
    assert "Optimization stopped early." in e0
    assert e1 == ""  # process 1 reports nothing
    snaps = sorted((h0 / "snap").glob("x1_iter_*.solverstate"))
    assert len(snaps) == 1 and not (h1 / "snap").exists() and not (h1 / "m.jsonl").exists()
    k = int(re.search(r"_iter_(\d+)", snaps[0].name).group(1))
    assert k >= 4
    assert len((h0 / "m.jsonl").read_text().splitlines()) == k

    (c0, e0), (c1, e1) = finish(job(
        [h0, h1], env, "x1.prototxt", "--snapshot", str(snaps[0]), "--max-iter", str(k + 2)
    ))
    assert (c0, c1) == (0, 0), e0[-2000:] + e1[-2000:]
    assert f"Restoring previous solver status from {snaps[0]}" in e0
    ref_k, ref_k2 = _reference(hosts / "ref", k, 2)
    assert max_diff(load_params(str(h0 / f"snap/x1_iter_{k}.caffemodel")), ref_k) < 1e-5
    assert max_diff(load_params(str(h0 / f"snap/x1_iter_{k + 2}.caffemodel")), ref_k2) < 1e-5
    assert not (h1 / "snap").exists()


def test_processes_with_different_nets_stop_with_one_line(hosts, tmp_path):
    other = tmp_path / "other"
    write_job(other, {"x1": B + 1})
    results = finish(job([hosts / "host0", other], worker_env(tmp_path), "x1.prototxt"))
    for code, err in results:
        assert code == 1
        assert error_lines(err) == [
            "nincc: error: the processes disagree: process 1 started with other nets, solvers "
            "or options than process 0; start every process with the same files and options"
        ]


def test_unreachable_coordinator_times_out_with_one_line(hosts, tmp_path):
    env = worker_env(tmp_path)
    port0, port1 = free_port(), free_port()
    t0 = time.monotonic()
    alone = [  # process 1 without process 0; process 0 without process 1
        nincc(hosts / "host1", env, "train", "x1.prototxt", "--coordinator",
              f"127.0.0.1:{port1}", "--num-processes", "2", "--process-id", "1",
              "--init-timeout", "2"),
        nincc(hosts / "host0", env, "train", "x1.prototxt", "--coordinator",
              f"127.0.0.1:{port0}", "--num-processes", "2", "--process-id", "0",
              "--init-timeout", "2"),
    ]
    (c1, e1), (c0, e0) = finish(alone, timeout=60)
    assert time.monotonic() - t0 < 30
    assert c1 == 1 and error_lines(e1) == [
        f"nincc: error: process 1/2: cannot reach the coordinator at 127.0.0.1:{port1} within "
        "2 s (Connection refused); start process 0 with the same --coordinator, check the "
        "address and that the port is open (--init-timeout sets the wait)"
    ]
    assert c0 == 1 and error_lines(e0) == [
        "nincc: error: process 0/2: the job did not start: not all 2 processes joined the "
        f"coordinator at 127.0.0.1:{port0} within 2 s (start every process with the same "
        "--coordinator and --num-processes; --init-timeout sets the wait)"
    ]


@pytest.mark.parametrize("victim", [1, 0])
def test_a_killed_process_stops_the_other_with_one_line(hosts, tmp_path, victim):
    """SIGKILL to one process (its supervisor; the worker dies with it): the other exits
    non-zero within seconds, with one line saying why. Process 0 hosts the coordinator."""
    procs = job([hosts / "host0", hosts / "host1"], worker_env(tmp_path), "x1.prototxt",
                "--max-iter", "100000", "--heartbeat-timeout", "5")
    lines: list[str] = []
    _wait_for(procs[0], lines, r"Iteration 3 \(", 90)
    survivor = procs[1 - victim]
    procs[victim].kill()
    t0 = time.monotonic()
    (code, err), = finish([survivor], timeout=60)
    waited = time.monotonic() - t0
    procs[victim].wait()
    assert code == 1 and waited < 20, (code, waited)
    (line,) = error_lines(err)
    me = f"process {1 - victim}/2"
    # Whichever comes first: the failed all-reduce of the step, or (process 0 hosting the
    # coordinator) the runtime's news that the coordinator is gone.
    lost_peer = rf"nincc: error: {me}, iteration \d+: lost another process of the job \("
    lost_coordinator = rf"nincc: error: {me}: lost the coordinator at 127\.0\.0\.1:\d+ \("
    assert re.match(lost_peer, line) or (victim == 0 and re.match(lost_coordinator, line)), line


# ============================================================================ benchmark


def test_bench_parallel_quick(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_parallel.py"), "--quick", "--json", str(out)],
        cwd=REPO, env=worker_env(tmp_path), capture_output=True, text=True, timeout=240,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert [row["devices"] for row in res["rows"]] == [1, 2, 4]
    assert all(row["images_per_s"] > 0 for row in res["rows"])
    assert res["allreduce_bytes"] == 4 * res["params"]
    assert "devices" in r.stdout


def test_readme_documents_the_commands():
    text = (REPO / "README.md").read_text()
    for cmd in ("--devices all", "--coordinator host0:1234", "NINCC_COORDINATOR"):
        assert cmd in text
    assert "batch_size` in the prototxt is per device" in text

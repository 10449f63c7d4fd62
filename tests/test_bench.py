"""tools/bench.py runs end to end in its short CI mode (no assertion on speed), so it never rots."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from nincc import fftconv, onednn
from nincc.malloc import describe

from .conftest import REPO, load_tool

BENCH = REPO / "tools" / "bench.py"


def torch_installed() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_quick_mode_times_nincc_both_modes(quick_run):
    stdout, doc = quick_run
    rows = {(r["mode"], r["impl"]): r for r in doc["rows"]}
    for mode in ("infer", "train"):
        for impl in ("nincc", "nincc-plain"):
            r = rows[(mode, impl)]
            assert r["net"] == "nin_cifar10" and r["batch"] == 2
            assert r["images_s"] > 0 and r["gflops"] > 0 and r["compile_s"] >= 0, r
            assert r["max_rel_err"] <= 1e-4, r
            assert r["xla_mb"]["temp"] > 0, r
    assert all(v > 0 for v in doc["ceilings_gflops"].values())
    assert doc["environment"]["jax"]
    # the bench inherits this process's environment and does not re-execute
    assert doc["environment"]["malloc"] == describe(os.environ)
    assert doc["environment"]["fft"] == ("on" if fftconv.enabled() else "off")
    assert doc["environment"]["simd"] and "FFT: " in stdout
    assert "nincc-plain" in stdout and "img/s" in stdout


def test_quick_mode_pytorch_agrees_and_is_timed(quick_run):
    if not torch_installed():
        pytest.skip("PyTorch is not installed (pip install 'nincc[bench]')")
    _, doc = quick_run
    torch_rows = [r for r in doc["rows"] if r["impl"].startswith("torch-")]
    assert {r["impl"] for r in torch_rows} == {"torch-eager", "torch-channels_last"}
    for r in torch_rows:
        # the PyTorch translation of the graph computes what nincc computes, on the same weights
        assert r["note"] == "", r
        assert r["images_s"] > 0 and r["max_rel_err"] <= 1e-4, r
        if r["mode"] == "train":
            assert r["max_grad_err"] <= 1e-2, r
    assert any(r["peak_mb"] is not None for r in doc["rows"])


def test_unknown_lowering_is_rejected():
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--nincc", "fastest", "--no-memory"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown lowering 'fastest'" in proc.stderr


def test_input_bench_quick_mode_reads_lmdb_and_synthetic(tmp_path):
    """tools/bench_input.py: the train loop from an LMDB and from synthetic input, short mode."""
    out = tmp_path / "input.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_input.py"), "--quick", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["batch"] == 4 and doc["record"] == [3, 32, 32]
    assert set(doc["ms_per_iter"]) == {"lmdb", "synthetic"}
    assert all(len(v) == 2 and min(v) > 0 for v in doc["samples_ms"].values())
    assert doc["source_images_per_s"] > 0
    assert "lmdb / synthetic" in proc.stdout


def test_goal_column_takes_the_lower_bar():
    bench = load_tool("bench")
    assert bench.goal(1.25, 50.0) == "met"  # 1.2x the best PyTorch
    assert bench.goal(1.0, 86.0) == "met"  # 85 % of the ceiling, where 1.2x would be higher
    # short of both: the smaller speed-up needed, here 85/80 rather than 1.2/1.1
    assert bench.goal(1.1, 80.0) == "+6 %"
    assert bench.goal(0.5, 20.0) == "+140 %"
    assert bench.goal(None, 80.0) == "-"
    rows = [
        bench.Row("n", 16, "infer", "nincc", images_s=11.0, gflops=80.0, pct_ceiling=80.0),
        bench.Row("n", 16, "infer", "torch-eager", images_s=10.0, gflops=72.0, pct_ceiling=72.0),
    ]
    table = {r[3]: r for r in bench.table_rows(rows)}
    col = bench.COLUMNS.index("goal")
    assert table["nincc"][col] == "+6 %" and table["torch-eager"][col] == ""
    assert table["nincc"][bench.COLUMNS.index("vs best torch")] == "1.10x"


@pytest.mark.skipif(not onednn.available(), reason="oneDNN is not installed")
def test_kernel_bench_quick_mode_times_nincc_per_layer():
    """tools/bench_kernels.py: nincc's convolution per layer (PyTorch beside it where
    installed), short mode."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if "nin_imagenet conv2" in line]
    assert [r[3] for r in rows] == ["forward", "forward+backward"]
    for r in rows:
        ms, gfs = float(r[4]), float(r[6])
        assert ms > 0 and gfs > 0, r
        assert (float(r[5]) > 0) == torch_installed(), r  # PyTorch's column, or nan


@pytest.mark.skipif(not onednn.available(), reason="oneDNN is not installed")
def test_kernel_bench_lists_onednn_default_first():
    """tools/bench_kernels.py --impls: each direction's implementations, oneDNN's own choice
    (the one nincc runs) first and timed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "bench_kernels.py"), "--quick", "--impls"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    tool = load_tool("bench_kernels")
    name, _, size, c, o, k = tool.SHAPES[0]
    spec = onednn.spec_of((2, size, size, c), (o, c, k, k), True, (1, 1), ((k // 2,) * 2,) * 2)
    lines = {line.split(":", 1)[0]: line for line in proc.stdout.splitlines()}
    for direction in tool.DIRECTIONS:
        line = lines[f"{name} b2 {direction}"]
        first = line.split(": ", 1)[1].split("; ")[0]
        assert first.startswith(onednn.implementation(spec, direction) + " "), line
        assert "ms (" in first, line


def test_profile_step_charges_each_operation_to_its_kind():
    """tools/profile_step.py names a custom call by its target and an XLA loop by its
    instruction name; the runtime's own events are charged to nothing."""
    tool = load_tool("profile_step")
    hlo = (
        '  %ffi_call.7 = (f32[2,8]{1,0}, u8[1]{0}) custom-call(%p0, %p1), '
        'custom_call_target="nincc_onednn_fwd_2_8_8_3_16_3_3", api_version=API_VERSION_TYPED_FFI\n'
        '  %ffi_call.9 = f32[4]{0} custom-call(%p2), '
        'custom_call_target="nincc_onednn_maxpool_bwd_2"\n'
        '  %ffi_call.11 = f32[4]{0} custom-call(%p2), custom_call_target="something_else"\n'
        "  %negate_add_fusion.1 = f32[4]{0} fusion(%p3, %p4), kind=kLoop\n"
    )
    targets = tool.custom_call_targets(hlo)
    assert targets == {
        "ffi_call.7": "nincc_onednn_fwd_2_8_8_3_16_3_3",
        "ffi_call.9": "nincc_onednn_maxpool_bwd_2",
        "ffi_call.11": "something_else",
    }
    assert tool.kind_of("ffi_call.7", targets) == "oneDNN convolution"
    assert tool.kind_of("ffi_call.9", targets) == "oneDNN pooling"
    assert tool.kind_of("ffi_call.11", targets) == "other custom calls"
    for name in ("negate_add_fusion.1", "copy", "while.58", "shift-left_reduce_fusion"):
        assert tool.kind_of(name, targets) == "XLA loops", name
    for name in ("ThunkExecutor::Execute", "$train.py:151 step", "PjitFunction(_step_impl)",
                 "end: negate_add_fusion"):
        assert tool.kind_of(name, targets) is None, name


def test_profile_step_quick_mode_splits_a_train_step():
    """tools/profile_step.py --quick: a NIN CIFAR-10 train step at batch 2, traced once."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "profile_step.py"), "nin_cifar10", "--quick"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("nin_cifar10 b2 train: step "), lines[0]
    kinds = {}
    for line in lines[1:]:
        m = re.fullmatch(r"\s+(.+?)\s+([\d.]+) ms\s+([\d.]+) %", line)
        if m is None:
            break
        kinds[m.group(1)] = float(m.group(3))
    assert "XLA loops" in kinds
    if onednn.enabled():
        assert "oneDNN convolution" in kinds
    assert abs(sum(kinds.values()) - 100.0) < 0.5, kinds

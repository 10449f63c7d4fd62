"""`nincc export` and nincc.export.load_exported: the artefact runs without the prototxt and
gives the compiled net's outputs (and Caffe's), at a fixed or a symbolic batch size."""

from __future__ import annotations

import json
import shutil
import zipfile

import numpy as np
import pytest

import nincc
from nincc.errors import GraphError, InputError
from nincc.export import export_net, load_exported, write_export
from nincc.lowered import load_graph_at

from .conftest import fixture_case
from .test_inspect import npz_params, one_error_line, run

INPUT = 'layer { name: "in" type: "Input" top: "data" input_param { shape { dim: 2 dim: 6 } } }\n'


def _compiled_outputs(net_path, params, x: np.ndarray) -> dict[str, np.ndarray]:
    """The compiled net's outputs for data ``x``, built at x's batch size."""
    graph = load_graph_at(net_path, batch=x.shape[0])
    out = nincc.compile(graph).apply(params, {"data": x})
    return {graph.value(v).blob: np.asarray(out[graph.value(v).blob]) for v in graph.outputs}


def _close(got: np.ndarray, want: np.ndarray, rel: float) -> bool:
    return got.shape == want.shape and np.abs(got - want).max() <= rel * np.abs(want).max()


def test_export_runs_without_the_prototxt_like_the_compiled_net(capsys, tmp_path):
    case = fixture_case("nin_cifar10_deploy")
    net = tmp_path / "net.prototxt"
    shutil.copy(case / "net.prototxt", net)
    out = tmp_path / "nin.jaxexport"
    code, stdout, err = run(
        capsys, "export", net, "--weights", case / "weights.caffemodel", "-o", out
    )
    assert code == 0, err
    assert f"wrote {out}" in stdout
    net.unlink()  # the artefact must not need the net definition any more
    f = load_exported(out)
    with np.load(case / "inputs.npz") as d:
        x = d["data"]
    got = f({"data": x})
    assert list(got) == ["pool3"]
    params = npz_params(case / "params.npz")
    want = _compiled_outputs(case / "net.prototxt", params, x)
    assert _close(got["pool3"], want["pool3"], 1e-6)
    with np.load(case / "forward.npz") as ref:  # and real Caffe's output
        assert _close(got["pool3"], ref["pool3"], 1e-5)
    with zipfile.ZipFile(out) as z:
        meta = json.loads(z.read("meta.json"))
    assert meta["inputs"] == {"data": [2, 3, 32, 32]} and meta["batch"] == 2


def test_symbolic_batch_runs_any_batch_size(tmp_path):
    case = fixture_case("nin_cifar10_deploy")
    params = npz_params(case / "params.npz")
    program, stored, info = export_net(case / "net.prototxt", params=params, symbolic_batch=True)
    assert info.inputs == {"data": (None, 3, 32, 32)} and info.batch is None
    path = tmp_path / "nin.jaxexport"
    write_export(path, program, stored, info)
    f = load_exported(path)
    assert f.input_shapes == {"data": (None, 3, 32, 32)}
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        x = rng.standard_normal((batch, 3, 32, 32), dtype=np.float32)
        got = f({"data": x})
        want = _compiled_outputs(case / "net.prototxt", params, x)
        assert got.keys() == want.keys()
        for k in want:
            assert _close(got[k], want[k], 1e-5), (batch, k)


def test_export_cli_symbolic_and_fixed_batch(capsys, tmp_path):
    case = fixture_case("split_implicit")
    params = npz_params(case / "params.npz")
    out = tmp_path / "s.jaxexport"
    code, stdout, err = run(
        capsys,
        "export",
        case / "net.prototxt",
        "--weights",
        case / "params.npz",
        "-o",
        out,
        "--symbolic-batch",
    )
    assert code == 0, err
    assert "data Nx3x6x6" in stdout
    f = load_exported(out)
    x = np.random.default_rng(2).standard_normal((5, 3, 6, 6), dtype=np.float32)
    got = f({"data": x})
    want = _compiled_outputs(case / "net.prototxt", params, x)
    assert sorted(got) == sorted(want) == ["ip", "out_s2"]
    for k in want:
        assert _close(got[k], want[k], 1e-5)
    weights = ("--weights", case / "params.npz")
    code, _, err = run(capsys, "export", case / "net.prototxt", *weights, "-o", out, "--batch", "4")
    assert code == 0, err
    f = load_exported(out)
    assert f.input_shapes == {"data": (4, 3, 6, 6)}
    with pytest.raises(InputError, match=r"'data' has shape \[5, 3, 6, 6\].*\[4, 3, 6, 6\]"):
        f({"data": x})
    with pytest.raises(InputError, match="takes input blob"):
        f({"image": x[:4]})


# ---------------------------------------------------------------- bad input: one line each


def test_export_of_a_train_only_net_is_one_line(capsys, tmp_path):
    net = tmp_path / "train_only.prototxt"
    net.write_text(
        'name: "t"\n'
        'layer { name: "in" type: "Input" top: "data" include { phase: TRAIN }\n'
        "  input_param { shape { dim: 2 dim: 6 } } }\n"
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
        "  include { phase: TRAIN } inner_product_param { num_output: 3 } }\n"
    )
    code, _, err = run(capsys, "export", net, "-o", tmp_path / "x.jaxexport")
    assert code == 1
    line = one_error_line(err)
    assert "no layers in phase TEST" in line and str(net) in line
    assert not (tmp_path / "x.jaxexport").exists()


def test_export_of_a_loss_only_net_is_one_line(capsys, tmp_path):
    net = tmp_path / "loss.prototxt"
    net.write_text(
        'name: "l"\n'
        'layer { name: "in" type: "Input" top: "data" top: "label"\n'
        "  input_param { shape { dim: 2 dim: 6 } shape { dim: 2 } } }\n"
        'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"\n'
        "  inner_product_param { num_output: 3 } }\n"
        'layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }\n'
    )
    code, _, err = run(capsys, "export", net, "-o", tmp_path / "x.jaxexport")
    assert code == 1
    line = one_error_line(err)
    assert "only loss" in line and "'loss'" in line


def test_export_at_a_batch_the_reshape_cannot_take_is_one_line(capsys, tmp_path):
    net = tmp_path / "fixed.prototxt"
    net.write_text(
        'name: "f"\n' + INPUT + 'layer { name: "r" type: "Reshape" bottom: "data" top: "r"\n'
        "  reshape_param { shape { dim: 3 dim: 4 } } }\n"
    )
    code, _, err = run(capsys, "export", net, "-o", tmp_path / "x.jaxexport", "--batch", "3")
    assert code == 1
    line = one_error_line(err)
    assert "batch 3" in line and "'r'" in line
    code, _, err = run(capsys, "export", net, "-o", tmp_path / "x.jaxexport", "--symbolic-batch")
    assert code == 1
    assert "symbolic" in one_error_line(err)


def test_symbolic_batch_refuses_nets_whose_samples_interact(tmp_path):
    net = tmp_path / "mix.prototxt"
    net.write_text(
        'name: "m"\n' + INPUT + 'layer { name: "sm" type: "Softmax" bottom: "data" top: "sm"\n'
        "  softmax_param { axis: 0 } }\n"
    )
    with pytest.raises(GraphError, match="samples of a batch interact"):
        export_net(net, symbolic_batch=True)
    program, params, info = export_net(net, batch=2)  # a fixed batch is fine
    assert info.inputs == {"data": (2, 6)}


def test_loading_something_else_is_one_clear_error(tmp_path):
    bad = tmp_path / "bad.jaxexport"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a nincc export artefact"):
        load_exported(bad)

"""The `nincc` command: outputs users rely on, and one clean line for every bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nincc.cli import main

from .conftest import FIXTURES, REPO

ZOO = REPO / "zoo"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    "net, params",
    [("nin_cifar10", 966_986), ("nin_imagenet", 7_595_176)],
)
def test_inspect_json_zoo_totals(capsys, net, params):
    shape = {"nin_cifar10": "data=128,3,32,32", "nin_imagenet": "data=64,3,224,224"}[net]
    for name in (f"{net}_deploy.prototxt", f"{net}.prototxt"):
        code, out, err = run(
            capsys,
            "inspect",
            ZOO / name,
            "--format",
            "json",
            "--phase",
            "TRAIN",
            "--input-shape",
            shape,
        )
        assert code == 0, err
        doc = json.loads(out)
        assert doc["totals"]["params"] == params
        assert sum(layer["params"] for layer in doc["layers"]) == params
        first = doc["layers"][1]
        keys = {"name", "type", "bottoms", "tops", "top_shapes", "params", "flops", "lowering"}
        assert set(first) == keys


def test_inspect_table_and_dot(capsys):
    code, out, _ = run(capsys, "inspect", ZOO / "nin_imagenet_deploy.prototxt")
    assert code == 0
    assert "7,595,176" in out and "cccp8" in out or "7,595,176" in out
    code, out, _ = run(capsys, "inspect", ZOO / "nin_imagenet_deploy.prototxt", "--format", "dot")
    assert code == 0 and out.startswith("digraph")


def test_layers_lists_the_table(capsys):
    from nincc.layers import REGISTRY

    code, out, _ = run(capsys, "layers")
    assert code == 0
    listed = {line.split()[0] for line in out.splitlines()}
    assert listed == set(REGISTRY)


def test_run_saves_every_blob(capsys, tmp_path):
    case = FIXTURES / "nin_cifar10_deploy"
    if not case.is_dir():
        pytest.skip("fixtures not available")
    with np.load(case / "inputs.npz") as d:
        np.save(tmp_path / "x.npy", d["data"])
    out_file = tmp_path / "out.npz"
    code, _, err = run(
        capsys,
        "run",
        case / "net.prototxt",
        "--weights",
        case / "params.npz",
        "--input",
        f"data={tmp_path / 'x.npy'}",
        "--save",
        out_file,
    )
    assert code == 0, err
    with np.load(out_file) as got, np.load(case / "forward.npz") as ref:
        assert set(ref.files) <= set(got.files)
        scale = np.abs(ref["pool3"]).max()
        assert np.abs(got["pool3"] - ref["pool3"]).max() <= 1e-5 * scale
    code, _, _ = run(
        capsys,
        "run",
        case / "net.prototxt",
        "--weights",
        case / "params.npz",
        "--input",
        f"data={tmp_path / 'x.npy'}",
        "--save",
        out_file,
        "--blobs",
        "pool3,conv1",
    )
    with np.load(out_file) as got:
        assert sorted(got.files) == ["conv1", "pool3"]


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nincc: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_malformed_prototxt_names_file_line_col(capsys, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text('name: "x"\nlayer {\n  name: "a"\n  typo_field: 3\n}\n')
    code, _, err = run(capsys, "inspect", bad)
    assert code != 0
    line = _one_error_line(err)
    assert f"{bad}:4:" in line and "typo_field" in line


def test_unknown_layer_type_lists_supported(capsys, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text(
        'layer { name: "in" type: "Input" top: "x" input_param { shape { dim: 1 dim: 2 } } }\n'
        'layer { name: "mystery" type: "Frobnicate" bottom: "x" top: "y" }\n'
    )
    code, _, err = run(capsys, "inspect", bad)
    line = _one_error_line(err)
    assert code != 0 and "mystery" in line and "Frobnicate" in line and "Convolution" in line


@pytest.mark.parametrize(
    "body, words",
    [
        ('layer { name: "r" type: "ReLU" bottom: "nope" top: "y" }', ["'r'", "nope"]),
        (
            'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }\n'
            'layer { name: "s" type: "ReLU" bottom: "x" top: "y" }',
            ["'s'", "'y'", "'r'"],
        ),
        (
            'layer { name: "c" type: "Concat" bottom: "x" bottom: "z" top: "y" '
            "concat_param { axis: 1 } }",
            ["'c'"],
        ),
        (
            'layer { name: "p" type: "Pooling" bottom: "x" top: "y" '
            "pooling_param { kernel_size: 9 } }",
            ["'p'"],
        ),
    ],
)
def test_graph_errors_are_one_line(capsys, tmp_path, body, words):
    bad = tmp_path / "bad.prototxt"
    bad.write_text(
        'layer { name: "in" type: "Input" top: "x" top: "z" '
        "input_param { shape { dim: 1 dim: 2 dim: 4 dim: 4 } "
        "shape { dim: 1 dim: 2 dim: 3 dim: 4 } } }\n"
        + body
        + "\n"
    )
    code, _, err = run(capsys, "inspect", bad)
    line = _one_error_line(err)
    assert code != 0
    for w in words:
        assert w in line


def test_empty_phase_is_an_error(capsys, tmp_path):
    bad = tmp_path / "bad.prototxt"
    bad.write_text(
        'layer { name: "in" type: "Input" top: "x" include { phase: TRAIN } '
        "input_param { shape { dim: 1 } } }\n"
    )
    code, _, err = run(capsys, "inspect", bad, "--phase", "TEST")
    assert code != 0 and "no layers in phase TEST" in _one_error_line(err)


def test_wrong_input_shape_is_one_line(capsys, tmp_path):
    case = FIXTURES / "nin_cifar10_deploy"
    if not case.is_dir():
        pytest.skip("fixtures not available")
    np.save(tmp_path / "x.npy", np.zeros((1, 3, 8, 8), np.float32))
    code, _, err = run(
        capsys, "run", case / "net.prototxt", "--input", f"data={tmp_path / 'x.npy'}"
    )
    line = _one_error_line(err)
    assert code != 0 and "data" in line and "[1, 3, 8, 8]" in line


def test_upgrade_v1_writes_current_format(capsys, tmp_path):
    src = REPO.parent / "shared" / "corpus" / "nin_cifar10_train_val.prototxt"
    if not src.exists():
        pytest.skip("corpus not available")
    out = tmp_path / "new.prototxt"
    code, _, err = run(capsys, "upgrade", src, "-o", out)
    assert code == 0, err
    text = out.read_text()
    assert "layers {" not in text and 'type: "Convolution"' in text


def test_inspect_names_each_layers_lowering(monkeypatch):
    """The lowering column, on XLA's kernels: the FFT only in a TRAIN net at a batch the rule
    takes, and not with NINCC_FFT=0; the layer table's lowering where no fast one applies.
    With oneDNN, every convolution and pooling says so, in both phases, and the layers whose
    outputs the step holds in oneDNN's blocked layout name it."""
    import nincc
    from nincc import onednn, report

    monkeypatch.setenv(onednn.OPT_OUT, "0")

    def lowerings(phase, batch):
        shapes = {"data": (batch, 3, 32, 32)}
        if phase == "TRAIN":
            shapes["label"] = (batch,)
        net = "nin_cifar10.prototxt" if phase == "TRAIN" else "nin_cifar10_deploy.prototxt"
        graph = nincc.load_graph(ZOO / net, phase=phase, input_shapes=shapes)
        return {r.name: r.lowering for r in report.layer_rows(graph)}

    train = lowerings("TRAIN", 64)
    assert train["conv2"] == "fast, FFT"
    assert train["conv1"] == train["cccp1"] == train["pool1"] == "fast"
    assert train["loss"] == "table"
    assert lowerings("TRAIN", 16)["conv2"] == "fast"  # below the FFT's batch floor
    assert lowerings("TEST", 64)["conv2"] == "fast"  # inference keeps the direct convolution
    monkeypatch.setenv("NINCC_FFT", "0")
    assert lowerings("TRAIN", 64)["conv2"] == "fast"
    if onednn.available():
        monkeypatch.delenv(onednn.OPT_OUT)
        for phase in ("TRAIN", "TEST"):
            rows = lowerings(phase, 64)
            assert rows["conv2"] == rows["pool2"] == "fast, oneDNN"  # pool2: AVE, no padding
            # the stem, its 1x1 chain and pooling hold their outputs blocked (nincc.blocked)
            for name in ("conv1", "cccp1", "cccp2", "pool1"):
                assert rows[name] == "fast, oneDNN, nChw16c", name
        monkeypatch.setenv("NINCC_BLOCKED", "0")
        assert lowerings("TEST", 64)["cccp1"] == "fast, oneDNN"

"""`nincc inspect --lowered / --cost / --memory / --batch`: the phase programs keep Caffe's layer
names, compute Caffe's gradients, and the cost and memory figures match independent counts."""

from __future__ import annotations

import argparse
import json
import re
from unittest import mock

import jax
import numpy as np
import pytest

from nincc import load_graph
from nincc.lowered import (
    LEVELS,
    blob_memory,
    layer_costs,
    load_graph_at,
    phase_program,
    xla_memory,
)

from .conftest import REPO, fixture_case, manifest

ZOO = REPO / "zoo"


def main(argv) -> int:
    """nincc.cli.main with this feature's commands wired in (as cli.py does once it adds them)."""
    from nincc import cli, inspect_cli

    if "draw" in cli.COMMANDS:
        return cli.main(argv)
    original = cli.parser

    def parser() -> argparse.ArgumentParser:
        ap = original()
        sub = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction))
        inspect_cli.add_inspect_args(sub.choices["inspect"])
        inspect_cli.add_parsers(sub)
        return ap

    commands = {**inspect_cli.COMMANDS, "inspect": (inspect_cli.cmd_inspect, "")}
    with mock.patch.object(cli, "parser", parser), mock.patch.dict(cli.COMMANDS, commands):
        return cli.main(argv)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("nincc: error: ") and "Traceback" not in err
    return lines[0]


def npz_params(path) -> dict[str, list[np.ndarray]]:
    """Fixture params.npz ("<layer>/<i>" keys, split at the last '/') as a params pytree."""
    out: dict[str, dict[int, np.ndarray]] = {}
    with np.load(path) as d:
        for key in d.files:
            layer, _, i = key.rpartition("/")
            out.setdefault(layer, {})[int(i)] = d[key]
    return {k: [v[i] for i in sorted(v)] for k, v in out.items()}


# ---------------------------------------------------------------- --lowered


@pytest.mark.parametrize("level", LEVELS)
def test_lowered_program_names_every_conv_layer(capsys, level):
    case = fixture_case("split_implicit")
    code, out, err = run(capsys, "inspect", case / "net.prototxt", "--lowered", level)
    assert code == 0, err
    convs = [x["name"] for x in manifest("split_implicit")["layers"] if x["type"] == "Convolution"]
    assert convs == ["conv1", "conv2"]
    for name in convs:
        if level == "jaxpr":  # the name stack is printed beside each equation; a 1x1
            # convolution runs nincc.fast's lowering, a custom_vjp_call holding a product
            ops = ("conv_general_dilated", "custom_vjp_call", "dot_general")
            hits = [
                ln for ln in out.splitlines()
                if any(op in ln for op in ops) and f"[{name}]" in ln
            ]
        else:  # StableHLO locations and HLO op_name metadata carry the scope path (a 1x1
            # convolution is one product over channels)
            # (or, through oneDNN, the FFI call)
            hits = re.findall(rf"/{re.escape(name)}/(?:conv[a-z_]*|dot_general|ffi_call)", out)
        assert hits, f"{name} not found in the {level} text"


def test_lowered_train_program_is_loss_and_gradient(capsys):
    case = fixture_case("embed")
    code, out, err = run(
        capsys, "inspect", case / "net.prototxt", "--lowered", "hlo", "--phase", "TRAIN"
    )
    assert code == 0, err
    # forward and backward of each layer are in the program, under the layer's name
    for name in ("embed", "embed_nb", "loss1", "loss2"):
        assert f"/jvp({name})/" in out, name
    for name in ("embed", "embed_nb"):
        assert f"/transpose(jvp({name}))/" in out, name


def test_train_program_gradients_equal_caffe_param_diffs():
    """Phase TRAIN with a loss: (loss, grads) equal Caffe's loss and param diffs."""
    case = fixture_case("embed")
    graph = load_graph(case / "net.prototxt", phase="TRAIN")
    prog = phase_program(graph)
    params = npz_params(case / "params.npz")
    with np.load(case / "inputs.npz") as d:
        inputs = {k: d[k] for k in d.files}
    loss, grads = jax.jit(prog.fn)(params, inputs, jax.random.PRNGKey(0))
    with np.load(case / "forward.npz") as fwd, np.load(case / "backward.npz") as bwd:
        want_loss = float(fwd["loss1"]) * 1.0 + float(fwd["loss2"])
        assert abs(float(loss) - want_loss) <= 1e-5 * abs(want_loss)
        for layer, blobs in params.items():
            for i in range(len(blobs)):
                ref = bwd[f"param_diff/{layer}/{i}"]
                got = np.asarray(grads[layer][i])
                assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max(), (layer, i)


def test_train_program_without_loss_is_caffe_backward_from_top_diffs():
    """Phase TRAIN without a loss: the output diffs are arguments; grads are Caffe's."""
    case = fixture_case("split_implicit")
    graph = load_graph(case / "net.prototxt", phase="TRAIN")
    prog = phase_program(graph)
    params = npz_params(case / "params.npz")
    with np.load(case / "inputs.npz") as d:
        inputs = {k: d[k] for k in d.files}
    with np.load(case / "backward.npz") as bwd:
        tops = {
            b: bwd[f"topdiff/{b}"] for b in manifest("split_implicit")["backward"]["topdiff_blobs"]
        }
        assert sorted(tops) == sorted(prog.args[2])
        _, grads = jax.jit(prog.fn)(params, inputs, tops, jax.random.PRNGKey(0))
        for layer, blobs in params.items():
            for i in range(len(blobs)):
                ref = bwd[f"param_diff/{layer}/{i}"]
                assert np.abs(np.asarray(grads[layer][i]) - ref).max() <= 1e-4 * np.abs(ref).max()


# ---------------------------------------------------------------- --batch


def test_batch_sets_every_shape(capsys):
    net = ZOO / "nin_cifar10_deploy.prototxt"
    code, out, _ = run(capsys, "inspect", net, "--format", "json")
    assert code == 0
    base = json.loads(out)
    code, out, err = run(capsys, "inspect", net, "--format", "json", "--batch", "3")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["inputs"] == {"data": [3, 3, 32, 32]}
    for a, b in zip(base["layers"], doc["layers"]):
        for sa, sb in zip(a["top_shapes"], b["top_shapes"]):
            assert sb == [3, *sa[1:]] and sa[0] == 1


def test_batch_a_reshape_cannot_take_is_one_line(capsys, tmp_path):
    net = tmp_path / "fixed.prototxt"
    net.write_text(
        'name: "fixed"\n'
        'layer { name: "in" type: "Input" top: "x"\n'
        "  input_param { shape { dim: 2 dim: 3 dim: 4 } } }\n"
        'layer { name: "flat" type: "Reshape" bottom: "x" top: "y"\n'
        "  reshape_param { shape { dim: 2 dim: 12 } } }\n"
    )
    code, _, err = run(capsys, "inspect", net, "--batch", "2", "--format", "json")
    assert code == 0, err
    code, _, err = run(capsys, "inspect", net, "--batch", "3", "--lowered", "jaxpr")
    assert code == 1
    line = one_error_line(err)
    assert "batch 3" in line and "'flat'" in line and "Reshape" in line


# ---------------------------------------------------------------- --cost


def _valid_taps(size: int, kernel: int, pad: int, stride: int = 1) -> int:
    """Sum over output positions of the kernel taps that land inside the unpadded input."""
    out = (size + 2 * pad - kernel) // stride + 1
    return sum(
        sum(1 for k in range(kernel) if 0 <= o * stride - pad + k < size) for o in range(out)
    )


def test_cost_per_layer_matches_convolution_arithmetic():
    """XLA's count of a convolution compiled alone is the multiply-adds over taps inside the
    image, plus the bias adds; nincc counts full windows, and says padding is why they differ."""
    graph = load_graph(ZOO / "nin_cifar10_deploy.prototxt")
    rows = {r.name: r for r in layer_costs(graph)}
    # conv1: 3 -> 192 channels, 5x5 kernel, pad 2, on a 1x3x32x32 input
    full = 2 * 192 * 32 * 32 * 3 * 25 + 192 * 32 * 32
    inside = 2 * 192 * 3 * _valid_taps(32, 5, 2) ** 2 + 192 * 32 * 32
    assert rows["conv1"].flops == full
    assert rows["conv1"].xla_flops == inside < full
    assert rows["conv1"].reason == "padding"
    # cccp1: a 1x1 convolution has no padding: both counts agree
    assert rows["cccp1"].flops == rows["cccp1"].xla_flops == 2 * 160 * 192 * 32 * 32 + 160 * 32 * 32
    assert rows["cccp1"].reason == ""
    # dropout is the identity in TEST: XLA does no arithmetic
    assert rows["drop3"].xla_flops == 0 and rows["drop3"].reason == "identity"
    # bytes: a ReLU reads its bottom and writes its top once
    assert rows["relu1"].bytes == 2 * 4 * 192 * 32 * 32 == rows["relu1"].xla_bytes


def test_cost_cli_prints_layers_totals_and_reasons(capsys):
    case = fixture_case("split_implicit")
    code, out, err = run(capsys, "inspect", case / "net.prototxt", "--cost")
    assert code == 0, err
    layers = [x["name"] for x in manifest("split_implicit")["layers"] if "_split" not in x["name"]]
    lines = out.splitlines()
    for name in layers:
        assert any(line.split()[:1] == [name] for line in lines), name
    assert any(line.startswith("total") for line in lines)
    assert "whole TEST program" in out
    assert re.search(r"^\[1\] ", out, re.M)  # at least one difference is explained


# ---------------------------------------------------------------- --memory


def test_blob_memory_is_caffes_blob_list():
    """nincc's count equals the blobs real Caffe allocated (manifest) and params.npz's size."""
    case = fixture_case("nin_cifar10_deploy")
    m = manifest("nin_cifar10_deploy")
    graph = load_graph(case / "net.prototxt")
    mem = blob_memory(graph)
    caffe_blobs = sum(int(np.prod(shape)) for _, shape in m["blobs"])
    with np.load(case / "params.npz") as d:
        caffe_params = sum(d[k].size for k in d.files)
    assert mem.params == 4 * caffe_params
    assert mem.inputs + mem.activations == 4 * caffe_blobs
    assert mem.inputs == 4 * int(np.prod(m["inputs"]["data"]))


def test_xla_arguments_are_parameters_and_inputs():
    graph = load_graph_at(fixture_case("split_implicit") / "net.prototxt", batch=3)
    mem = blob_memory(graph)
    stats = xla_memory(graph)
    assert stats.argument_size_in_bytes == mem.params + mem.inputs
    assert mem.inputs == 4 * 3 * 3 * 6 * 6


def test_memory_cli_shows_inference_and_training(capsys):
    case = fixture_case("split_implicit")
    code, out, err = run(capsys, "inspect", case / "net.prototxt", "--memory", "--batch", "4")
    assert code == 0, err
    assert "memory at batch 4" in out
    assert "inference (TEST" in out and "training (TRAIN)" in out
    assert len(re.findall(r"^  activations.*temporaries", out, re.M)) == 2
    graph = load_graph_at(case / "net.prototxt", batch=4)
    inputs = blob_memory(graph).inputs
    assert inputs == 4 * 4 * 3 * 6 * 6
    from nincc.report import human

    assert re.search(rf"inputs\s+{re.escape(human(inputs, 'B', binary=True))}", out)


def test_lowering_a_net_with_data_dependent_shapes_is_one_line(capsys):
    case = fixture_case("reindex_filter")
    code, _, err = run(capsys, "inspect", case / "net.prototxt", "--lowered", "stablehlo")
    assert code == 1
    line = one_error_line(err)
    assert "'filter'" in line and "data-dependent" in line

"""`nincc draw`: layers as nodes, in-place layers folded, blob shapes on edges; pictures through
Graphviz where it is installed, DOT text with one note line where it is not."""

from __future__ import annotations

import html
import re
import shutil

import pytest

import nincc
from nincc.draw import to_dot

from .conftest import REPO, fixture_case, manifest
from .test_inspect import one_error_line, run

ZOO = REPO / "zoo"
DEPLOY = sorted(ZOO.glob("*_deploy.prototxt"))
NODE = re.compile(r'^  "([^"]+)" \[label=<(.*)>, fillcolor', re.M)
EDGE = re.compile(r'^  "([^"]+)" -> "([^"]+)" \[label="([^"]*)"\];', re.M)
needs_dot = pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz is not installed")


def test_dot_folds_inplace_layers_and_labels_edges_with_caffe_shapes():
    case = fixture_case("nin_cifar10_deploy")
    m = manifest("nin_cifar10_deploy")
    net = nincc.load_net_param(case / "net.prototxt")
    text = to_dot(nincc.load_graph(net), net)
    nodes = dict(NODE.findall(text))
    folded = {w: entry["writers"][0] for entry in m["inplace"] for w in entry["writers"][1:]}
    layers = [x["name"] for x in m["layers"]]
    assert set(nodes) == {n for n in layers if n not in folded}
    for layer, home in folded.items():
        assert f"+ {layer} (" in nodes[home]
    shapes = {name: "x".join(map(str, shape)) for name, shape in m["blobs"]}
    edges = EDGE.findall(text)
    inner = [(a, b, label) for a, b, label in edges if not b.startswith("output:")]
    assert len(inner) == len(nodes) - 1  # NIN is a chain
    for _, _, label in inner:
        blob, shape = label.split(" ")
        assert shapes[blob] == shape
    # the net output gets its own sink with the blob's shape
    sinks = [(a, label) for a, b, label in edges if b.startswith("output:")]
    assert sinks == [(m["outputs"][0], shapes[m["outputs"][0]])]


def test_dot_labels_show_settings_and_parameter_shapes():
    net = nincc.load_net_param(ZOO / "nin_cifar10_deploy.prototxt")
    nodes = dict(NODE.findall(to_dot(nincc.load_graph(net), net)))
    assert "num_output 192" in nodes["conv1"] and "kernel_size 5" in nodes["conv1"]
    assert "params 192x3x5x5 + 192" in nodes["conv1"]
    assert "pool MAX" in nodes["pool1"] and "dropout_ratio 0.5" in nodes["pool1"]


@needs_dot
@pytest.mark.parametrize("net", DEPLOY, ids=lambda p: p.stem)
def test_draw_zoo_nets_as_svg_and_png(capsys, tmp_path, net):
    graph = nincc.load_graph(net)
    svg = tmp_path / f"{net.stem}.svg"
    code, out, err = run(capsys, "draw", net, "-o", svg)
    assert code == 0, err
    assert out.strip() == f"wrote {svg}" and err == ""
    text = svg.read_text()
    assert "<svg" in text
    shown = {html.unescape(t) for t in re.findall(r"<text[^>]*>([^<]*)</text>", text)}
    for layer in graph.layers:  # every layer is drawn: as a node or folded into one
        folded = f"+ {layer.name} ({layer.type})"
        assert layer.name in shown or any(t.startswith(folded) for t in shown), layer.name
    png = tmp_path / f"{net.stem}.png"
    code, _, err = run(capsys, "draw", net, "-o", png, "--rankdir", "LR")
    assert code == 0, err
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_draw_without_graphviz_writes_dot_text_and_one_note(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "nin.svg"
    code, stdout, err = run(capsys, "draw", ZOO / "nin_cifar10_deploy.prototxt", "-o", out)
    assert code == 0
    assert not out.exists()
    dot = tmp_path / "nin.dot"
    assert dot.read_text().startswith('digraph "NIN_CIFAR10"')
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("nincc: note: Graphviz 'dot' is not installed")
    assert str(dot) in lines[0] and stdout == ""


def test_draw_dot_output_needs_no_graphviz(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "net.dot"
    code, _, err = run(capsys, "draw", ZOO / "nin_imagenet_deploy.prototxt", "-o", out)
    assert code == 0 and err == ""
    net = nincc.load_net_param(ZOO / "nin_imagenet_deploy.prototxt")
    assert out.read_text() == to_dot(nincc.load_graph(net), net)


def test_draw_when_dot_fails_falls_back_with_one_note(capsys, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "dot"
    fake.write_text("#!/bin/sh\necho 'Error: renderer crashed' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    out = tmp_path / "n.png"
    code, _, err = run(capsys, "draw", ZOO / "nin_cifar10_deploy.prototxt", "-o", out)
    assert code == 0 and not out.exists()
    assert (tmp_path / "n.dot").exists()
    lines = err.splitlines()
    assert len(lines) == 1 and "renderer crashed" in lines[0]


def test_draw_unknown_picture_format_is_one_line(capsys, tmp_path):
    code, _, err = run(
        capsys, "draw", ZOO / "nin_cifar10_deploy.prototxt", "-o", tmp_path / "x.txt"
    )
    assert code == 1
    line = one_error_line(err)
    assert "'.txt'" in line and ".svg" in line

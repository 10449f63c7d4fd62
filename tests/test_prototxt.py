"""Prototxt parsing errors (path:line:col), loading from paths or text, and Caffe-style printing."""

from __future__ import annotations

import struct

import pytest

from nincc import caffe_pb2
from nincc.errors import PrototxtError
from nincc.prototxt import (
    load_net,
    load_solver,
    parse_net_text,
    parse_solver_text,
    to_text,
)

from .conftest import CORPUS, fixture_case

CORPUS_FILES = sorted(CORPUS.glob("*.prototxt"))


def _error(text: str, path: str = "net.prototxt") -> PrototxtError:
    with pytest.raises(PrototxtError) as info:
        parse_net_text(text, path)
    return info.value


# ----------------------------------------------------------------------------- errors


def test_unknown_field_names_path_line_col_and_suggests():
    err = _error('name: "n"\nlayer {\n  name: "c"\n  bottm: "x"\n}\n')
    assert (err.path, err.line, err.col) == ("net.prototxt", 4, 3)
    assert str(err).startswith("net.prototxt:4:3: ")
    assert '"caffe.LayerParameter" has no field named "bottm"' in str(err)
    assert "did you mean: bottom" in str(err)


def test_bad_enum_value_lists_allowed_values():
    text = 'layer {\n  name: "p"\n  type: "Pooling"\n  pooling_param { pool: MAXX }\n}\n'
    err = _error(text)
    assert (err.line, err.col) == (4, 25)
    assert "PoolMethod" in str(err) and "MAXX" in str(err)
    assert "(allowed: MAX, AVE, STOCHASTIC)" in str(err)
    # protobuf's echo of the source line is not repeated in the message.
    assert "pooling_param { pool: MAXX }'" not in str(err)


def test_missing_closing_brace():
    err = _error('layer {\n  name: "a"\n  type: "ReLU"\n')
    assert err.line == 3 and 'Expected "}"' in str(err)


def test_extra_closing_brace():
    err = _error('layer {\n  name: "a"\n}\n}\n')
    assert (err.line, err.col) == (4, 1)
    assert "got }" in str(err)


def test_repeated_singular_field_is_an_error():
    err = _error('name: "a"\nname: "b"\n')
    assert err.line == 2 and '"name"' in str(err)


def test_wrong_value_type():
    err = _error('layer { name: "c" convolution_param { num_output: "many" } }')
    assert (err.line, err.col) == (1, 51) and 'integer: "many"' in str(err)


def test_solver_error_names_the_file(tmp_path):
    path = tmp_path / "solver.prototxt"
    path.write_text('base_lr: 0.1\nlr_policy: "step"\nmomentun: 0.9\n')
    with pytest.raises(PrototxtError, match=r"solver\.prototxt:3:1: .*momentun.*momentum"):
        load_solver(path)


def test_missing_file_is_a_clear_error(tmp_path):
    missing = tmp_path / "nope.prototxt"
    with pytest.raises(PrototxtError, match=r"nope\.prototxt: no such file"):
        load_net(missing)
    with pytest.raises(PrototxtError, match="no such file"):
        load_net(str(missing))
    with pytest.raises(PrototxtError, match="directory"):
        load_net(tmp_path)


# ----------------------------------------------------------------------------- accepted syntax


def test_caffe_text_syntax_variants():
    net = parse_net_text(
        """
        # comment
        name: 'single quoted'
        layer { name: "d" type: "Data" top: "x" include: { phase: TRAIN } }  # colon before brace
        layers { layer { blobs_lr: 1. } }
        layer { name: "p" type: "Pooling" pooling_param { pool: 1 } }
        """
    )
    assert net.name == "single quoted"
    assert net.layer[0].include[0].phase == caffe_pb2.TRAIN
    assert net.layers[0].layer.blobs_lr[0] == 1.0
    assert net.layer[1].pooling_param.pool == caffe_pb2.PoolingParameter.AVE


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_corpus_files_load(path):
    if "solver" in path.name:
        solver = load_solver(path)
        assert not solver.HasField("solver_type")
    else:
        net = load_net(path)
        assert len(net.layers) == 0 and len(net.input) == 0 and len(net.layer) > 0


def test_load_net_accepts_text_path_and_str_path():
    path = fixture_case("v0_upgrade") / "net.prototxt"
    from_path = load_net(path)
    assert load_net(str(path)) == from_path
    assert load_net(path.read_text()) == from_path
    assert from_path.layer[0].type == "Input"


def test_load_net_returns_current_format_and_cccp_flag():
    text = 'layer { name: "c" type: "CCCP" convolution_param { num_output: 2 kernel_size: 1 } }'
    assert load_net(text).layer[0].type == "CCCP"
    assert load_net(text, cccp=True).layer[0].type == "Convolution"


# ----------------------------------------------------------------------------- printing


def _c_shortest_float(x: float) -> str:
    """C's %.6g if it reads back as the same float32, else %.9g (protobuf's SimpleFtoa)."""
    short = format(x, ".6g")
    same = struct.unpack("<f", struct.pack("<f", float(short)))[0] == x
    return short if same else format(x, ".9g")


@pytest.mark.parametrize("value", [1.0, 0.95, 1e-6, 0.1, 1234567.0, 3e38, 0.00390625, -2.5, 1e20])
def test_floats_print_like_caffe(value):
    solver = caffe_pb2.SolverParameter(base_lr=value)
    stored = solver.base_lr
    assert to_text(solver) == f"base_lr: {_c_shortest_float(stored)}\n"
    assert parse_solver_text(to_text(solver)).base_lr == stored


def test_to_text_layout_escapes_and_round_trip():
    net = parse_net_text(
        'name: "q\\"uote\\n"\nforce_backward: true\n'
        'layer { name: "p" type: "Pooling" pooling_param { pool: AVE kernel_size: 3 } }'
    )
    assert to_text(net) == (
        'name: "q\\"uote\\n"\n'
        "force_backward: true\n"
        "layer {\n"
        '  name: "p"\n'
        '  type: "Pooling"\n'
        "  pooling_param {\n"
        "    pool: AVE\n"
        "    kernel_size: 3\n"
        "  }\n"
        "}\n"
    )
    assert parse_net_text(to_text(net)) == net


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.name)
def test_to_text_round_trips_corpus(path):
    parse = parse_solver_text if "solver" in path.name else parse_net_text
    msg = parse(path.read_text())
    assert parse(to_text(msg)) == msg

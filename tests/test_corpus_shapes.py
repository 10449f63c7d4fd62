"""Every corpus net builds with the blobs, layers and param shapes Caffe produced."""

from __future__ import annotations

import json

import pytest

import nincc
from nincc import report

from .conftest import CORPUS, FIXTURES

SHAPES = FIXTURES / "shapes_corpus"


def _cases() -> list[str]:
    return sorted(p.name for p in SHAPES.glob("*.shapes.json")) if SHAPES.is_dir() else []


def _substituted_shapes(spec: dict) -> dict[str, list[int]]:
    """The shapes Caffe gave the data layers it replaced by Input layers, for this phase."""
    shapes: dict[str, list[int]] = {}
    for sub in spec["substitutions"]:
        rules = " ".join(sub.get("rules", []))
        if "phase" in rules and f"phase: {spec['phase']}" not in rules:
            continue
        shapes.update(sub["tops"])
    return shapes


@pytest.mark.parametrize("name", _cases())
def test_corpus_net_shapes(name):
    spec = json.loads((SHAPES / name).read_text())
    source = CORPUS / spec["corpus_file"]
    subs = _substituted_shapes(spec)
    kinds = {layer["type"] for layer in spec["layers"]}
    if "Python" in kinds:
        with pytest.raises(nincc.UnsupportedLayerError, match="Python"):
            nincc.load_graph(source, phase=spec["phase"], stages=spec["stages"])
        return
    graph = nincc.load_graph(
        source, phase=spec["phase"], stages=spec["stages"], input_shapes=subs, insert_splits=True
    )
    ours: list = []  # Caffe's blobs: in-place writes reuse the blob, so each name once
    for v in graph.values:
        if v.blob not in [b for b, _ in ours]:
            ours.append([v.blob, list(v.shape)])
    assert ours == spec["blobs"]
    substituted = {s["layer"] for s in spec["substitutions"]}
    for layer, ref in zip(graph.layers, spec["layers"], strict=True):
        assert layer.name == ref["name"]
        if layer.name not in substituted:
            assert layer.type == ref["type"]
        assert [graph.value(b).blob for b in layer.bottoms] == ref["bottoms"]
        assert [graph.value(t).blob for t in layer.tops] == ref["tops"]
        assert [list(p.shape) for p in layer.params] == ref["param_shapes"]
    assert sorted(graph.value(v).blob for v in graph.outputs) == sorted(spec["outputs"])
    # `nincc inspect`'s rows, the lowering each layer compiles to included, for every net
    allowed = {"fast", "table", "fast, FFT", "fast, oneDNN", "fast, oneDNN, nChw16c"}
    allowed |= {f"fast, FFT, {t}x{t} tiles" for t in range(2, 9)}
    assert {r.lowering for r in report.layer_rows(graph)} <= allowed

"""Data sources against real Caffe: the batches of 5 consecutive forwards of each fixture net."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import nincc
from nincc.data import read_blob_proto, sources_for
from nincc.data.convert import compute_mean

from ..conftest import fixture_case

DB_CASES = [
    (case, net)
    for case in ("data_lmdb", "data_leveldb")
    for net in ("net.prototxt", "net_mean_value.prototxt", "net_plain.prototxt")
]


def _close(name: str, got: np.ndarray, ref: np.ndarray, rel: float) -> None:
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    scale = float(np.abs(ref).max())
    bound = rel * scale if scale else 0.0
    err = float(np.abs(got.astype(np.float64) - ref).max())
    assert err <= bound, f"{name}: max error {err} > {bound}"


def _run(case: str, net: str, spec: dict, forward_file: str, rel: float):
    shapes = {b: tuple(s) for b, s in spec["blobs"]}
    net_param = nincc.load_net_param(net)
    graph = nincc.build_graph(net_param, phase="TEST", input_shapes=shapes)
    (source,) = sources_for(graph, net_param)
    try:
        with np.load(forward_file) as ref:
            for k in range(1, 6):
                batch = source.next()
                assert set(batch) == set(shapes)
                for blob in shapes:
                    _close(f"{case}/{net} step{k}/{blob}", batch[blob], ref[f"step{k}/{blob}"], rel)
    finally:
        source.close()


@pytest.mark.parametrize("case,net", DB_CASES)
def test_data_layer_matches_caffe(case, net, monkeypatch):
    path = fixture_case(case)
    m = json.loads((path / "manifest.json").read_text())
    monkeypatch.chdir(path)
    spec = m["nets"][net]
    _run(case, net, spec, spec["forward_file"], m["tolerances"]["forward_rel"])


def test_hdf5_data_matches_caffe(monkeypatch):
    path = fixture_case("data_hdf5")
    m = json.loads((path / "manifest.json").read_text())
    monkeypatch.chdir(path)
    _run("data_hdf5", "net.prototxt", m, "forward.npz", m["tolerances"]["forward_rel"])


def test_leveldb_read_leaves_database_untouched(monkeypatch):
    path = fixture_case("data_leveldb")
    db = path / "db_leveldb"
    before = {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(db)}
    test_data_layer_matches_caffe("data_leveldb", "net_plain.prototxt", monkeypatch)
    after = {e.name: (e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(db)}
    assert after == before


@pytest.mark.parametrize("case,backend", [("data_lmdb", "lmdb"), ("data_leveldb", "leveldb")])
def test_mean_file_and_compute_mean(case, backend):
    path = fixture_case(case)
    with np.load(path / "mean.npz") as z:
        ref = z[z.files[0]]
    mean = read_blob_proto(path / "mean.binaryproto")
    assert mean.shape == (1, 3, 36, 36)
    np.testing.assert_array_equal(mean.reshape(ref.shape), ref)
    computed, count = compute_mean(str(path / f"db_{backend}"), backend)
    assert count == 16
    np.testing.assert_array_equal(computed.reshape(ref.shape), ref)
    with np.load(path / "records.npz") as r:
        naive = r["data"].astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(computed[0], naive, rtol=1e-6)

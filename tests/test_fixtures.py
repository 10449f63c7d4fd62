"""Every real-Caffe fixture case with a net: nincc's blobs, diffs and param diffs equal Caffe's."""

from __future__ import annotations

import json

import pytest

from .conftest import FIXTURES
from .fixture_harness import run_case


def _net_cases() -> list[str]:
    if not FIXTURES.is_dir():
        return []
    out = []
    for case in sorted(p for p in FIXTURES.iterdir() if (p / "forward.npz").exists()):
        m = json.loads((case / "manifest.json").read_text())
        if "layers" not in m or any(layer["type"] in ("Data", "HDF5Data") for layer in m["layers"]):
            continue  # data layers read databases: the data tests cover them
        out.append(case.name)
    return out


@pytest.mark.parametrize("case", _net_cases())
def test_fixture_case(case, monkeypatch):
    path = FIXTURES / case
    monkeypatch.chdir(path)  # Caffe resolves relative sources against the working directory
    problems = run_case(path)
    assert not problems, "\n".join(problems[:20])

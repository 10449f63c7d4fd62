"""Shared test setup: strict rank promotion, 64-bit off, paths to the shared Caffe fixtures."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("NINCC_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "caffe"
CORPUS = SHARED / "corpus"
TOOLS = REPO / "tools"


def load_tool(name: str):
    """tools/<name>.py as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while it executes
    spec.loader.exec_module(mod)
    return mod


def fixture_case(name: str) -> Path:
    """The directory of one real-Caffe fixture case; skips the test if ../shared is absent."""
    path = FIXTURES / name
    if not path.is_dir():
        pytest.skip(f"fixture {name} not found under {FIXTURES}")
    return path


def manifest(name: str) -> dict:
    return json.loads((fixture_case(name) / "manifest.json").read_text())


@pytest.fixture(params=["xla", "onednn"])
def kernels(request, monkeypatch):
    """Run the test with each kernel backend of nincc.fast's convolutions and MAX pooling:
    XLA's (NINCC_ONEDNN=0) and oneDNN's (skipped where the library is not installed)."""
    from nincc import onednn

    if request.param == "onednn":
        if not onednn.available():
            pytest.skip("oneDNN is not installed (pip install 'nincc[onednn]')")
        monkeypatch.delenv(onednn.OPT_OUT, raising=False)
    else:
        monkeypatch.setenv(onednn.OPT_OUT, "0")
    return request.param


@pytest.fixture
def xla_kernels(monkeypatch):
    """Convolutions on XLA's kernels (NINCC_ONEDNN=0): for tests of the XLA-side paths."""
    from nincc import onednn

    monkeypatch.setenv(onednn.OPT_OUT, "0")

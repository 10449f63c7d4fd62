"""`nincc convert` and `nincc inspect --weights` through the command line: conversions that
reproduce Caffe's files, and one clear error line (no traceback, no partial file) per bad input."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from nincc import caffemodel as cm
from nincc.cli import main

from .conftest import FIXTURES

DEPLOY = FIXTURES / "nin_cifar10_deploy"
V1 = FIXTURES / "v1_nin_cifar10"


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _fails(capsys, *argv) -> str:
    """Run a command that must fail: non-zero exit, exactly one `nincc: error:` line."""
    code, _, err = _run(capsys, *argv)
    lines = err.strip().splitlines()
    assert code != 0
    assert len(lines) == 1 and lines[0].startswith("nincc: error: "), err
    return lines[0]


@pytest.fixture
def outdir(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    return out


# ------------------------------------------------------------------------------------------------
# Conversions
# ------------------------------------------------------------------------------------------------


def test_v1_to_npz_and_back_to_caffes_file(capsys, outdir):
    """V1 weights -> .npz (as stored) -> .caffemodel with the deploy net: Caffe's own file."""
    code, out, _ = _run(capsys, "convert", V1 / "weights_v1.caffemodel", outdir / "w.npz")
    assert code == 0 and "w.npz" in out
    with np.load(outdir / "w.npz", allow_pickle=False) as flat:
        assert flat["conv1/1"].shape == (1, 1, 1, 192)  # stored shape: no net, no fitting
    code, _, _ = _run(
        capsys,
        "convert",
        V1 / "weights_v1.caffemodel",
        outdir / "fitted.npz",
        "--net",
        DEPLOY / "net.prototxt",
    )
    with np.load(outdir / "fitted.npz", allow_pickle=False) as flat:
        assert flat["conv1/1"].shape == (192,)  # fitted to the net
    code, _, _ = _run(
        capsys,
        "convert",
        outdir / "fitted.npz",
        outdir / "w.caffemodel",
        "--net",
        DEPLOY / "net.prototxt",
    )
    assert code == 0
    assert (outdir / "w.caffemodel").read_bytes() == (DEPLOY / "weights.caffemodel").read_bytes()
    assert sorted(os.listdir(outdir)) == ["fitted.npz", "w.caffemodel", "w.npz"]


def test_v1_upgrade_without_net(capsys, outdir):
    code, _, _ = _run(capsys, "convert", V1 / "weights_v1.caffemodel", outdir / "w.caffemodel")
    assert code == 0
    assert (outdir / "w.caffemodel").read_bytes() == (V1 / "upgraded.caffemodel").read_bytes()


def test_verbose_lists_skipped_layers(capsys, outdir):
    src = outdir / "src.npz"
    cm.save_params(src, {"conv9": [np.ones(2, np.float32)], **_deploy_params()})
    code, _, err = _run(
        capsys, "convert", src, outdir / "w.safetensors", "--net", DEPLOY / "net.prototxt", "-v"
    )
    assert code == 0 and "conv9" in err


def test_nonfinite_weights_warn_by_name(capsys, outdir):
    src = outdir / "src.npz"
    cm.save_params(src, {"ip": [np.array([0.0, np.nan], np.float32)]})
    code, _, err = _run(capsys, "convert", src, outdir / "w.caffemodel.h5")
    assert code == 0
    warning = [line for line in err.splitlines() if line.startswith("nincc: warning:")]
    assert len(warning) == 1 and "layer 'ip' blob 0" in warning[0]
    assert (outdir / "w.caffemodel.h5").exists()


def _deploy_params() -> dict[str, list[np.ndarray]]:
    with np.load(DEPLOY / "params.npz", allow_pickle=False) as flat:
        grouped: dict[str, dict[int, np.ndarray]] = {}
        for key in flat.files:
            layer, index = key.rsplit("/", 1)
            grouped.setdefault(layer, {})[int(index)] = flat[key]
    return {name: [blobs[i] for i in sorted(blobs)] for name, blobs in grouped.items()}


# ------------------------------------------------------------------------------------------------
# inspect --weights
# ------------------------------------------------------------------------------------------------


def test_inspect_weights_reports_before_compute(capsys, outdir):
    params = _deploy_params()
    params["cccp6"] = [np.ones((5, 192, 1, 1), np.float32), np.ones(5, np.float32)]
    del params["conv3"]
    params["old"] = [np.ones(1, np.float32)]
    src = outdir / "w.npz"
    cm.save_params(src, params)
    code, out, err = _run(capsys, "inspect", DEPLOY / "net.prototxt", "--weights", src)
    assert code == 0 and "nincc: error" not in err
    assert "missing     conv3" in out
    assert "extra       old" in out
    assert "mismatched  layer 'cccp6' blob 0" in out and "mismatched  layer 'cccp6' blob 1" in out
    assert "Caffe would refuse" in out


def test_inspect_weights_v1_file_fits(capsys):
    code, out, _ = _run(
        capsys, "inspect", DEPLOY / "net.prototxt", "--weights", V1 / "weights_v1.caffemodel"
    )
    assert code == 0 and "every blob of the net fits" in out


# ------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing left behind
# ------------------------------------------------------------------------------------------------


def _bad_source(kind: str, directory) -> os.PathLike:
    raw = (DEPLOY / "weights.caffemodel").read_bytes()
    path = directory / "bad.caffemodel"
    if kind == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif kind == "png":
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    elif kind == "prototxt":
        path.write_bytes((DEPLOY / "net.prototxt").read_bytes())
    elif kind == "npz":
        np.savez(directory / "a.npz", **{"conv1/0": np.ones(3, np.float32)})
        os.replace(directory / "a.npz", path)
    elif kind == "count":
        cm.write_caffemodel(path, None, {"conv1": [np.ones((2, 3), np.float32)]})
        raw = path.read_bytes()  # shape (2, 3) with 6 floats: declare (2, 4) instead
        path.write_bytes(raw.replace(b"\n\x02\x02\x03", b"\n\x02\x02\x04"))
    return path


@pytest.mark.parametrize(
    "kind, words",
    [
        ("truncated", "truncated"),
        ("png", "PNG"),
        ("prototxt", "text"),
        ("npz", "zip"),
        ("count", "needs 8 values"),
    ],
)
def test_bad_source_files(capsys, tmp_path, outdir, kind, words):
    src = _bad_source(kind, tmp_path)
    for dst in ("w.npz", "w.caffemodel"):
        line = _fails(capsys, "convert", src, outdir / dst, "--net", DEPLOY / "net.prototxt")
        assert words in line and "bad.caffemodel" in line
    line = _fails(capsys, "inspect", DEPLOY / "net.prototxt", "--weights", src)
    assert words in line
    assert os.listdir(outdir) == []


def test_caffemodel_for_another_net(capsys, outdir):
    line = _fails(
        capsys,
        "convert",
        FIXTURES / "split_implicit" / "weights.caffemodel",
        outdir / "w.caffemodel",
        "--net",
        DEPLOY / "net.prototxt",
    )
    assert "conv1" in line  # same name, other shape: layer, blob and both shapes named
    assert os.listdir(outdir) == []


def test_unknown_extensions(capsys, tmp_path, outdir):
    line = _fails(capsys, "convert", DEPLOY / "weights.caffemodel", outdir / "w.pt")
    assert "unknown weights file extension" in line and "w.pt" in line
    src = tmp_path / "w.bin"
    src.write_bytes(b"x")
    assert "w.bin" in _fails(capsys, "convert", src, outdir / "w.npz")
    assert os.listdir(outdir) == []


def test_npz_to_caffemodel_needs_net(capsys, tmp_path, outdir):
    src = tmp_path / "w.npz"
    cm.save_params(src, _deploy_params())
    assert "--net" in _fails(capsys, "convert", src, outdir / "w.caffemodel")
    assert os.listdir(outdir) == []


def test_missing_output_directory(capsys, outdir):
    line = _fails(capsys, "convert", DEPLOY / "weights.caffemodel", outdir / "no" / "w.npz")
    assert "cannot write" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(capsys, outdir):
    outdir.chmod(0o555)
    try:
        line = _fails(capsys, "convert", DEPLOY / "weights.caffemodel", outdir / "w.npz")
    finally:
        outdir.chmod(0o755)
    assert "cannot write" in line and "ermission" in line
    assert os.listdir(outdir) == []


def test_read_only_output_directory_simulated(capsys, outdir, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(cm.tempfile, "mkstemp", refuse)
    line = _fails(capsys, "convert", DEPLOY / "weights.caffemodel", outdir / "w.npz")
    assert "cannot write" in line and "Permission denied" in line
    assert os.listdir(outdir) == []


@pytest.mark.parametrize("dst", ["w.npz", "w.caffemodel", "w.safetensors", "w.caffemodel.h5"])
def test_full_disk_leaves_no_partial_file(capsys, outdir, monkeypatch, dst):
    """The device fills up while the file is flushed: the old file stays, no temp remains."""
    if dst.endswith("h5"):
        pytest.importorskip("h5py")
    (outdir / dst).write_bytes(b"previous")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(cm.os, "fsync", full)
    line = _fails(
        capsys,
        "convert",
        DEPLOY / "weights.caffemodel",
        outdir / dst,
        "--net",
        DEPLOY / "net.prototxt",
    )
    assert "No space left on device" in line
    assert os.listdir(outdir) == [dst]
    assert (outdir / dst).read_bytes() == b"previous"

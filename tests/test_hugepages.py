"""The CLI's re-execution with glibc's huge-page tunable (nincc.hugepages)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nincc.hugepages import TUNABLE, describe, huge_pages_env

from .conftest import REPO

GLIBC = ("glibc", "2.36")


def env_for(environ, **kw):
    kw = {"system": "Linux", "libc": GLIBC, "thp_mode": "madvise", **kw}
    return huge_pages_env(environ, **kw)


def test_adds_the_tunable_where_the_kernel_gives_huge_pages_on_request():
    env = env_for({"PATH": "/bin"})
    assert env is not None and env["GLIBC_TUNABLES"] == f"{TUNABLE}=1" and env["PATH"] == "/bin"
    # other tunables are kept
    env = env_for({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert env is not None
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}=1"


@pytest.mark.parametrize(
    "environ, kw",
    [
        ({"NINCC_HUGE_PAGES": "0"}, {}),
        ({"NINCC_HUGE_PAGES": "off"}, {}),
        ({"GLIBC_TUNABLES": f"{TUNABLE}=0"}, {}),  # the user chose
        ({}, {"system": "Darwin"}),
        ({}, {"libc": ("", "")}),  # musl
        ({}, {"libc": ("glibc", "2.31")}),  # no hugetlb tunable before 2.35
        ({}, {"thp_mode": "never"}),
        ({}, {"thp_mode": "always"}),  # every mapping gets them already
        ({}, {"thp_mode": None}),
    ],
)
def test_nothing_to_gain(environ, kw):
    assert env_for(environ, **kw) is None


def test_never_twice():
    env = env_for({})
    assert env is not None
    env.pop("GLIBC_TUNABLES")  # as if something stripped it on the way
    assert env_for(env) is None


def test_describe():
    assert "huge pages" in describe({"GLIBC_TUNABLES": f"x=1:{TUNABLE}=1"})
    assert "default" in describe({})


REEXEC = """
import os, sys
print("start", os.getpid(), flush=True)
from nincc.hugepages import reexec_with_huge_pages
reexec_with_huge_pages()
print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
"""


def _clean_env(**extra):
    skip = ("GLIBC_TUNABLES", "NINCC_HUGE")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def test_reexecutes_once_in_the_same_process():
    env = _clean_env()
    if huge_pages_env(env) is None:
        pytest.skip("this host has nothing to gain (no glibc 2.35+ or THP not in madvise mode)")
    out = subprocess.run(
        [sys.executable, "-c", REEXEC], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    ends = [line.split() for line in out if line.startswith("end")]
    assert len(starts) == 2 and starts[0] == starts[1]  # same pid, run twice
    assert len(ends) == 1 and ends[0][1] == starts[0].split()[1]
    assert ends[0][2] == f"{TUNABLE}=1"


NET = """
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_nincc_time_runs_with_huge_pages_unless_opted_out(tmp_path, opt_out):
    env = _clean_env(**({"NINCC_HUGE_PAGES": "0"} if opt_out else {}))
    gains = huge_pages_env(env) is not None
    (tmp_path / "net.prototxt").write_text(NET)
    run = subprocess.run(
        [sys.executable, "-m", "nincc.cli", "time", str(tmp_path / "net.prototxt"),
         "--iterations", "1", "--no-layers"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    logged = run.stdout + run.stderr
    if gains:
        assert f"malloc: transparent huge pages ({TUNABLE}=1)" in logged
    else:
        assert "malloc: the system's default pages" in logged

"""The CLI's re-execution with glibc's tunables that keep freed memory (nincc.malloc)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest

from nincc.malloc import RETAIN, describe, retaining_env

from .conftest import REPO

GLIBC = ("glibc", "2.36")
ADDED = ":".join(f"{k}={v}" for k, v in RETAIN.items())


def env_for(environ, **kw):
    kw = {"system": "Linux", "libc": GLIBC, **kw}
    return retaining_env(environ, **kw)


def test_adds_the_tunables():
    env = env_for({"PATH": "/bin"})
    assert env is not None and env["GLIBC_TUNABLES"] == ADDED and env["PATH"] == "/bin"
    # other tunables are kept
    env = env_for({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert env is not None
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.hugetlb=1:{ADDED}"


@pytest.mark.parametrize(
    "environ, kw",
    [
        ({"NINCC_MALLOC": "0"}, {}),
        ({"NINCC_MALLOC": "off"}, {}),
        ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}, {}),  # the user chose
        ({"GLIBC_TUNABLES": "x=1:glibc.malloc.mmap_max=8"}, {}),
        ({}, {"system": "Darwin"}),
        ({}, {"libc": ("", "")}),  # musl
        ({}, {"libc": ("glibc", "2.17")}),  # no malloc tunables before 2.26
    ],
)
def test_nothing_to_do(environ, kw):
    assert env_for(environ, **kw) is None


def test_never_twice():
    env = env_for({})
    assert env is not None
    env.pop("GLIBC_TUNABLES")  # as if something stripped it on the way
    assert env_for(env) is None


def test_describe():
    assert "kept for reuse" in describe({"GLIBC_TUNABLES": f"x=1:{ADDED}"})
    assert "huge pages" in describe({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert "default" in describe({})
    assert "default" in describe({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})


REEXEC = """
import os, sys
print("start", os.getpid(), flush=True)
from nincc.malloc import reexec_retaining
reexec_retaining()
print("end", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
"""


def _clean_env(**extra):
    skip = ("GLIBC_TUNABLES", "NINCC_MALLOC")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def _applies(env) -> bool:
    return retaining_env(env) is not None


def test_reexecutes_once_in_the_same_process():
    env = _clean_env()
    if not _applies(env):
        pytest.skip("not Linux with glibc 2.26+")
    out = subprocess.run(
        [sys.executable, "-c", REEXEC], env=env, capture_output=True, text=True, check=True
    ).stdout.split("\n")
    starts = [line for line in out if line.startswith("start")]
    ends = [line.split() for line in out if line.startswith("end")]
    assert len(starts) == 2 and starts[0] == starts[1]  # same pid, run twice
    assert len(ends) == 1 and ends[0][1] == starts[0].split()[1]
    assert ends[0][2] == ADDED


# Allocates and frees a 64 MiB block (above any mmap threshold) from another thread, touching
# every page, ten times; prints the minor page faults of the last nine rounds.
REUSE = """
import ctypes, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
n = 64 << 20
def once():
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
def in_thread():
    t = threading.Thread(target=once); t.start(); t.join()
in_thread()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(9):
    in_thread()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_the_tunables_stop_the_faults_of_a_reused_block():
    """What the setting is for: a large block freed and allocated again (from another thread,
    as XLA's are) is faulted in afresh by default and not at all with the tunables."""
    env = _clean_env()
    if not _applies(env):
        pytest.skip("not Linux with glibc 2.26+")
    pages = 9 * (64 << 20) // resource.getpagesize()

    def faults(extra):
        run = subprocess.run([sys.executable, "-c", REUSE], env={**env, **extra},
                             capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    assert faults({}) > pages // 2
    assert faults({"GLIBC_TUNABLES": ADDED}) < pages // 20


NET = """
input: "data" input_shape { dim: 2 dim: 3 dim: 8 dim: 8 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 4 kernel_size: 3 } }
"""


@pytest.mark.parametrize("opt_out", [False, True])
def test_nincc_time_keeps_freed_memory_unless_opted_out(tmp_path, opt_out):
    env = _clean_env(**({"NINCC_MALLOC": "0"} if opt_out else {}))
    applies = _applies(env)
    (tmp_path / "net.prototxt").write_text(NET)
    run = subprocess.run(
        [sys.executable, "-m", "nincc.cli", "time", str(tmp_path / "net.prototxt"),
         "--iterations", "1", "--no-layers"],
        env=env, capture_output=True, text=True, cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    logged = run.stdout + run.stderr
    if applies:
        assert "malloc: freed memory kept for reuse" in logged
    else:
        assert "malloc: the system's defaults" in logged

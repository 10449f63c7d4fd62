"""malloc for the `nincc` command's own process: freed memory is kept for reuse (Linux, glibc).

XLA:CPU allocates a step's working memory afresh at every call (116 MB for NIN ImageNet's
b16 train step). glibc serves blocks that large with a fresh ``mmap`` and returns them with
``munmap``, so the kernel faults the block in and zeroes it 4 KiB at a time at every step:
~30,000 page faults and 45-55 ms of system time per step there. With glibc told to keep what
is freed (no ``mmap`` for large blocks, no trimming, one arena shared by all threads) the next
step reuses the same pages: 35 faults and 3-6 ms (docs/performance.md, section 28).

glibc reads these tunables only at process start, so the command re-executes itself once
with them added. Only the CLI does this, and only for the commands that run a net many times:
the process is then nincc's own, and memory it freed is kept for its next step rather than
returned to the system. The library never changes its host process's allocator; a Python
program can start with the same ``GLIBC_TUNABLES`` (:data:`RETAIN`). ``NINCC_MALLOC=0`` opts
out.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

from .switches import switched_off

OPT_OUT = "NINCC_MALLOC"
_DONE = "NINCC_MALLOC_EXEC"  # set in the re-executed process: never a second time
# No mmap for large blocks, never give the top of the heap back, one arena for all threads
# (a thread's own arena would still mmap blocks larger than its 64 MiB heap).
RETAIN = {
    "glibc.malloc.mmap_max": "0",
    "glibc.malloc.trim_threshold": str(1 << 40),
    "glibc.malloc.arena_max": "1",
}
HUGE_PAGES = "glibc.malloc.hugetlb"


def _glibc_at_least(version: str, want: tuple[int, int] = (2, 26)) -> bool:
    """glibc 2.26 is the first with the malloc tunables."""
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= want


def _tunables(environ: Mapping[str, str]) -> dict[str, str]:
    pairs = (item.partition("=") for item in environ.get("GLIBC_TUNABLES", "").split(":"))
    return {name: value for name, _, value in pairs if name}


def retaining_env(
    environ: Mapping[str, str],
    system: str | None = None,
    libc: tuple[str, str] | None = None,
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do.

    Nothing to do: opted out, not Linux with glibc 2.26+, already re-executed, or the user
    set any of these tunables already (their choice stands). ``system`` and ``libc`` default
    to this machine's.
    """
    if switched_off(OPT_OUT, environ) or environ.get(_DONE):
        return None
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    if name != "glibc" or not _glibc_at_least(version):
        return None
    if set(_tunables(environ)) & set(RETAIN):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    added = ":".join(f"{k}={v}" for k, v in RETAIN.items())
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{added}" if current else added
    env[_DONE] = "1"
    return env


def describe(environ: Mapping[str, str] | None = None) -> str:
    """One line on how this process's malloc treats freed memory, for timing reports."""
    tunables = _tunables(os.environ if environ is None else environ)
    parts = []
    if all(tunables.get(k) == v for k, v in RETAIN.items()):
        parts.append("freed memory kept for reuse (GLIBC_TUNABLES mmap_max=0, arena_max=1)")
    if tunables.get(HUGE_PAGES) == "1":
        parts.append(f"transparent huge pages ({HUGE_PAGES}=1)")
    return ", ".join(parts) or "the system's defaults"


def reexec_retaining() -> None:
    """Replace this process by the same command line with :data:`RETAIN` set, if it applies.

    Returns only when there is nothing to do. Interpreter options survive
    (``sys.orig_argv``); the process id stays the same.
    """
    env = retaining_env(os.environ)
    if env is None or not sys.executable or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:
        return  # could not re-execute: run on with the system's defaults

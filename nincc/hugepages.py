"""Transparent huge pages for the `nincc` command's own process (Linux, glibc 2.35+).

XLA:CPU allocates a step's working memory afresh at every call, and the kernel faults it in
4 KiB at a time: tens of thousands of page faults per step on the zoo nets. glibc's
``glibc.malloc.hugetlb=1`` tunable makes malloc ask for transparent huge pages instead, which
cuts the faults by two orders of magnitude (docs/performance.md, section 9). glibc reads its
tunables only at process start, so the command re-executes itself once with the tunable
added. Only the CLI does this, and only for the commands that run a net many times: the
process is then nincc's own. The library never changes its host process's allocator.
``NINCC_HUGE_PAGES=0`` opts out.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

from .switches import switched_off

OPT_OUT = "NINCC_HUGE_PAGES"
_DONE = "NINCC_HUGE_PAGES_EXEC"  # set in the re-executed process: never a second time
TUNABLE = "glibc.malloc.hugetlb"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def _glibc_at_least(version: str, want: tuple[int, int] = (2, 35)) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= want


def _thp_mode(path: str = THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), if known."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def huge_pages_env(
    environ: Mapping[str, str],
    system: str | None = None,
    libc: tuple[str, str] | None = None,
    thp_mode: str | None = "",
) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to gain.

    Nothing to gain: opted out, not Linux with glibc 2.35+, the kernel's huge pages off
    ("never") or already given to every mapping ("always"), or the tunable already set.
    ``system``, ``libc`` and ``thp_mode`` default to this machine's ("" reads the kernel's
    mode; None stands for a mode that could not be read).
    """
    if switched_off(OPT_OUT, environ):
        return None
    if environ.get(_DONE):
        return None
    if (system or platform.system()) != "Linux":
        return None
    name, version = libc or platform.libc_ver()
    if name != "glibc" or not _glibc_at_least(version):
        return None
    mode = _thp_mode() if thp_mode == "" else thp_mode
    if mode != "madvise":
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if TUNABLE in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
    env[_DONE] = "1"
    return env


def describe(environ: Mapping[str, str] | None = None) -> str:
    """One line on how this process's malloc gets its pages, for timing reports."""
    current = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    if f"{TUNABLE}=1" in current:
        return f"transparent huge pages ({TUNABLE}=1)"
    return "the system's default pages"


def reexec_with_huge_pages() -> None:
    """Replace this process by the same command line with the tunable set, if it gains.

    Returns only when there is nothing to gain. Interpreter options survive
    (``sys.orig_argv``); the process id stays the same.
    """
    env = huge_pages_env(os.environ)
    if env is None or not sys.executable or not sys.orig_argv:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:
        return  # could not re-execute: run on with the default pages

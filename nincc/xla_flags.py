"""XLA CPU settings nincc runs with, applied to ``XLA_FLAGS`` before JAX starts its backend.

XLA reads ``XLA_FLAGS`` once, when the first computation initialises a backend, so
:func:`apply` must run before that (importing JAX is fine; running anything is not). It only
appends: a flag the user already put in ``XLA_FLAGS`` keeps the user's value. Set
``NINCC_XLA_FLAGS=0`` to leave ``XLA_FLAGS`` untouched. What each flag buys is measured in
docs/performance.md.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import MutableMapping
from dataclasses import dataclass

from .switches import switched_off

OPT_OUT = "NINCC_XLA_FLAGS"


@dataclass(frozen=True)
class Flag:
    """One XLA flag: name (without ``--``), value, and why nincc sets it."""

    name: str
    value: str
    why: str

    @property
    def text(self) -> str:
        return f"--{self.name}={self.value}"


FLAGS: tuple[Flag, ...] = (
    Flag(
        "xla_cpu_experimental_ynn_fusion_type",
        "individual_dot",
        "jaxlib 0.10's CPU backend hands convolutions (and other fusions) to YNNPACK by default; "
        "on the zoo nets that makes a train step 1.2-1.5x slower than XLA's own Eigen "
        "convolutions. Only single matrix products stay with YNNPACK, which runs the "
        "InnerProduct shapes (a small batch against a weight stored (out, in)) about 3x faster "
        "than Eigen.",
    ),
)


def _named(flags_text: str) -> set[str]:
    """The flag names already present in an XLA_FLAGS string."""
    names = set()
    for tok in flags_text.split():
        if tok.startswith("--"):
            names.add(tok[2:].split("=", 1)[0])
    return names


def backend_started() -> bool:
    """Whether a JAX backend exists already (then XLA_FLAGS changes have no effect)."""
    try:
        from jax._src import xla_bridge
    except ImportError:  # pragma: no cover - jax is a dependency
        return False
    check = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(check()) if check else False


def apply(
    flags: tuple[Flag, ...] = FLAGS, environ: MutableMapping[str, str] | None = None
) -> list[str]:
    """Append nincc's flags to ``XLA_FLAGS`` (unless opted out); returns the flags added.

    A flag already named in ``XLA_FLAGS`` is left as the user set it. If a JAX backend is
    already running, nothing is changed and a warning says the flags cannot take effect.
    """
    env = os.environ if environ is None else environ
    if switched_off(OPT_OUT, env):
        return []
    current = env.get("XLA_FLAGS", "")
    have = _named(current)
    added = [f.text for f in flags if f.name not in have]
    if not added:
        return []
    if environ is None and backend_started():
        warnings.warn(
            "nincc.xla_flags.apply(): a JAX backend is already running, so "
            f"{' '.join(added)} cannot take effect; apply them before the first JAX computation",
            RuntimeWarning,
            stacklevel=2,
        )
        return []
    env["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added

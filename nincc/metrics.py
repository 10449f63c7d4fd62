"""What training reports: glog-style log lines, a live progress line, a JSON-lines metrics file
and loss/accuracy curves drawn from it.

Log lines look like Caffe's (``I0412 13:45:01.123456  4242 loop.py:310] Iteration 100, lr = 0.01``)
so tools written for Caffe logs (``parse_log.py`` and friends) read them. Numbers are printed as
C++'s ``operator<<`` prints a float: ``%g`` with six significant digits.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any, TextIO

from .errors import InputError, NinccError


def num(x: float) -> str:
    """A number as C++ streams print a float by default (``%g``, 6 significant digits)."""
    return f"{float(x):g}"


class GlogFormatter(logging.Formatter):
    """``Lmmdd hh:mm:ss.uuuuuu threadid file:line] message``, glog's prefix."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.localtime(record.created)
        micros = int((record.created % 1) * 1_000_000)
        level = (record.levelname or "I")[0]
        tid = threading.get_native_id() if record.thread else 0
        head = (
            f"{level}{t.tm_mon:02d}{t.tm_mday:02d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            f".{micros:06d} {tid:5d} {record.filename}:{record.lineno}] "
        )
        return head + record.getMessage()


class Progress:
    """One self-overwriting status line on a terminal; silent when the stream is not a TTY."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        is_tty = getattr(self.stream, "isatty", lambda: False)()
        self.enabled = is_tty if enabled is None else enabled
        self._shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self.stream.write("\r\033[K" + text)
            self.stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self._shown = False


def progress_text(
    iteration: int, max_iter: int, loss: float, rate: float, images_per_s: float, eta_s: float
) -> str:
    """``iter 1200/120000 (1.0%)  loss 1.2345  lr 0.1  850 img/s  ETA 3h12m``."""
    pct = 100.0 * iteration / max_iter if max_iter else 100.0
    return (
        f"iter {iteration}/{max_iter} ({pct:.1f}%)  loss {loss:.5g}  lr {rate:g}  "
        f"{images_per_s:.0f} img/s  ETA {_duration(eta_s)}"
    )


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _ProgressAwareHandler(logging.StreamHandler):
    """Erases the progress line before each log line, so the two never interleave."""

    def __init__(self, stream: TextIO, progress: Progress | None):
        super().__init__(stream)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is not None:
            self.progress.clear()
        super().emit(record)


def glog_logger(
    name: str = "nincc.train", stream: TextIO | None = None, progress: Progress | None = None
) -> logging.Logger:
    """A logger printing glog-style lines to ``stream`` (stderr), replacing earlier handlers."""
    log = logging.getLogger(name)
    for h in list(log.handlers):
        if isinstance(h, _ProgressAwareHandler):
            log.removeHandler(h)
    handler = _ProgressAwareHandler(stream if stream is not None else sys.stderr, progress)
    handler.setFormatter(GlogFormatter())
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return log


class MetricsWriter:
    """Appends one JSON object per line, flushed at once, so a killed run keeps its history.

    Records are ``{"iter", "loss", "lr", "images_per_s"}`` for training iterations and
    ``{"iter", "test_net", "outputs": {name: mean}}`` for test rounds.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "a", encoding="utf-8")
        except OSError as e:
            raise InputError(f"cannot write metrics file {self.path}: {e.strerror or e}") from None

    def write(self, record: Mapping[str, Any]) -> None:
        self._f.write(json.dumps(record, allow_nan=True, separators=(",", ":")) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file; a line that is not JSON names the file and line."""
    out = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{n}: not a JSON metrics record ({e.msg})") from None
                if not isinstance(rec, dict) or "iter" not in rec:
                    raise InputError(f"{path}:{n}: a metrics record needs an 'iter' field")
                out.append(rec)
    except OSError as e:
        raise InputError(f"cannot read metrics file {path}: {e.strerror or e}") from None
    return out


def curves(records: Iterable[Mapping[str, Any]]) -> dict[str, tuple[list[int], list[float]]]:
    """Series to plot: ``train loss`` and one per test output (``test#0 accuracy``), by iteration.

    A resumed run appends to the same file, so an iteration seen again replaces the earlier value.
    """
    series: dict[str, dict[int, float]] = {}
    for rec in records:
        it = int(rec["iter"])
        if "loss" in rec and "test_net" not in rec:
            series.setdefault("train loss", {})[it] = float(rec["loss"])
        for name, value in (rec.get("outputs") or {}).items():
            series.setdefault(f"test#{rec.get('test_net', 0)} {name}", {})[it] = float(value)
    return {k: (sorted(v), [v[i] for i in sorted(v)]) for k, v in series.items()}


def plot_curves(records: Iterable[Mapping[str, Any]], out: str | os.PathLike) -> None:
    """Draw losses (left) and other test outputs such as accuracy (right) to an image file."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NinccError("plotting needs matplotlib: pip install 'nincc[plot]'") from None
    data = curves(records)
    if not data:
        raise InputError("the metrics file holds no training or test records to plot")
    losses = {k: v for k, v in data.items() if k == "train loss" or "loss" in k.split(" ", 1)[1]}
    others = {k: v for k, v in data.items() if k not in losses}
    panels = [(losses, "loss")] + ([(others, "test outputs")] if others else [])
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, (group, title) in zip(axes[0], panels, strict=True):
        for name, (xs, ys) in group.items():
            ax.plot(xs, ys, label=name, marker="." if len(xs) < 50 else None)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(os.fspath(out))
    except (OSError, ValueError) as e:
        raise InputError(f"cannot write plot {out}: {e}") from None
    finally:
        plt.close(fig)

"""Command-line front ends for inspecting and exporting nets.

- ``nincc inspect NET --lowered LEVEL | --cost | --memory [--batch N]`` (extra inspect flags);
- ``nincc draw NET -o net.svg|.png|.pdf|.dot``;
- ``nincc diff A B``;
- ``nincc export NET --weights W -o net.jaxexport [--batch N | --symbolic-batch]``.

``add_inspect_args`` extends the ``inspect`` parser, ``add_parsers`` adds the other three, and
``COMMANDS`` maps each command to its handler like ``nincc.cli.COMMANDS``. Handlers raise
nincc.errors classes; the CLI prints them as one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from .errors import NinccError
from .lowered import LEVELS


def _note(text: str) -> None:
    print(f"nincc: note: {text}", file=sys.stderr)


def _build_args(p: argparse.ArgumentParser, phase: bool = True) -> None:
    if phase:
        p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"])
    p.add_argument("--level", type=int, default=None)
    p.add_argument("--stage", action="append", help="NetState stage (repeatable)")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="BLOB=N,C,H,W",
        help="shape of a source layer's top (e.g. a Data layer whose database is absent)",
    )


def _batch_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch", type=int, metavar="N", help="set every input's batch axis to N")


def _input_shapes(args) -> dict[str, tuple[int, ...]]:
    from .cli import _shape_arg

    return dict(_shape_arg(s) for s in getattr(args, "input_shape", None) or [])


def _graph(args, phase: str | None = None, source: Any = None):
    from .lowered import load_graph_at

    return load_graph_at(
        args.net if source is None else source,
        getattr(args, "batch", None),
        phase or getattr(args, "phase", "TEST"),
        args.level,
        args.stage or [],
        _input_shapes(args),
    )


# ---------------------------------------------------------------- inspect


def add_inspect_args(p: argparse.ArgumentParser) -> None:
    """The inspect flags for compiled programs; add them to the `inspect` parser."""
    g = p.add_argument_group("compiled program")
    g.add_argument(
        "--lowered",
        choices=LEVELS,
        help="print the phase program (TEST: forward; TRAIN: loss and gradient) at this level",
    )
    g.add_argument("--cost", action="store_true", help="XLA's cost analysis beside nincc's counts")
    g.add_argument(
        "--memory", action="store_true", help="inference and training memory, nincc's and XLA's"
    )
    _batch_arg(g)


def cmd_inspect(args) -> int:
    """`nincc inspect`: the table (nincc.cli.cmd_inspect) or, with --lowered / --cost /
    --memory, the compiled program's text and analyses; --batch applies to all of them."""
    from . import cli
    from .lowered import batch_shapes, cost_report, lowered_text, memory_report

    if not (args.lowered or args.cost or args.memory):
        if args.batch is not None:  # the table at that batch: the shapes go in as inputs
            shapes = batch_shapes(_graph(args), args.batch)
            extra = [f"{k}={','.join(map(str, s))}" for k, s in shapes.items()]
            args.input_shape = [*(args.input_shape or []), *extra]
        return cli.cmd_inspect(args)
    graph = _graph(args)
    parts = []
    if args.lowered:
        parts.append(lowered_text(graph, args.lowered))
    if args.cost:
        parts.append(cost_report(graph))
    if args.memory:
        test = graph if graph.phase == "TEST" else _graph(args, "TEST")
        train, note = None, ""
        try:
            train = graph if graph.phase == "TRAIN" else _graph(args, "TRAIN")
        except NinccError as e:  # a net with no TRAIN phase still has inference memory
            note = f"no training figures: {e}"
        parts.append(memory_report(test, train, note))
    print("\n\n".join(p.rstrip("\n") for p in parts))
    return 0


# ---------------------------------------------------------------- draw


def cmd_draw(args) -> int:
    """`nincc draw`: the net as a picture through Graphviz, or DOT text where it is absent."""
    from . import load_net_param
    from .draw import render, to_dot

    net = load_net_param(args.net)
    graph = _graph(args, source=net)
    written, note = render(to_dot(graph, net, rankdir=args.rankdir), args.output)
    if note:
        _note(note)
    else:
        print(f"wrote {written}")
    return 0


# ---------------------------------------------------------------- diff


def cmd_diff(args) -> int:
    """`nincc diff`: layers, settings, shapes and parameter counts that differ, per phase."""
    from .netdiff import diff_nets, format_diff

    phases = [args.phase] if args.phase else ["TRAIN", "TEST"]
    diffs, notes = diff_nets(
        args.a, args.b, phases, args.level, args.stage or [], _input_shapes(args)
    )
    print(format_diff(diffs, notes))
    return 1 if args.exit_code and not all(d.same for d in diffs) else 0


# ---------------------------------------------------------------- export


def _shape_text(shape) -> str:
    return "x".join("N" if d is None else str(d) for d in shape) or "scalar"


def cmd_export(args) -> int:
    """`nincc export`: the TEST-phase forward as a jax.export artefact with its weights."""
    from .export import export_net, write_export

    program, params, info = export_net(
        args.net,
        weights=args.weights,
        batch=args.batch,
        symbolic_batch=args.symbolic_batch,
        platforms=args.platform,
        blobs=args.blobs,
        level=args.level,
        stages=args.stage or [],
        input_shapes=_input_shapes(args),
        seed=args.seed,
    )
    write_export(args.output, program, params, info)
    ins = ", ".join(f"{k} {_shape_text(s)}" for k, s in info.inputs.items())
    outs = ", ".join(f"{k} {_shape_text(s)}" for k, s in info.outputs.items())
    print(
        f"wrote {args.output}: net {info.net or '(unnamed)'}, inputs {ins}, outputs {outs}, "
        f"platforms {', '.join(info.platforms)} (load with nincc.export.load_exported)"
    )
    if args.weights is None:
        _note(f"no --weights: the parameters came from the layers' fillers (seed {args.seed})")
    return 0


# ---------------------------------------------------------------- parsers


COMMANDS: dict[str, tuple[Callable, str]] = {
    "draw": (cmd_draw, "draw a net as SVG/PNG through Graphviz (DOT text without it)"),
    "diff": (cmd_diff, "what differs between two nets: layers, settings, shapes, params"),
    "export": (cmd_export, "a serialized jax.export artefact of a net's inference function"),
}


def add_parsers(sub: Any) -> None:
    """Add the draw, diff and export sub-commands to the CLI's subparsers."""
    p = sub.add_parser("draw", help=COMMANDS["draw"][1])
    p.add_argument("net", help="net prototxt (current, V1 or V0 format)")
    p.add_argument("-o", "--output", required=True, help="out.svg, .png, .pdf or .dot")
    _build_args(p)
    _batch_arg(p)
    p.add_argument("--rankdir", default="TB", choices=["TB", "LR"], help="layout direction")
    p = sub.add_parser("diff", help=COMMANDS["diff"][1])
    p.add_argument("a", help="first net prototxt")
    p.add_argument("b", help="second net prototxt")
    p.add_argument("--phase", choices=["TRAIN", "TEST"], help="compare one phase (default both)")
    _build_args(p, phase=False)
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the nets differ")
    p = sub.add_parser("export", help=COMMANDS["export"][1])
    p.add_argument("net", help="net prototxt with a TEST phase (e.g. a deploy net)")
    p.add_argument("--weights", help=".caffemodel, .caffemodel.h5, .npz or .safetensors")
    p.add_argument("-o", "--output", required=True, help="the artefact, e.g. net.jaxexport")
    batch = p.add_mutually_exclusive_group()
    _batch_arg(batch)
    batch.add_argument(
        "--symbolic-batch", action="store_true", help="export for any batch size (jax.export)"
    )
    p.add_argument(
        "--platform",
        action="append",
        choices=["cpu", "cuda", "rocm", "tpu"],
        help="lower for this platform (repeatable; default: this machine's)",
    )
    p.add_argument(
        "--blobs", type=lambda s: s.split(","), help="output these blobs (default: the outputs)"
    )
    p.add_argument("--seed", type=int, default=0, help="filler seed when no --weights is given")
    _build_args(p, phase=False)

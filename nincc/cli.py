"""The `nincc` command: a thin table of sub-commands over the library.

Every failure on bad input prints one line, ``nincc: error: <message>``, and exits non-zero.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from . import inspect_cli
from .errors import InputError, NinccError, WeightsError
from .loop import TRAIN_COMMANDS, add_train_parsers


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    name, _, dims = text.partition("=")
    try:
        return name, tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise InputError(f"--input-shape wants NAME=N,C,H,W, got {text!r}") from None


def _graph(args):
    from . import load_graph

    shapes = dict(_shape_arg(s) for s in getattr(args, "input_shape", None) or [])
    return load_graph(
        args.net,
        phase=args.phase,
        level=getattr(args, "level", None),
        stages=getattr(args, "stage", None) or [],
        input_shapes=shapes,
    )


def cmd_inspect(args) -> int:
    """Per-layer table (or JSON / DOT) of a net; with --weights, check them against the net."""
    from . import report

    graph = _graph(args)
    if args.weights:
        from .caffemodel import check_weights

        print(check_weights(graph, args.weights))
    text = {"table": report.as_table, "json": report.as_json, "dot": report.as_dot}[args.format]
    print(text(graph))
    return 0


def cmd_layers(args) -> int:
    """List the supported layer types, from the table."""
    from .report import supported_layers

    print(supported_layers())
    return 0


def cmd_upgrade(args) -> int:
    """Rewrite a legacy (V0/V1, CCCP) net or solver prototxt in the current format."""
    from . import prototxt, upgrade

    text = prototxt.read_text(args.input)
    if args.solver:
        msg = upgrade.upgrade_solver(prototxt.parse_solver_text(text, args.input), path=args.input)
    else:
        net = prototxt.parse_net_text(text, args.input)
        msg, notes = upgrade.upgrade_net(net, cccp=True, path=args.input)
        for n in notes:
            print(f"nincc: {n}", file=sys.stderr)
    out = prototxt.to_text(msg)
    if args.output:
        _atomic_write_text(args.output, out)
    else:
        sys.stdout.write(out)
    return 0


def _atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _read_inputs(specs: Sequence[str]) -> dict[str, np.ndarray]:
    inputs = {}
    for spec in specs:
        name, eq, path = spec.partition("=")
        if not eq:
            raise InputError(f"--input wants BLOB=FILE.npy, got {spec!r}")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise InputError(f"cannot read input '{name}' from {path}: {e}") from None
    return inputs


def load_weights_for(net, path: str, verbose: bool = False):
    """Params of a compiled net from any weights file nincc reads, matched by Caffe's rules."""
    import jax.numpy as jnp

    from .caffemodel import load_params, match_weights

    params, report = match_weights(load_params(path), net.graph.weight_slots(), verbose=verbose)
    missing = [n for n in net.graph.param_shapes() if n not in params]
    if missing:
        raise WeightsError(f"{path} has no blobs for layer(s) {missing}")
    if verbose:
        print(report, file=sys.stderr)
    return {k: [jnp.asarray(a) for a in v] for k, v in params.items()}


def cmd_run(args) -> int:
    """Forward a net on .npy inputs and save its blobs to an .npz file."""
    from . import compile as compile_net

    net = compile_net(_graph(args))
    params = (
        load_weights_for(net, args.weights, args.verbose) if args.weights else net.init(args.seed)
    )
    import jax

    rng = jax.random.PRNGKey(args.seed) if args.phase == "TRAIN" else None
    blobs = net.apply(params, _read_inputs(args.input or []), rng=rng, blobs=args.blobs or None)
    arrays = {k: np.asarray(v) for k, v in blobs.items()}
    if args.save:
        tmp = f"{args.save}.tmp{os.getpid()}.npz"
        try:
            np.savez(tmp, **arrays)
            os.replace(tmp, args.save)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    for k, v in arrays.items():
        print(f"{k:<24} {'x'.join(map(str, v.shape)) or '()':<20} mean {float(v.mean()):.6g}")
    return 0


def cmd_convert(args) -> int:
    """Convert weights between .caffemodel, .caffemodel.h5, .npz and .safetensors."""
    import warnings

    from .caffemodel import convert

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        report = convert(args.src, args.dst, net=args.net, verbose=args.verbose)
    for w in caught:
        print(f"nincc: warning: {w.message}", file=sys.stderr)
    if args.verbose:
        for line in report.lines():
            print(f"nincc: {line}", file=sys.stderr)
    print(f"wrote {args.dst}")
    return 0


def cmd_quickstart(args) -> int:
    """Write the digits LMDBs, train the zoo's nin_digits and score its last snapshot."""
    from .quickstart import quickstart

    return quickstart(main, data_dir=args.data, max_iter=args.max_iter)


def _net_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("net", help="net prototxt (current, V1 or V0 format)")
    p.add_argument("--phase", default="TEST", choices=["TRAIN", "TEST"])
    p.add_argument("--level", type=int, default=None)
    p.add_argument("--stage", action="append", help="NetState stage (repeatable)")
    p.add_argument(
        "--input-shape",
        action="append",
        metavar="BLOB=N,C,H,W",
        help="shape of a source layer's top (e.g. a Data layer whose database is absent)",
    )


COMMANDS: dict[str, tuple[Callable, str]] = {
    "inspect": (cmd_inspect, "per-layer shapes, params and FLOPs of a net"),
    "layers": (cmd_layers, "the supported layer types"),
    "upgrade": (cmd_upgrade, "rewrite a legacy prototxt in the current format"),
    "run": (cmd_run, "forward a net on .npy inputs"),
    "convert": (cmd_convert, "convert weights between formats"),
    "quickstart": (cmd_quickstart, "train the zoo's digits NIN on data the install brings"),
}


COMMANDS["inspect"] = (inspect_cli.cmd_inspect, COMMANDS["inspect"][1])
COMMANDS.update(TRAIN_COMMANDS)
COMMANDS.update(inspect_cli.COMMANDS)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="nincc", description="Caffe nets compiled to JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help=COMMANDS["inspect"][1])
    _net_args(p)
    p.add_argument("--format", default="table", choices=["table", "json", "dot"])
    p.add_argument("--weights", help="check a weights file against the net")
    inspect_cli.add_inspect_args(p)
    sub.add_parser("layers", help=COMMANDS["layers"][1])
    p = sub.add_parser("upgrade", help=COMMANDS["upgrade"][1])
    p.add_argument("input")
    p.add_argument("-o", "--output")
    p.add_argument("--solver", action="store_true", help="the input is a solver prototxt")
    p = sub.add_parser("run", help=COMMANDS["run"][1])
    _net_args(p)
    p.add_argument("--weights", help=".caffemodel, .caffemodel.h5, .npz or .safetensors")
    p.add_argument("--input", action="append", metavar="BLOB=FILE.npy")
    p.add_argument("--save", help="write the blobs to this .npz")
    p.add_argument("--blobs", type=lambda s: s.split(","), help="comma-separated blobs to keep")
    p.add_argument("--seed", type=int, default=0, help="filler / dropout seed")
    p.add_argument("-v", "--verbose", action="store_true")
    p = sub.add_parser("convert", help=COMMANDS["convert"][1])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--net", help="net prototxt (needed when the output holds layer definitions)")
    p.add_argument("-v", "--verbose", action="store_true", help="list skipped layers")
    p = sub.add_parser("quickstart", help=COMMANDS["quickstart"][1])
    p.add_argument("--data", default="data", help="folder for the databases (default data/)")
    p.add_argument("--max-iter", type=int, default=None, help="stop training earlier")
    add_train_parsers(sub)
    inspect_cli.add_parsers(sub)
    return ap


# Commands that run a net many times re-execute once with malloc keeping freed memory
# (nincc.malloc).
_LONG_RUNNING = ("train", "test", "time")


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None and args.command in _LONG_RUNNING:
        from .malloc import reexec_retaining

        reexec_retaining()
    args.argv = list(sys.argv[1:] if argv is None else argv)  # a supervised worker reruns it
    code = _run(args)
    from .parallel import exit_worker

    exit_worker(code)  # a failed worker of a multi-process job leaves at once
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return COMMANDS[args.command][0](args)
    except NinccError as e:
        print(f"nincc: error: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"nincc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("nincc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: one line for the user, the traceback with NINCC_DEBUG=1
        if os.environ.get("NINCC_DEBUG"):
            raise
        print(
            f"nincc: internal error: {type(e).__name__}: {e} (NINCC_DEBUG=1 shows where)",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())

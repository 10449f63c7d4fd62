"""Run one real-Caffe fixture case through nincc and compare every blob, diff and param diff."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import nincc
from nincc.compile import run_graph, total_loss


def close(name: str, got, ref, rel: float) -> str | None:
    """None if |got - ref| <= rel * max|ref| elementwise (the fixtures' rule), else a message."""
    got = np.asarray(got, np.float64)
    ref = np.asarray(ref, np.float64)
    if got.shape != ref.shape:
        return f"{name}: shape {got.shape} != Caffe's {ref.shape}"
    if ref.size == 0:
        return None
    scale = float(np.max(np.abs(ref)))
    err = float(np.max(np.abs(got - ref)))
    if err <= rel * scale or (scale == 0 and err == 0):
        return None
    return f"{name}: max error {err:.3g} > {rel:g} x scale {scale:.3g}"


def param_split(key: str) -> tuple[str, int]:
    layer, _, idx = key.rpartition("/")
    return layer, int(idx)


def load_params(case: Path, net: nincc.CompiledNet) -> dict[str, list]:
    """The case's weights read from the caffemodel Caffe wrote (weights_v1 for the V1 case),
    fitted to the net by Caffe's copy rules; params.npz only where a case has no caffemodel."""
    from nincc.caffemodel import load_params as load_weights
    from nincc.caffemodel import match_weights

    for name in ("weights.caffemodel", "weights_v1.caffemodel", "params.npz"):
        if (case / name).exists():
            params, _ = match_weights(load_weights(case / name), net.graph.weight_slots())
            return params
    raise FileNotFoundError(f"no weights in {case}")


def shaped_like_net(net: nincc.CompiledNet, params: dict) -> dict:
    """Reshape stored blobs to the net's shapes where only the legacy 4-D layout differs."""
    out = {}
    for name, shapes in net.graph.param_shapes().items():
        out[name] = [
            jnp.asarray(np.reshape(a, s)) for a, s in zip(params[name], shapes, strict=True)
        ]
    return out


def run_case(case: Path, fast: bool = True) -> list[str]:
    """All mismatches between nincc and Caffe for one case (empty list: it matches).
    ``fast=False`` checks the layer table's reference lowerings instead of nincc.fast's."""
    m = json.loads((case / "manifest.json").read_text())
    tol = m["tolerances"]
    graph = nincc.load_graph(case / "net.prototxt", phase=m["phase"], insert_splits=True)
    problems = []
    ours = [(layer.name, layer.type) for layer in graph.layers]
    theirs = [(layer["name"], layer["type"]) for layer in m["layers"]]
    if ours != theirs:
        problems.append(f"layers differ: {ours} vs Caffe's {theirs}")
        return problems
    net = nincc.compile(graph, fast=fast)
    params = shaped_like_net(net, load_params(case, net))
    with np.load(case / "inputs.npz", allow_pickle=False) as d:
        inputs = {k: d[k] for k in d.files}
    blobs, state = net.forward(params, inputs)
    with np.load(case / "forward.npz", allow_pickle=False) as d:
        for blob in d.files:
            if blob.startswith("param_after_forward/"):
                layer, i = param_split(blob.split("/", 1)[1])
                got = state[layer][i] if layer in state else params[layer][i]
                msg = close(blob, got, d[blob], tol["forward_rel"])
                if msg:
                    problems.append(msg)
                continue
            if blob not in blobs:
                problems.append(f"blob {blob} missing")
                continue
            msg = close(f"forward {blob}", blobs[blob], d[blob], tol["forward_rel"])
            if msg:
                problems.append(msg)
    bw = m.get("backward") or {}
    if not (case / "backward.npz").exists() or not isinstance(bw, dict):
        return problems
    problems += _check_backward(net, params, inputs, case, bw, tol["backward_rel"])
    return problems


def _check_backward(net, params, inputs, case, bw, rel) -> list[str]:
    graph = net.graph
    feeds = net._feeds(inputs)
    last = graph.blob_values()
    first = graph.first_values()
    with np.load(case / "backward.npz", allow_pickle=False) as d:
        ref = {k: d[k] for k in d.files}
    topdiffs = {
        k.split("/", 1)[1]: jnp.asarray(v) for k, v in ref.items() if k.startswith("topdiff/")
    }
    taps = {v.id: jnp.zeros(v.shape, jnp.float32) for v in graph.values}
    if net.dynamic:  # data-dependent shapes (Filter): tap the values as they come out
        env, _ = run_graph(graph, params, feeds, None, fast=net.fast)
        taps = {vid: jnp.zeros_like(x) for vid, x in env.items()}

    def objective(p, t):
        env, _ = run_graph(graph, p, feeds, None, taps=t, fast=net.fast)
        out = total_loss(graph, env)
        for blob, g in topdiffs.items():
            out = out + jnp.sum(env[last[blob]] * g)
        return out

    grad = jax.grad(objective, argnums=(0, 1))
    gp, gt = (grad if net.dynamic else jax.jit(grad))(params, taps)
    problems = []
    inputs_no_grad = set() if graph.force_backward else {graph.value(v).blob for v in graph.inputs}
    for blob in bw.get("diff_written_by_caffe", []):
        key = f"diff/{blob}"
        # Without force_backward an input needs no diff; a layer may still use that diff memory
        # as scratch (Caffe's Scale stores top_diff * bottom_data there): not a gradient.
        if key in ref and blob not in inputs_no_grad:
            msg = close(key, gt[first[blob]], ref[key], rel)
            if msg:
                problems.append(msg)
    for key, val in ref.items():
        if not key.startswith("param_diff/"):
            continue
        layer, i = param_split(key.split("/", 1)[1])
        spec = graph.layer(layer).params[i]
        owner, idx = spec.share or (layer, i)
        msg = close(key, np.reshape(gp[owner][idx], val.shape), val, rel)
        if msg:
            problems.append(msg)
    return problems

"""Loss layers and Accuracy against naive NumPy loops of Caffe's rules and real-Caffe fixtures.

Gradients are checked as Caffe computes them: the vjp of the 0-d loss top with cotangent equal to
the loss_weight (Caffe's top diff) must equal Caffe's Backward, including where that Backward is
not the derivative of the forward (clamped logs, the contrastive ``dist + 1e-4``).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2
from nincc.errors import DataError, GraphError, ShapeError
from nincc.layers.base import REGISTRY, LowerCtx

from ..conftest import fixture_case, manifest

FLT_MIN = float(np.finfo(np.float32).tiny)
RNG = np.random.default_rng(7)
MODES = ("VALID", "BATCH_SIZE", "FULL", "NONE")


# ---------------------------------------------------------------- helpers


def layer(text: str) -> caffe_pb2.LayerParameter:
    return text_format.Parse(text, caffe_pb2.LayerParameter())


def run(msg, bottoms, weight=1.0):
    """Forward through the entry's lower (jitted) and the vjp with top diff ``weight`` on top 0.

    Returns (tops, bottom diffs) as float64 NumPy arrays; label bottoms get diffs too (must be 0).
    """
    entry = REGISTRY[msg.type]
    attrs = entry.attrs(msg)
    bottoms = [np.asarray(b, np.float32) for b in bottoms]
    tshapes = entry.shape(attrs, [b.shape for b in bottoms])
    ctx = LowerCtx("TEST", msg.name or "t", top_names=tuple(msg.top))

    def f(bs):
        return entry.lower(attrs, [], list(bs), ctx)

    tops, vjp = jax.vjp(jax.jit(f), [jnp.asarray(b) for b in bottoms])
    assert len(tops) == len(msg.top)
    for t, s in zip(tops, tshapes[: len(tops)], strict=True):
        assert tuple(t.shape) == tuple(s)
    cot = [jnp.full(t.shape, weight if i == 0 else 0.0, jnp.float32) for i, t in enumerate(tops)]
    (diffs,) = vjp(cot)
    return [np.asarray(t, np.float64) for t in tops], [np.asarray(d, np.float64) for d in diffs]


def assert_close(got, ref, rel=1e-5, what=""):
    """The fixtures' rule: |got - ref| <= rel * max|ref| elementwise (exact when ref is 0)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    err = float(np.max(np.abs(got - ref))) if ref.size else 0.0
    assert err <= rel * scale or (scale == 0 and err == 0), f"{what}: err {err} scale {scale}"


def labels(shape, classes):
    return RNG.integers(0, classes, size=shape).astype(np.float64)


def split3(shape, axis):
    ax = axis % len(shape)
    return ax, math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1 :])


def normalizer(mode, outer, inner, valid):
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(n, 1)


def softmax_vec(v):
    e = np.exp(v - v.max())
    return e / e.sum()


# ---------------------------------------------------------------- naive references (Caffe's loops)


def ref_softmax_loss(x, label, axis=1, ignore=None, mode="VALID", w=1.0):
    _, outer, c, inner = split3(x.shape, axis)
    x3, lab = x.reshape(outer, c, inner), label.reshape(outer, inner)
    loss, n, dx = 0.0, 0, np.zeros(x3.shape)
    for i in range(outer):
        for j in range(inner):
            lv = int(lab[i, j])
            if ignore is not None and lv == ignore:
                continue
            p = softmax_vec(x3[i, :, j])
            loss -= math.log(max(p[lv], FLT_MIN))
            dx[i, :, j] = p
            dx[i, lv, j] -= 1
            n += 1
    norm = normalizer(mode, outer, inner, n)
    return loss / norm, (dx * w / norm).reshape(x.shape)


def ref_euclidean(a, b, w=1.0):
    n = a.shape[0]
    d = a - b.reshape(a.shape)
    return float(np.sum(d * d)) / n / 2, d * w / n, (-d * w / n).reshape(b.shape)


def ref_sigmoid_xent(x, t, ignore=None, mode="BATCH_SIZE", w=1.0):
    xf, tf = x.reshape(-1), t.reshape(-1)
    loss, n, dx = 0.0, 0, np.zeros(xf.shape)
    for i in range(xf.size):
        if ignore is not None and int(tf[i]) == ignore:
            continue
        pos = 1.0 if xf[i] >= 0 else 0.0
        loss -= xf[i] * (tf[i] - pos) - math.log(1 + math.exp(xf[i] - 2 * xf[i] * pos))
        dx[i] = 1 / (1 + math.exp(-xf[i])) - tf[i]
        n += 1
    norm = normalizer(mode, x.shape[0], xf.size // x.shape[0], n)
    return loss / norm, (dx * w / norm).reshape(x.shape)


def ref_hinge(s, label, norm="L1", w=1.0):
    num = s.shape[0]
    s2 = s.reshape(num, -1)
    loss, ds = 0.0, np.zeros(s2.shape)
    for i in range(num):
        for j in range(s2.shape[1]):
            t = 1.0 if j == int(label.reshape(-1)[i]) else -1.0
            m = max(0.0, 1 - t * s2[i, j])
            loss += m if norm == "L1" else m * m
            ds[i, j] = (-t * (m > 0)) if norm == "L1" else -2 * t * m
    return loss / num, (ds * w / num).reshape(s.shape)


def ref_contrastive(a, b, y, margin, legacy, w=1.0):
    n = a.shape[0]
    a2, b2 = a.reshape(n, -1), b.reshape(n, -1)
    loss, da = 0.0, np.zeros(a2.shape)
    for i in range(n):
        d = a2[i] - b2[i]
        d2 = float(d @ d)
        if int(y.reshape(-1)[i]):
            loss += d2
            da[i] = d * w / n
        elif legacy:
            loss += max(margin - d2, 0.0)
            da[i] = -d * w / n if margin - d2 > 0 else 0.0
        else:
            dist = math.sqrt(d2)
            loss += max(margin - dist, 0.0) ** 2
            beta = -(w / n) * (margin - dist) / (dist + 1e-4)
            da[i] = beta * d if margin - dist > 0 else 0.0
    return loss / n / 2, da.reshape(a.shape), -da.reshape(b.shape)


def ref_mlogistic(p, label, w=1.0):
    n = p.shape[0]
    p2 = p.reshape(n, -1)
    loss, dp = 0.0, np.zeros(p2.shape)
    for i in range(n):
        lv = int(label.reshape(-1)[i])
        q = max(p2[i, lv], np.float32(1e-20))
        loss -= math.log(q)
        dp[i, lv] = -w / n / q
    return loss / n, dp.reshape(p.shape)


def ref_infogain(x, label, H, axis=1, ignore=None, mode="VALID", w=1.0):
    _, outer, c, inner = split3(x.shape, axis)
    x3, lab = x.reshape(outer, c, inner), label.reshape(outer, inner)
    H = np.asarray(H, np.float64).reshape(c, c)
    loss, n, dx = 0.0, 0, np.zeros(x3.shape)
    for i in range(outer):
        for j in range(inner):
            lv = int(lab[i, j])
            if ignore is not None and lv == ignore:
                continue
            p = softmax_vec(x3[i, :, j])
            for k in range(c):
                loss -= H[lv, k] * math.log(max(p[k], 1e-20))
                dx[i, k, j] = p[k] * H[lv].sum() - H[lv, k]
            n += 1
    norm = normalizer(mode, outer, inner, n)
    return loss / norm, (dx * w / norm).reshape(x.shape)


def ref_accuracy(x, label, top_k=1, axis=1, ignore=None):
    _, outer, c, inner = split3(x.shape, axis)
    x3, lab = x.reshape(outer, c, inner), label.reshape(outer, inner)
    hits, n = 0, 0
    per_hit, per_n = np.zeros(c), np.zeros(c)
    for i in range(outer):
        for j in range(inner):
            lv = int(lab[i, j])
            if ignore is not None and lv == ignore:
                continue
            better = sum(1 for k in range(c) if x3[i, k, j] >= x3[i, lv, j]) - 1
            per_n[lv] += 1
            if better < top_k:
                hits += 1
                per_hit[lv] += 1
            n += 1
    per = np.where(per_n == 0, 0.0, per_hit / np.maximum(per_n, 1))
    return (hits / n if n else 0.0), per


def f32(*arrays):
    """Round inputs to float32 first, so the float64 references see what the layer sees."""
    return [np.asarray(np.asarray(a, np.float32), np.float64) for a in arrays]


# ---------------------------------------------------------------- SoftmaxWithLoss


def _loss_param(ignore, mode):
    inner = f"normalization: {mode}" + (f" ignore_label: {ignore}" if ignore is not None else "")
    return f"loss_param {{ {inner} }}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ignore", [None, 2])
def test_softmax_loss_modes(mode, ignore):
    x, lab = f32(RNG.standard_normal((6, 5)) * 2, labels((6,), 5))
    lab[:2] = 2  # make sure some labels are ignored
    msg = layer(
        f'type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" {_loss_param(ignore, mode)}'
    )
    (loss,), (dx, dl) = run(msg, [x, lab], weight=1.5)
    ref_loss, ref_dx = ref_softmax_loss(x, lab, ignore=ignore, mode=mode, w=1.5)
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx, 1e-4)
    assert not dl.any()


def test_softmax_loss_spatial_and_axis():
    x, lab = f32(RNG.standard_normal((2, 4, 3, 3)), labels((2, 1, 3, 3), 4))
    msg = layer(
        'type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" loss_param { ignore_label: 3 }'
    )
    (loss,), (dx, _) = run(msg, [x, lab], weight=0.5)
    ref_loss, ref_dx = ref_softmax_loss(x, lab, ignore=3, w=0.5)
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx, 1e-4)

    x, lab = f32(RNG.standard_normal((3, 2, 4)), labels((3, 2), 4))
    msg = layer(
        'type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" softmax_param {axis: 2}'
    )
    (loss,), (dx, _) = run(msg, [x, lab])
    ref_loss, ref_dx = ref_softmax_loss(x, lab, axis=2)
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx, 1e-4)


@pytest.mark.parametrize(
    "param, mode",
    [
        ("", "VALID"),
        ("loss_param { normalize: false }", "BATCH_SIZE"),
        ("loss_param { normalize: true }", "VALID"),
        ("loss_param { normalize: false normalization: FULL }", "FULL"),
        ("loss_param { normalization: NONE }", "NONE"),
    ],
)
def test_softmax_loss_normalization_rule(param, mode):
    msg = layer(f'type: "SoftmaxWithLoss" bottom: "x" bottom: "l" {param}')
    assert REGISTRY["SoftmaxWithLoss"].attrs(msg).normalization == mode


def test_softmax_loss_all_ignored_is_zero_not_nan():
    x, lab = RNG.standard_normal((3, 4)), np.full((3,), 1.0)
    msg = layer(
        'type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "o" loss_param {ignore_label: 1}'
    )
    (loss,), (dx, _) = run(msg, [x, lab])
    assert loss == 0.0 and not dx.any()


def test_softmax_loss_flt_min_clamp_keeps_caffe_gradient():
    # p[label] underflows to 0 in float32: the loss is -log(FLT_MIN) and the gradient is still
    # prob - onehot (Caffe's Backward), though the clamped forward is flat there.
    x = np.array([[0.0, 200.0, 0.0], [1.0, 2.0, 3.0]])
    lab = np.array([0.0, 2.0])
    msg = layer('type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "o"')
    (loss,), (dx, _) = run(msg, [x, lab])
    ref_loss, ref_dx = ref_softmax_loss(x, lab)
    assert_close(loss, ref_loss)
    assert abs(loss - (-math.log(FLT_MIN) - math.log(softmax_vec(x[1])[2])) / 2) < 1e-4
    assert_close(dx, ref_dx, 1e-4)
    assert dx[0, 0] == pytest.approx(-0.5, abs=1e-6)


def test_softmax_loss_probability_top_and_shapes():
    x, lab = RNG.standard_normal((2, 3, 2)), labels((2, 2), 3)
    msg = layer('type: "SoftmaxWithLoss" bottom: "x" bottom: "l" top: "loss" top: "prob"')
    (loss, prob), _ = run(msg, [x, lab])
    ref = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    assert_close(prob, ref)
    entry = REGISTRY["SoftmaxWithLoss"]
    attrs = entry.attrs(msg)
    with pytest.raises(ShapeError, match="label count"):
        entry.shape(attrs, [(2, 3, 2), (2, 3)])
    with pytest.raises(ShapeError, match="first dimension"):
        entry.shape(attrs, [(2, 3, 2), (4,)])


def test_loss_entries_flags():
    for name in ("SoftmaxWithLoss", "EuclideanLoss", "SigmoidCrossEntropyLoss", "HingeLoss"):
        assert REGISTRY[name].loss and REGISTRY[name].backward
    for name in ("ContrastiveLoss", "MultinomialLogisticLoss", "InfogainLoss"):
        assert REGISTRY[name].loss
    assert REGISTRY["ContrastiveLoss"].no_grad_bottoms == (2,)
    assert REGISTRY["InfogainLoss"].no_grad_bottoms == (1, 2)
    assert not REGISTRY["Accuracy"].loss and not REGISTRY["Accuracy"].backward


# ---------------------------------------------------------------- EuclideanLoss


def test_euclidean_loss():
    a, b = f32(RNG.standard_normal((3, 2, 2, 2)), RNG.standard_normal((3, 8)))
    msg = layer('type: "EuclideanLoss" bottom: "a" bottom: "b" top: "o"')
    (loss,), (da, db) = run(msg, [a, b], weight=2.0)
    ref_loss, ref_da, ref_db = ref_euclidean(a, b, w=2.0)
    assert_close(loss, ref_loss)
    assert_close(da, ref_da, 1e-4)
    assert_close(db, ref_db, 1e-4)
    with pytest.raises(ShapeError, match="same dimension"):
        REGISTRY["EuclideanLoss"].shape(None, [(3, 8), (3, 7)])


# ---------------------------------------------------------------- SigmoidCrossEntropyLoss


@pytest.mark.parametrize("mode", [None, *MODES])
@pytest.mark.parametrize("ignore", [None, -1])
def test_sigmoid_cross_entropy(mode, ignore):
    x = RNG.standard_normal((3, 5)) * 3
    x[0, 0], x[0, 1], x[1, 1] = 0.0, 120.0, -120.0  # the [x >= 0] switch and no overflow
    t = RNG.uniform(size=(3, 5))
    t[1, :2] = -1  # ignored only when ignore_label is -1
    x, t = f32(x, t)
    parts = [] if mode is None else [f"normalization: {mode}"]
    if ignore is not None:
        parts.append(f"ignore_label: {ignore}")
    msg = layer(
        f'type: "SigmoidCrossEntropyLoss" bottom: "x" bottom: "t" top: "o" '
        f"loss_param {{ {' '.join(parts)} }}"
    )
    (loss,), (dx, dt) = run(msg, [x, t], weight=1.5)
    ref_loss, ref_dx = ref_sigmoid_xent(x, t, ignore, mode or "BATCH_SIZE", w=1.5)
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx, 1e-4)
    assert not dt.any()


def test_sigmoid_cross_entropy_default_is_batch_size():
    entry = REGISTRY["SigmoidCrossEntropyLoss"]
    assert entry.attrs(layer('type: "SigmoidCrossEntropyLoss"')).normalization == "BATCH_SIZE"
    msg = layer('type: "SigmoidCrossEntropyLoss" loss_param { normalize: true }')
    assert entry.attrs(msg).normalization == "VALID"


# ---------------------------------------------------------------- HingeLoss


@pytest.mark.parametrize("norm", ["L1", "L2"])
def test_hinge_loss(norm):
    s, lab = f32(RNG.standard_normal((4, 5)), labels((4,), 5))
    lab[0] = 1
    s[0, 1] = 1.0  # true class exactly at the margin: zero margin, zero gradient
    s[0, 2] = -1.0  # other class exactly at the margin
    msg = layer(
        f'type: "HingeLoss" bottom: "s" bottom: "l" top: "o" hinge_loss_param {{norm: {norm}}}'
    )
    (loss,), (ds, dl) = run(msg, [s, lab], weight=0.7)
    ref_loss, ref_ds = ref_hinge(s, lab, norm, w=0.7)
    assert_close(loss, ref_loss)
    assert_close(ds, ref_ds, 1e-4)
    assert ds[0, 1] == 0 and ds[0, 2] == 0 and not dl.any()


# ---------------------------------------------------------------- ContrastiveLoss


@pytest.mark.parametrize("legacy", [False, True])
def test_contrastive_loss(legacy):
    a, b = f32(RNG.standard_normal((6, 3)) * 0.5, RNG.standard_normal((6, 3)) * 0.5)
    b[5] = a[5] + 3.0  # dissimilar pair beyond the margin: no gradient
    y = np.array([1.0, 0.0, 2.0, 0.7, 0.0, 0.0])  # int(y) != 0 is similar; 0.7 is dissimilar
    flag = "true" if legacy else "false"
    msg = layer(
        'type: "ContrastiveLoss" bottom: "a" bottom: "b" bottom: "y" top: "o" '
        f"contrastive_loss_param {{ margin: 1.5 legacy_version: {flag} }}"
    )
    (loss,), (da, db, dy) = run(msg, [a, b, y], weight=1.3)
    ref_loss, ref_da, ref_db = ref_contrastive(a, b, y, 1.5, legacy, w=1.3)
    assert_close(loss, ref_loss)
    assert_close(da, ref_da, 1e-4)
    assert_close(db, ref_db, 1e-4)
    assert not da[5].any() and not dy.any()


def test_contrastive_shape_checks():
    entry = REGISTRY["ContrastiveLoss"]
    attrs = entry.attrs(layer('type: "ContrastiveLoss"'))
    assert entry.shape(attrs, [(4, 3, 1, 1), (4, 3), (4, 1, 1, 1)]) == [()]
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(4, 3, 2), (4, 3, 2), (4,)])
    with pytest.raises(ShapeError):
        entry.shape(attrs, [(4, 3), (4, 3), (4, 2)])


# ---------------------------------------------------------------- MultinomialLogisticLoss


def test_multinomial_logistic_loss_and_threshold():
    p = RNG.uniform(0.05, 1.0, size=(5, 4))
    lab = labels((5,), 4)
    p[2, int(lab[2])] = 0.0  # clamped at 1e-20: Caffe's gradient is -w/N / 1e-20, not 0
    p, lab = f32(p, lab)
    msg = layer('type: "MultinomialLogisticLoss" bottom: "p" bottom: "l" top: "o"')
    (loss,), (dp, dl) = run(msg, [p, lab], weight=2.0)
    ref_loss, ref_dp = ref_mlogistic(p, lab, w=2.0)
    assert_close(loss, ref_loss)
    assert_close(dp, ref_dp, 1e-4)
    mask = np.ones(dp.shape, bool)
    mask[2, int(lab[2])] = False
    assert_close(dp[mask], ref_dp[mask], 1e-4)  # the ordinary entries, on their own scale
    assert not dl.any()


# ---------------------------------------------------------------- InfogainLoss


def write_blob(path, values, legacy_shape=None):
    blob = caffe_pb2.BlobProto()
    if legacy_shape:
        blob.num, blob.channels, blob.height, blob.width = legacy_shape
    else:
        blob.shape.dim.extend([len(values)])
    blob.data.extend(values)
    path.write_bytes(blob.SerializeToString())


@pytest.mark.parametrize("mode", MODES)
def test_infogain_from_file(tmp_path, monkeypatch, mode):
    H = RNG.uniform(0.0, 1.5, size=(4, 4)).astype(np.float32)
    write_blob(tmp_path / "H.binaryproto", H.reshape(-1).tolist(), (1, 1, 4, 4))
    monkeypatch.chdir(tmp_path)  # the relative source is read from the working directory
    x, lab = f32(RNG.standard_normal((5, 4)), labels((5,), 4))
    lab[0] = 3
    msg = layer(
        'type: "InfogainLoss" bottom: "x" bottom: "l" top: "o" '
        f'infogain_loss_param {{ source: "H.binaryproto" }} {_loss_param(3, mode)}'
    )
    (loss,), (dx, dl) = run(msg, [x, lab], weight=1.2)
    ref_loss, ref_dx = ref_infogain(x, lab, H, ignore=3, mode=mode, w=1.2)
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx, 1e-4)
    assert not dl.any()


def test_infogain_third_bottom_and_axis():
    x, lab = f32(RNG.standard_normal((2, 3, 3, 2)), labels((2, 3, 2), 3))
    H = f32(RNG.uniform(0.0, 1.0, size=(1, 1, 3, 3)))[0]
    msg = layer(
        'type: "InfogainLoss" bottom: "x" bottom: "l" bottom: "H" top: "o" top: "p" '
        "infogain_loss_param { axis: 1 }"
    )
    (loss, prob), (dx, dl, dh) = run(msg, [x, lab, H])
    ref_loss, ref_dx = ref_infogain(x, lab, H)
    assert_close(loss, ref_loss)
    assert_close(dx, ref_dx, 1e-4)
    assert_close(prob, np.exp(x) / np.exp(x).sum(axis=1, keepdims=True))
    assert not dl.any() and not dh.any()
    with pytest.raises(ShapeError, match="3 x 3"):
        entry = REGISTRY["InfogainLoss"]
        entry.shape(entry.attrs(msg), [(2, 3, 3, 2), (2, 3, 2), (2, 2)])


def test_infogain_errors(tmp_path, monkeypatch):
    entry = REGISTRY["InfogainLoss"]
    monkeypatch.chdir(tmp_path)
    base = 'name: "ig" type: "InfogainLoss" bottom: "x" bottom: "l" '
    with pytest.raises(DataError, match="missing.binaryproto"):
        entry.attrs(layer(base + 'infogain_loss_param { source: "missing.binaryproto" }'))
    with pytest.raises(GraphError, match="source"):
        entry.attrs(layer(base))
    write_blob(tmp_path / "H.bp", [1.0] * 9)
    with pytest.raises(GraphError, match="normalize"):
        entry.attrs(
            layer(base + 'infogain_loss_param { source: "H.bp" } loss_param {normalize: true}')
        )
    attrs = entry.attrs(layer(base + 'infogain_loss_param { source: "H.bp" }'))
    assert attrs.H == (1.0,) * 9 and hash(attrs)
    with pytest.raises(ShapeError, match="4 x 4"):
        entry.shape(attrs, [(2, 4), (2,)])


# ---------------------------------------------------------------- Accuracy


@pytest.mark.parametrize(
    "param, top_k, ignore",
    [
        ("", 1, None),
        ("accuracy_param { top_k: 3 }", 3, None),
        ("accuracy_param { ignore_label: 2 }", 1, 2),
    ],
)
def test_accuracy(param, top_k, ignore):
    x = np.round(RNG.standard_normal((10, 5)), 1)  # one decimal: many ties
    lab = labels((10,), 5)
    x[0, :] = 0.5  # all tied: correct only when top_k covers every class
    msg = layer(f'type: "Accuracy" bottom: "x" bottom: "l" top: "a" top: "pc" {param}')
    (acc, per), _ = run(msg, [x, lab])
    ref_acc, ref_per = ref_accuracy(x, lab, top_k, ignore=ignore)
    assert_close(acc, ref_acc)
    assert_close(per, ref_per)


def test_accuracy_tie_counts_against_true_class():
    x = np.array([[1.0, 2.0, 2.0], [3.0, 1.0, 0.0]])
    lab = np.array([1.0, 0.0])
    msg = layer('type: "Accuracy" bottom: "x" bottom: "l" top: "a"')
    (acc,), _ = run(msg, [x, lab])
    assert acc == 0.5  # sample 0 is tied with class 2 and so not top-1
    msg = layer('type: "Accuracy" bottom: "x" bottom: "l" top: "a" accuracy_param {top_k: 2}')
    (acc,), _ = run(msg, [x, lab])
    assert acc == 1.0


def test_accuracy_spatial_and_checks():
    x, lab = RNG.standard_normal((2, 5, 3, 3)), labels((2, 3, 3), 5)
    param = "accuracy_param { axis: 1 ignore_label: 4 }"
    msg = layer(f'type: "Accuracy" bottom: "x" bottom: "l" top: "a" {param}')
    (acc,), _ = run(msg, [x, lab])
    assert_close(acc, ref_accuracy(x, lab, ignore=4)[0])
    msg = layer(
        'type: "Accuracy" bottom: "x" bottom: "l" top: "a" accuracy_param {ignore_label: 0}'
    )
    (acc,), _ = run(msg, [RNG.standard_normal((3, 2)), np.zeros(3)])
    assert acc == 0.0  # nothing counted
    entry = REGISTRY["Accuracy"]
    with pytest.raises(ShapeError, match="top_k"):
        entry.shape(
            entry.attrs(layer('type: "Accuracy" accuracy_param {top_k: 6}')), [(4, 5), (4,)]
        )
    assert entry.shape(entry.attrs(layer('type: "Accuracy"')), [(4, 5), (4,)]) == [(), (5,)]


# ---------------------------------------------------------------- real-Caffe fixtures


def fixture_layers(case):
    """(layer message, manifest entry) of each non-Input, non-Split layer of a fixture case."""
    path = fixture_case(case)
    net = text_format.Parse((path / "net.prototxt").read_text(), caffe_pb2.NetParameter())
    by_name = {m.name: m for m in net.layer}
    return path, [
        (by_name[e["name"]], e)
        for e in manifest(case)["layers"]
        if e["type"] not in ("Input", "Split")
    ]


@pytest.mark.parametrize("case", ["losses", "softmax_loss_modes"])
def test_loss_fixtures(case, monkeypatch):
    path, entries = fixture_layers(case)
    monkeypatch.chdir(path)  # InfogainLoss reads infogain_H.binaryproto relative to the case
    tol = manifest(case)["tolerances"]
    fwd, bwd = np.load(path / "forward.npz"), np.load(path / "backward.npz")
    for msg, e in entries:
        top = e["tops"][0]
        weight = float(bwd[f"diff/{top}"])  # Caffe's loss top diff = loss_weight
        (loss,), diffs = run(msg, [fwd[b] for b in e["bottoms"]], weight=weight)
        assert_close(loss, fwd[top], tol["forward_rel"], f"{case}/{e['name']}")
        for b, d in zip(e["bottoms"], diffs, strict=True):
            assert_close(d, bwd[f"diff/{b}"], tol["backward_rel"], f"{case}/{e['name']}/{b}")


@pytest.mark.parametrize("case", ["accuracy_topk", "ties"])
def test_accuracy_fixtures(case):
    path, entries = fixture_layers(case)
    fwd = np.load(path / "forward.npz")
    tol = manifest(case)["tolerances"]["forward_rel"]
    checked = 0
    for msg, e in entries:
        if e["type"] != "Accuracy":
            continue
        tops, _ = run(msg, [fwd[b] for b in e["bottoms"]])
        for t, name in zip(tops, e["tops"], strict=True):
            assert_close(t, fwd[name], tol, f"{case}/{name}")
        checked += 1
    assert checked >= 2

"""nincc.onednn: convolutions through oneDNN custom calls equal a naive float64 loop (forward
and all three gradients) over stride, asymmetric padding, groups, dilation and the zoo's
geometries; the switch and the backend rule; errors surface as XLA errors, not crashes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nincc import fast, onednn

from .test_fast import assert_close, layer_attrs

pytestmark = pytest.mark.skipif(
    not onednn.available(), reason="oneDNN is not installed (pip install 'nincc[onednn]')"
)


def naive_conv(x, w, b, stride, padding, dilation, group, ct=None):
    """Caffe's convolution as a loop over kernel taps in float64 (NHWC x, (o, c/g, kh, kw) w):
    y, or with a cotangent ``ct`` the loop's adjoints (dx, dw, db)."""
    x = np.asarray(x, np.float64)
    w = np.asarray(w, np.float64)
    (plh, phh), (plw, phw) = padding
    xp = np.pad(x, ((0, 0), (plh, phh), (plw, phw), (0, 0)))
    n, hp, wp, c = xp.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (dh, dw) = stride, dilation
    oh = (hp - (dh * (kh - 1) + 1)) // sh + 1
    ow = (wp - (dw * (kw - 1) + 1)) // sw + 1
    og = o // group
    y = np.zeros((n, oh, ow, o))
    dxp, dwt = np.zeros_like(xp), np.zeros_like(w)
    for g in range(group):
        ci, co = slice(g * cg, (g + 1) * cg), slice(g * og, (g + 1) * og)
        for i in range(kh):
            for j in range(kw):
                rows = slice(i * dh, i * dh + sh * (oh - 1) + 1, sh)
                cols = slice(j * dw, j * dw + sw * (ow - 1) + 1, sw)
                patch = xp[:, rows, cols, ci]
                if ct is None:
                    y[..., co] += patch @ w[co, :, i, j].T
                else:
                    dxp[:, rows, cols, ci] += ct[..., co] @ w[co, :, i, j]
                    dwt[co, :, i, j] += np.einsum("nhwo,nhwc->oc", ct[..., co], patch)
    if ct is not None:
        dx = dxp[:, plh : plh + x.shape[1], plw : plw + x.shape[2], :]
        return dx, dwt, ct.sum(axis=(0, 1, 2))
    if b is not None:
        y += np.asarray(b, np.float64)
    return y


# n, h, w, c, o, kernel, stride, padding ((low, high), (low, high)), dilation, group, bias
CASES = [
    (2, 9, 9, 4, 6, (3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), 1, True),
    (2, 10, 11, 4, 6, (3, 3), (2, 2), ((1, 0), (0, 1)), (1, 1), 1, True),  # asymmetric
    (3, 11, 11, 6, 8, (3, 3), (1, 1), ((2, 2), (2, 2)), (2, 2), 2, False),  # dilated, grouped
    (2, 8, 7, 3, 5, (1, 1), (1, 1), ((0, 0), (0, 0)), (1, 1), 1, True),  # 1x1
    (2, 9, 9, 8, 6, (1, 1), (2, 2), ((0, 0), (0, 0)), (1, 1), 2, True),  # strided grouped 1x1
    (2, 13, 12, 3, 8, (5, 5), (3, 3), ((1, 2), (1, 2)), (1, 1), 1, True),
    (1, 7, 9, 5, 4, (3, 2), (2, 1), ((1, 1), (0, 0)), (1, 1), 1, True),  # rectangular
    (2, 35, 35, 3, 8, (11, 11), (4, 4), ((0, 0), (0, 0)), (1, 1), 1, True),  # NIN ImageNet
    (2, 16, 16, 32, 24, (5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1), 1, True),  # NIN CIFAR-10
]


@pytest.mark.parametrize("n,h,w,c,o,kernel,stride,padding,dilation,group,bias", CASES)
def test_conv_and_gradients_match_a_naive_loop(
    n, h, w, c, o, kernel, stride, padding, dilation, group, bias
):
    rng = np.random.default_rng(n + h + c + o)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((o, c // group, *kernel)) * 0.2, jnp.float32)
    b = jnp.asarray(rng.standard_normal(o), jnp.float32) if bias else None

    def f(x, k, b):
        return onednn.conv(x, k, b, stride, padding, dilation, group)

    y = jax.jit(f)(x, k, b)
    ref = naive_conv(x, k, b, stride, padding, dilation, group)
    assert_close(y, ref, 1e-5, "forward")

    ct = rng.standard_normal(ref.shape).astype(np.float32)
    grads = jax.jit(jax.grad(lambda *a: jnp.vdot(f(*a), ct), (0, 1, 2)))(x, k, b)
    want = naive_conv(x, k, b, stride, padding, dilation, group, ct.astype(np.float64))
    for name, got, ref_g in zip(("dx", "dw", "db"), grads, want):
        if name == "db" and not bias:
            assert got is None
            continue
        assert_close(got, ref_g, 1e-5, name)


def test_custom_calls_in_the_jaxpr_and_none_when_switched_off(monkeypatch):
    """With the switch on, a fast convolution's forward and gradients are oneDNN custom calls;
    NINCC_ONEDNN=0 leaves XLA's convolutions."""
    attrs = layer_attrs("Convolution", "convolution_param { num_output: 4 kernel_size: 3 }")
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal((4, 3, 3, 3)), jnp.float32), jnp.zeros(4)]
    x = jnp.asarray(rng.standard_normal((2, 3, 8, 8)), jnp.float32)

    def names(switch):
        monkeypatch.setenv(onednn.OPT_OUT, switch)
        lower = fast.lowering_for("Convolution", attrs, [x.shape])
        loss = lambda p, b: lower(attrs, p, b, None)[0].sum()  # noqa: E731
        text = str(jax.make_jaxpr(jax.grad(loss, (0, 1)))(params, [x]))
        return text.count("nincc_onednn_fwd"), text.count("nincc_onednn_bwd"), text

    fwd, bwd, _ = names("1")
    assert fwd == 1 and bwd == 2
    fwd, bwd, text = names("0")
    assert fwd == bwd == 0 and "conv_general_dilated" in text


@pytest.mark.parametrize(
    "env,backend,expected",
    [({}, "cpu", True), ({"NINCC_ONEDNN": "0"}, "cpu", False), ({}, "gpu", False),
     ({"NINCC_ONEDNN": "off"}, "cpu", False), ({"NINCC_ONEDNN": "1"}, "tpu", False)],
)
def test_onednn_only_on_the_cpu_unless_turned_off(env, backend, expected):
    assert onednn.enabled(env, backend) is expected


def test_other_dtypes_keep_xla():
    assert onednn.supports(np.float32, np.float32)
    assert not onednn.supports(np.float16, np.float32)
    assert not fast.uses_onednn(np.float32, np.float32, (0, 3, 4, 4))


def test_a_failing_primitive_is_an_xla_error_not_a_crash():
    """An exception inside a handler reaches the caller as the computation's error."""

    def run(ins, outs):
        raise onednn.OneDNNError("oneDNN execution failed (status 5)")

    name = onednn._target("nincc_onednn_test_failure", run)
    call = jax.ffi.ffi_call(name, jax.ShapeDtypeStruct((2,), jnp.float32))
    with pytest.raises(Exception, match="status 5"):
        jax.block_until_ready(jax.jit(lambda a: call(a))(jnp.ones(2)))


def test_the_library_names_its_kernels():
    spec = onednn.ConvSpec(1, 8, 8, 16, 16, (3, 3), (1, 1), (1, 1), (1, 1), (1, 1), 1, True)
    assert onednn.version().startswith("3.")
    for direction in ("forward", "backward_data", "backward_weights"):
        assert onednn.implementation(spec, direction)


_FILL = 'weight_filler { type: "gaussian" std: 0.3 }'
FUSION_NET = """
name: "fusion"
input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 9 }
layer { name: "c1" type: "Convolution" bottom: "data" top: "c1"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 FILL
                            bias_filler { type: "gaussian" std: 0.3 } } }
layer { name: "r1" type: "ReLU" bottom: "c1" top: "c1" }
layer { name: "c2" type: "Convolution" bottom: "c1" top: "c2"
        convolution_param { num_output: 8 kernel_size: 1 FILL } }
layer { name: "r2" type: "ReLU" bottom: "c2" top: "c2" relu_param { negative_slope: 0.25 } }
layer { name: "c3" type: "Convolution" bottom: "c2" top: "c3"
        convolution_param { num_output: 6 kernel_size: 3 stride: 2 FILL } }
layer { name: "r3" type: "ReLU" bottom: "c3" top: "r3" }
layer { name: "c4" type: "Convolution" bottom: "r3" top: "c4"
        convolution_param { num_output: 4 kernel_size: 1 FILL } }
layer { name: "split" type: "Split" bottom: "c4" top: "c4a" top: "c4b" }
layer { name: "r4" type: "ReLU" bottom: "c4a" top: "c4a" }
layer { name: "sum" type: "Eltwise" bottom: "c4a" bottom: "c4b" top: "sum" }
layer { name: "c5" type: "Convolution" bottom: "sum" top: "c5"
        convolution_param { num_output: 5 kernel_size: 3 pad: 1 FILL } }
layer { name: "r5" type: "ReLU" bottom: "c5" top: "c5" relu_param { negative_slope: 0.5 } }
layer { name: "p5" type: "Pooling" bottom: "c5" top: "p5"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "c6" type: "Convolution" bottom: "p5" top: "c6"
        convolution_param { num_output: 6 kernel_size: 1 FILL } }
layer { name: "r6" type: "ReLU" bottom: "c6" top: "c6" }
layer { name: "p6a" type: "Pooling" bottom: "c6" top: "p6a"
        pooling_param { pool: MAX kernel_size: 2 stride: 1 } }
layer { name: "p6b" type: "Pooling" bottom: "c6" top: "p6b"
        pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "c7" type: "Convolution" bottom: "p6b" top: "c7"
        convolution_param { num_output: 4 kernel_size: 1 FILL } }
layer { name: "r7" type: "ReLU" bottom: "c7" top: "c7" }
layer { name: "p7" type: "Pooling" bottom: "c7" top: "p7"
        pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
layer { name: "out" type: "Concat" bottom: "p6a" bottom: "p7" top: "out" }
""".replace("FILL", _FILL)


def test_conv_relu_fusion_picks_in_place_pairs_and_matches_the_table(tmp_path):
    """In-place ReLUs after oneDNN convolutions are fused (leaky ones too); a ReLU writing
    another blob, or a convolution whose top is tapped, is not. Each fused ReLU's backward
    reads what suits its readers. Forward and gradients match the layer table's lowerings
    either way."""
    import nincc
    from nincc.compile import pooled_relus, relu_fusions, run_graph

    path = tmp_path / "fusion.prototxt"
    path.write_text(FUSION_NET)
    graph = nincc.load_graph(path)
    # r1's and r2's tops feed convolutions, which keep them: their backwards read the top.
    # r5's and r6's feed MAX poolings only, which apply the ReLU's backward; r7's feeds an
    # AVE pooling: a bit mask. r3 writes another blob; c4's top is split.
    fusions = {
        "c1": ("r1", 0.0, "top"),
        "c2": ("r2", 0.25, "top"),
        "c5": ("r5", 0.5, "pooling"),
        "c6": ("r6", 0.0, "pooling"),
        "c7": ("r7", 0.0, "mask"),
    }
    assert relu_fusions(graph) == fusions
    assert pooled_relus(relu_fusions(graph), graph) == {"p5": 0.5, "p6a": 0.0, "p6b": 0.0}
    c1 = graph.layer("c1").tops[0]
    assert relu_fusions(graph, taps={c1}) == {k: v for k, v in fusions.items() if k != "c1"}
    r6 = graph.layer("r6").tops[0]
    assert relu_fusions(graph, taps={r6})["c6"] == ("r6", 0.0, "mask")
    assert relu_fusions(graph, fast=("Convolution",)) == {}

    params = nincc.compile(graph, jit=False).init(seed=0)
    rng = np.random.default_rng(0)
    feeds = {"data": jnp.asarray(rng.standard_normal((2, 3, 9, 9)), jnp.float32)}
    out = graph.blob_values()["out"]

    def value_and_grad(use_fast):
        def objective(p):
            env, _ = run_graph(graph, p, feeds, fast=use_fast)
            return jnp.sum(env[out] ** 2)

        return jax.jit(jax.value_and_grad(objective))(params)

    text = str(jax.make_jaxpr(lambda p: run_graph(graph, p, feeds)[0][out])(params))
    assert text.count("relu0p0") == 3 and text.count("relu0p25") == 1 and "relu0p5" in text
    ref_value, ref = value_and_grad(False)
    value, got = value_and_grad(True)
    assert_close(value, ref_value, 1e-5, "objective")
    for name in ref:
        for i, (g, r) in enumerate(zip(got[name], ref[name], strict=True)):
            assert_close(g, r, 1e-4, f"{name}[{i}]")


# ---------------------------------------------------------------- 1x1 convolutions as products


@pytest.mark.parametrize(
    "relu,residual",
    [(None, "mask"), (0.0, "mask"), (0.1, "mask"), (0.0, "top"), (0.1, "pooling")],
)
@pytest.mark.parametrize("bias", [True, False])
def test_pointwise_product_equals_the_naive_loop(relu, residual, bias):
    """A 1x1 convolution as oneDNN's matrix product (fast._onednn_pointwise), with its bias
    and ReLU post-ops (the ReLU's backward from a bit mask or from the top, or left to the
    MAX poolings after it): forward and the three gradients against the float64 loop."""
    from functools import partial

    from nincc import onednn_matmul

    rng = np.random.default_rng(int(bias) + (0 if relu is None else 2 + int(relu * 10)))
    x = rng.standard_normal((2, 3, 4, 7)).astype(np.float32)
    w = rng.standard_normal((5, 7, 1, 1)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32) if bias else None
    geom = ((1, 1), ((0, 0), (0, 0)), (1, 1), 1)
    pre = naive_conv(x, w, b, *geom)
    ref = pre if relu is None else np.where(pre > 0, pre, pre * relu)
    run = partial(fast._onednn_pointwise, relu, residual)
    bias_arg = onednn_matmul.bias_arg(None if b is None else jnp.asarray(b))
    y = jax.jit(run)(x, w, bias_arg)
    text = str(jax.make_jaxpr(run)(x, w, bias_arg))
    assert "nincc_onednn_matmul" in text and "nincc_onednn_fwd" not in text
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    ct = rng.standard_normal(ref.shape)
    grads = jax.jit(jax.grad(lambda x, w, b: jnp.sum(run(x, w, b) * ct), argnums=(0, 1, 2)))(
        x, w, bias_arg
    )
    ct_pre = ct if relu is None or residual == "pooling" else np.where(pre > 0, ct, ct * relu)
    for name, got, want in zip(("dx", "dw", "db"), grads, naive_conv(x, w, b, *geom, ct=ct_pre),
                               strict=True):
        if name == "db" and not bias:
            assert got.shape == (0,)
            continue
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize(
    "shape,body,product",
    [
        ((2, 48, 3, 3), "num_output: 40 kernel_size: 1", True),  # 18 pixels, 48 channels
        ((2, 8, 20, 20), "num_output: 6 kernel_size: 1", False),  # 800 pixels, 8 channels
        ((2, 48, 3, 3), "num_output: 40 kernel_size: 1 stride: 2", False),
        ((2, 48, 3, 3), "num_output: 40 kernel_size: 1 pad: 1", False),
        ((2, 48, 3, 3), "num_output: 40 kernel_size: 1 group: 2", False),
        ((2, 48, 3, 3), "num_output: 40 kernel_size: 3", False),
    ],
)
def test_few_pixel_pointwise_layers_run_as_a_product(shape, body, product):
    """Which oneDNN convolutions run as the product (1x1, stride 1, no pad, one group, at most
    POINTWISE_MATMUL_ROWS pixels per channel), and either way the layer matches the table."""
    from nincc.layers.base import REGISTRY

    from .test_fast import compare

    attrs = layer_attrs("Convolution", f"convolution_param {{ {body} }}")
    rng = np.random.default_rng(len(body))
    specs = REGISTRY["Convolution"].blobs(attrs, [shape])
    params = [jnp.asarray(rng.standard_normal(s.shape) * 0.3, jnp.float32) for s in specs]
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    lower = fast.lowering_for("Convolution", attrs, [shape])
    text = str(jax.make_jaxpr(lambda p, b: lower(attrs, p, b, None))(params, [x]))
    assert ("nincc_onednn_matmul" in text) is product
    assert ("nincc_onednn_fwd" in text) is not product
    compare("Convolution", attrs, params, [x])


# ---------------------------------------------------------------- MAX pooling (nincc.onednn_pool)


def naive_max_pool(x, kernel, stride, pad, out, ct=None):
    """Caffe's MAX pooling as a loop over windows (NHWC x): windows clipped to the input, the
    first strictly greater value from -FLT_MAX wins; y, or with ``ct`` the input gradient."""
    n, h, w, c = x.shape
    y = np.full((n, *out, c), -np.finfo(np.float32).max, np.float64)
    dx = np.zeros(x.shape, np.float64)
    for oi in range(out[0]):
        for oj in range(out[1]):
            h0, w0 = oi * stride[0] - pad[0], oj * stride[1] - pad[1]
            for b in range(n):
                for ch in range(c):
                    best, at = y[b, oi, oj, ch], None
                    for i in range(max(h0, 0), min(h0 + kernel[0], h)):
                        for j in range(max(w0, 0), min(w0 + kernel[1], w)):
                            if x[b, i, j, ch] > best:
                                best, at = x[b, i, j, ch], (i, j)
                    y[b, oi, oj, ch] = best
                    if ct is not None and at is not None:
                        dx[b, at[0], at[1], ch] += ct[b, oi, oj, ch]
    return y if ct is None else dx


# kernel, stride, pad, h, w: the zoo's 3x3/2 (ceil overhang and exact), GoogLeNet's 3x3/1 pad
# 1, a rectangular padded one, Caffe's clipped last window, stride > kernel
POOL_CASES = [
    ((3, 3), (2, 2), (0, 0), 8, 8),
    ((3, 3), (2, 2), (0, 0), 9, 9),
    ((3, 3), (1, 1), (1, 1), 6, 6),
    ((3, 2), (2, 3), (1, 1), 9, 8),
    ((5, 5), (3, 3), (2, 2), 10, 10),
    ((2, 2), (3, 3), (0, 0), 8, 8),
]


@pytest.mark.parametrize("kernel,stride,pad,h,w", POOL_CASES)
def test_max_pooling_equals_caffes_loop(kernel, stride, pad, h, w):
    from nincc import onednn_pool
    from nincc.layers.vision import _pool_geom

    rng = np.random.default_rng(h * w + kernel[0])
    # small integers after a ReLU: most windows hold several maxima (ties go to the first)
    x = np.maximum(rng.integers(-2, 3, (2, h, w, 5)), 0).astype(np.float32)
    x[0, :3, :3, 0] = -np.inf  # a window with no winner: -FLT_MAX and no gradient
    g = _pool_geom("MAX", kernel, stride, pad, True, (h, w))
    spec = onednn_pool.usable(x.shape, g)
    assert spec is not None
    y = jax.jit(lambda a: onednn_pool.pool(spec, a))(x)
    np.testing.assert_array_equal(np.asarray(y), naive_max_pool(x, kernel, stride, pad, g.out))
    ct = rng.standard_normal(y.shape).astype(np.float32)
    dx = jax.jit(jax.grad(lambda a: jnp.sum(onednn_pool.pool(spec, a) * ct)))(x)
    ref = naive_max_pool(x, kernel, stride, pad, g.out, ct)
    np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-6, atol=1e-6)


def naive_ave_pool(x, kernel, stride, pad, out, ct=None):
    """Caffe's AVE pooling as a loop (NHWC x): each window's sum over the input it covers,
    divided by its extent clipped to the padded input (padding counted, the overhang past it
    not); y, or with ``ct`` the input gradient."""
    n, h, w, c = x.shape
    y = np.zeros((n, *out, c))
    dx = np.zeros(x.shape)
    for oi in range(out[0]):
        for oj in range(out[1]):
            h0, w0 = oi * stride[0] - pad[0], oj * stride[1] - pad[1]
            h1, w1 = min(h0 + kernel[0], h + pad[0]), min(w0 + kernel[1], w + pad[1])
            size = (h1 - h0) * (w1 - w0)
            rows, cols = slice(max(h0, 0), min(h1, h)), slice(max(w0, 0), min(w1, w))
            y[:, oi, oj, :] = x[:, rows, cols, :].astype(np.float64).sum(axis=(1, 2)) / size
            if ct is not None:
                dx[:, rows, cols, :] += ct[:, oi, oj, None, None, :] / size
    return y if ct is None else dx


# kernel, stride, pad, h, w: NIN CIFAR-10's pool2 (no padding, a clipped last window), an
# exact fit, global pooling, padded windows within the padding (rectangular too)
AVE_CASES = [
    ((3, 3), (2, 2), (0, 0), 16, 16),
    ((3, 3), (2, 2), (0, 0), 9, 9),
    ((8, 8), (1, 1), (0, 0), 8, 8),
    ((3, 3), (2, 2), (1, 1), 9, 9),
    ((4, 3), (2, 3), (1, 1), 10, 11),
    ((3, 3), (1, 1), (1, 1), 6, 6),
]


@pytest.mark.parametrize("kernel,stride,pad,h,w", AVE_CASES)
def test_ave_pooling_equals_caffes_loop(kernel, stride, pad, h, w):
    from nincc import onednn_pool
    from nincc.layers.vision import _pool_geom

    rng = np.random.default_rng(h * w + kernel[0])
    x = rng.standard_normal((2, h, w, 5)).astype(np.float32)
    g = _pool_geom("AVE", kernel, stride, pad, True, (h, w))
    spec = onednn_pool.usable(x.shape, g)
    assert spec is not None
    text = str(jax.make_jaxpr(lambda a: onednn_pool.pool(spec, a))(x))
    assert "avg" in text and "nincc_onednn_maxpool" not in text
    y = jax.jit(lambda a: onednn_pool.pool(spec, a))(x)
    ref = naive_ave_pool(x, kernel, stride, pad, g.out)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    ct = rng.standard_normal(y.shape).astype(np.float32)
    dx = jax.jit(jax.grad(lambda a: jnp.sum(onednn_pool.pool(spec, a) * ct)))(x)
    ref = naive_ave_pool(x, kernel, stride, pad, g.out, ct)
    np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-5, atol=1e-6)


def test_pooling_runs_on_onednn_where_it_can(monkeypatch):
    from nincc import onednn_pool
    from nincc.layers.vision import _pool_geom

    g = _pool_geom("MAX", (3, 3), (2, 2), (0, 0), True, (27, 27))
    assert onednn_pool.usable((2, 27, 27, 8), g) is not None
    assert onednn_pool.usable((2, 27, 27, 8), g, np.float64) is None
    ave = _pool_geom("AVE", (3, 3), (2, 2), (0, 0), True, (27, 27))
    assert onednn_pool.usable((2, 27, 27, 8), ave) is not None
    # padding, and a last window past it: Caffe's divisors mix the full window and clipped
    # ones, which neither of oneDNN's averages gives
    mixed = _pool_geom("AVE", (3, 3), (2, 2), (1, 1), True, (8, 8))
    assert mixed.out == (5, 5)
    assert onednn_pool.usable((2, 8, 8, 4), mixed) is None
    attrs = layer_attrs("Pooling", "pooling_param { pool: MAX kernel_size: 3 stride: 2 }")
    assert fast.forward_note("Pooling", attrs, [(2, 8, 27, 27)]) == "oneDNN"
    mixed_attrs = layer_attrs(
        "Pooling", "pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 }"
    )
    assert fast.forward_note("Pooling", mixed_attrs, [(2, 4, 8, 8)]) == ""
    monkeypatch.setenv(onednn.OPT_OUT, "0")
    assert onednn_pool.usable((2, 27, 27, 8), g) is None
    assert fast.forward_note("Pooling", attrs, [(2, 8, 27, 27)]) == ""


# ---------------------------------------------------------------- LRN (nincc.onednn_lrn)


def naive_lrn(x, size, alpha, beta, k, ct=None):
    """Caffe's ACROSS_CHANNELS LRN in float64, channel by channel (NHWC x): y = x * s^-beta
    with s = k + alpha/size * (sum of x^2 over the size channels centred on x, zero past the
    ends); or with ``ct`` its exact input gradient, tap by tap."""
    x = np.asarray(x, np.float64)
    c, half = x.shape[3], (size - 1) // 2
    window = [range(max(0, ch - half), min(c, ch + half + 1)) for ch in range(c)]
    sums = [sum(x[..., j] ** 2 for j in window[ch]) for ch in range(c)]
    s = k + alpha / size * np.stack(sums, -1)
    if ct is None:
        return x * s**-beta
    dx = ct * s**-beta
    for ch in range(c):  # y[ch] depends on x[j] for j in its window through s[ch]
        common = ct[..., ch] * x[..., ch] * -beta * s[..., ch] ** (-beta - 1) * alpha / size
        for j in window[ch]:
            dx[..., j] += common * 2 * x[..., j]
    return dx


# (channels, local_size, alpha, beta, k): NIN-ZFNet's and AlexNet's constants, a large alpha
# so the window term matters, the two betas oneDNN has vector kernels for, k other than 1,
# fewer channels than the window, a narrower and a wider window
LRN_CASES = [
    (96, 5, 1e-4, 0.75, 1.0),
    (20, 5, 2.0, 0.75, 1.0),
    (16, 3, 1.5, 1.0, 2.0),
    (12, 7, 0.8, 0.75, 1.5),
    (2, 5, 3.0, 1.0, 1.0),
]


@pytest.mark.parametrize("c,size,alpha,beta,k", LRN_CASES)
def test_lrn_equals_caffes_formula(c, size, alpha, beta, k):
    from nincc import onednn_lrn

    rng = np.random.default_rng(c + size)
    x = (rng.standard_normal((2, 5, 4, c)) * 2).astype(np.float32)
    spec = onednn_lrn.usable(x.shape, size, alpha, beta, k)
    assert spec is not None
    y = jax.jit(lambda a: onednn_lrn.lrn(spec, a))(x)
    ref = naive_lrn(x, size, alpha, beta, k)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    ct = rng.standard_normal(x.shape).astype(np.float32)
    dx = jax.jit(jax.grad(lambda a: jnp.sum(onednn_lrn.lrn(spec, a) * ct)))(x)
    ref = naive_lrn(x, size, alpha, beta, k, ct)
    np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-5, atol=1e-5)


def naive_lrn_within(x, size, alpha, beta, ct=None):
    """Caffe's WITHIN_CHANNEL LRN in float64 (NHWC x): y = x * s^-beta with s = 1 + alpha /
    size^2 * (sum of x^2 over the size x size window centred on x, zero outside); or with
    ``ct`` its exact input gradient, window offset by window offset."""
    x = np.asarray(x, np.float64)
    pad = (size - 1) // 2
    h, w = x.shape[1:3]
    offsets = [(i, j) for i in range(-pad, pad + 1) for j in range(-pad, pad + 1)]

    def shifted(v, i, j):  # out[a, b] = v[a + i, b + j], zero outside
        vp = np.pad(v, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        return vp[:, pad + i : pad + i + h, pad + j : pad + j + w, :]

    s = 1 + alpha / size**2 * sum(shifted(x * x, i, j) for i, j in offsets)
    if ct is None:
        return x * s**-beta
    common = ct * x * -beta * s ** (-beta - 1) * alpha / size**2
    # x[p] is in the window of every q = p - offset: its share is common[q] * 2 x[p]
    return ct * s**-beta + 2 * x * sum(shifted(common, -i, -j) for i, j in offsets)


# (channels, local_size, alpha): Caffe's CIFAR-10 full net (32 channels, 3x3), a larger
# window and alpha, more channels
LRN_WITHIN_CASES = [(32, 3, 0.5), (16, 5, 2.0), (48, 3, 1.0)]


@pytest.mark.parametrize("c,size,alpha", LRN_WITHIN_CASES)
def test_lrn_within_channel_equals_caffes_formula(c, size, alpha):
    from nincc import onednn_lrn

    rng = np.random.default_rng(c + size)
    x = (rng.standard_normal((2, 7, 6, c)) * 2).astype(np.float32)
    spec = onednn_lrn.usable(x.shape, size, alpha, 0.75, 1.0, within=True)
    assert spec is not None
    y = jax.jit(lambda a: onednn_lrn.lrn(spec, a))(x)
    ref = naive_lrn_within(x, size, alpha, 0.75)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-6)
    ct = rng.standard_normal(x.shape).astype(np.float32)
    dx = jax.jit(jax.grad(lambda a: jnp.sum(onednn_lrn.lrn(spec, a) * ct)))(x)
    ref = naive_lrn_within(x, size, alpha, 0.75, ct)
    np.testing.assert_allclose(np.asarray(dx), ref, rtol=1e-5, atol=1e-5)


def test_lrn_runs_on_onednn_where_it_has_a_vector_kernel(monkeypatch):
    from nincc import onednn_lrn

    assert onednn_lrn.usable((2, 13, 13, 96), 5, 1e-4, 0.75, 1.0) is not None
    assert onednn_lrn.usable((2, 13, 13, 96), 5, 1e-4, 0.75, 1.0, np.float64) is None
    # where oneDNN has only its reference kernel (here: beta 0.5), XLA's loop runs
    ref_only = onednn_lrn.LRNSpec(2, 5, 5, 12, 5, 0.9, 0.5, 1.0)
    assert onednn_lrn.primitives(ref_only).forward.impl.startswith("ref")
    assert onednn_lrn.usable((2, 5, 5, 12), 5, 0.9, 0.5, 1.0) is None
    attrs = layer_attrs("LRN", "lrn_param { local_size: 5 alpha: 0.0001 beta: 0.75 }")
    assert fast.forward_note("LRN", attrs, [(2, 96, 13, 13)]) == "oneDNN"
    x = jnp.zeros((2, 96, 13, 13), jnp.float32)
    lower = fast.lowering_for("LRN", attrs, [x.shape])
    assert "nincc_onednn_lrn" in str(jax.make_jaxpr(lambda b: lower(attrs, [], b, None))([x]))
    monkeypatch.setenv(onednn.OPT_OUT, "0")
    assert onednn_lrn.usable((2, 13, 13, 96), 5, 1e-4, 0.75, 1.0) is None
    assert fast.forward_note("LRN", attrs, [(2, 96, 13, 13)]) == ""


# -------------------------------------------------------------- InnerProduct (onednn_matmul)


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_inner_product_equals_float64_products(transpose, bias):
    from nincc import onednn_matmul

    rng = np.random.default_rng(int(transpose) * 2 + int(bias))
    m, k, n = 6, 37, 11
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n) if transpose else (n, k)).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32) if bias else None
    wkn = np.asarray(w if transpose else w.T, np.float64)  # as (k, n)
    y = jax.jit(lambda x, w, b: onednn_matmul.inner_product(x, w, b, transpose))(x, w, b)
    ref = x.astype(np.float64) @ wkn + (0 if b is None else b)
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    ct = rng.standard_normal((m, n))

    def loss(x, w, b):
        return jnp.sum(onednn_matmul.inner_product(x, w, b, transpose) * ct)

    dx, dw, db = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, w, b)
    dwkn = x.T.astype(np.float64) @ ct
    np.testing.assert_allclose(np.asarray(dx), ct @ wkn.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dw), dwkn if transpose else dwkn.T, rtol=1e-5,
                               atol=1e-5)
    if bias:
        np.testing.assert_allclose(np.asarray(db), ct.sum(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "body,shape",
    [
        ("num_output: 9", (4, 8, 3, 3)),  # NIN-ZFNet's fc6: the pooled maps flattened
        ("num_output: 5 axis: 2", (2, 3, 4, 6)),  # a product per (n, c)
        ("num_output: 7 transpose: true", (3, 10)),
        ("num_output: 4 bias_term: false", (5, 6)),
    ],
)
def test_inner_product_matches_the_table(body, shape):
    from nincc.layers.base import REGISTRY

    from .test_fast import compare

    attrs = layer_attrs("InnerProduct", f"inner_product_param {{ {body} }}")
    rng = np.random.default_rng(len(body))
    specs = REGISTRY["InnerProduct"].blobs(attrs, [shape])
    params = [jnp.asarray(rng.standard_normal(s.shape), jnp.float32) for s in specs]
    assert fast.forward_note("InnerProduct", attrs, [shape]) == "oneDNN"
    compare("InnerProduct", attrs, params, [jnp.asarray(rng.standard_normal(shape), jnp.float32)])


def test_inner_product_keeps_the_table_without_onednn(monkeypatch):
    attrs = layer_attrs("InnerProduct", "inner_product_param { num_output: 3 }")
    monkeypatch.setenv(onednn.OPT_OUT, "0")
    assert fast.lowering_for("InnerProduct", attrs, [(2, 5)]) is None

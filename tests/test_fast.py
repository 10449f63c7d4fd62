"""nincc.fast: every fast lowering equals the layer table's lowering (forward and gradients,
within the fixture tolerances) on the zoo's and the corpus's shapes, stride, pad and group, and
nets run with the fast lowerings still match the real-Caffe fixtures."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from google.protobuf import text_format

from nincc import caffe_pb2, fast, onednn
from nincc.layers import REGISTRY
from nincc.layers.base import LowerCtx

from .conftest import FIXTURES, REPO

FWD_REL, BWD_REL = 1e-5, 1e-4


def layer_attrs(type_name: str, body: str, tops: int = 1, bottoms: int = 1):
    """attrs of a `layer { ... }` snippet, read by the table entry."""
    top = "".join(f' top: "t{i}"' for i in range(tops))
    bottom = "".join(f' bottom: "b{i}"' for i in range(bottoms))
    msg = text_format.Parse(
        f'name: "l" type: "{type_name}"{bottom}{top} {body}', caffe_pb2.LayerParameter()
    )
    return REGISTRY[type_name].attrs(msg)


def ctx_for(bottoms) -> LowerCtx:
    key = jax.random.PRNGKey(0)  # Dropout: the same key for both lowerings
    return LowerCtx("TRAIN", "l", key, {}, ("t0",), (), tuple(b.shape for b in bottoms))


def assert_close(got, ref, rel, what):
    """|got - ref| <= rel * max|ref| (the fixtures' rule); non-finite entries must be equal."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    finite = np.isfinite(ref)
    np.testing.assert_array_equal(got[~finite], ref[~finite], err_msg=f"{what}: non-finite")
    got, ref = got[finite], ref[finite]
    if ref.size == 0:
        return
    scale = max(float(np.max(np.abs(ref))), 1e-30)
    err = float(np.max(np.abs(got - ref)))
    assert err <= rel * scale, f"{what}: max error {err:.3g} > {rel:g} x {scale:.3g}"


def compare(type_name: str, attrs, params, bottoms, seed: int = 0):
    """The fast lowering against the table's: forward (as inference runs it, and as it runs
    under differentiation, which may take another path), then the VJP of a random cotangent
    with respect to every param and bottom."""
    entry = REGISTRY[type_name]
    shapes = [b.shape for b in bottoms]
    lower = fast.lowering_for(type_name, attrs, shapes)
    assert lower is not None, f"{type_name} fast path should apply to {shapes}"

    def run(fn):  # a fresh context per trace: both lowerings draw the same keys
        return jax.jit(lambda p, b: fn(attrs, p, b, ctx_for(bottoms)))

    ref = run(entry.lower)(params, bottoms)
    got = run(lower)(params, bottoms)
    for i, (g, r) in enumerate(zip(got, ref, strict=True)):
        assert_close(g, r, FWD_REL, f"top {i}")
    rng = np.random.default_rng(seed)
    cot = [jnp.asarray(rng.standard_normal(r.shape), jnp.float32) for r in ref]

    def vjp(fn):  # the tops as computed under differentiation, and the VJP of `cot`
        def tops_and_grads(p, b, c):
            tops, pull = jax.vjp(lambda p, b: fn(attrs, p, b, ctx_for(bottoms)), p, b)
            return tops, pull(c)

        return jax.jit(tops_and_grads)

    _, gref = vjp(entry.lower)(params, bottoms, cot)
    tops, ggot = vjp(lower)(params, bottoms, cot)
    for i, (g, r) in enumerate(zip(tops, ref, strict=True)):
        assert_close(g, r, FWD_REL, f"top {i} under differentiation")
    for name, g, r in zip(("params", "bottoms"), ggot, gref, strict=True):
        for i, (gi, ri) in enumerate(zip(g, r, strict=True)):
            assert_close(gi, ri, BWD_REL, f"gradient of {name}[{i}]")


def randn(rng, shape, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, jnp.float32)


# ---------------------------------------------------------------- 1x1 convolutions

# (batch, channels, h, w, num_output, stride, group, bias): NIN's and SqueezeNet's cccp/squeeze
# shapes (shrunk in batch), a strided 1x1 (ResNet's shortcut) and grouped ones
POINTWISE = [
    (2, 192, 8, 8, 160, 1, 1, True),  # NIN CIFAR-10 cccp1 (spatial shrunk)
    (2, 96, 13, 13, 96, 1, 1, True),  # NIN ImageNet cccp1 (spatial shrunk)
    (1, 1024, 6, 6, 1000, 1, 1, True),  # NIN ImageNet cccp8
    (2, 64, 14, 14, 16, 1, 1, True),  # SqueezeNet squeeze
    (2, 16, 14, 14, 64, 1, 1, False),  # SqueezeNet expand1x1, no bias
    (2, 32, 9, 7, 48, 2, 1, True),  # strided 1x1 on an odd, non-square plane
    (2, 32, 10, 10, 24, 3, 1, True),
    (2, 32, 6, 6, 48, 1, 4, True),  # grouped
    (2, 24, 7, 5, 12, 2, 3, False),  # grouped and strided
]


@pytest.mark.parametrize("n,c,h,w,o,stride,group,bias", POINTWISE)
def test_pointwise_convolution_matches_table(n, c, h, w, o, stride, group, bias, kernels):
    attrs = layer_attrs(
        "Convolution",
        f"convolution_param {{ num_output: {o} kernel_size: 1 stride: {stride} "
        f"group: {group} bias_term: {str(bias).lower()} }}",
    )
    rng = np.random.default_rng(n * c + o)
    params = [randn(rng, (o, c // group, 1, 1), 0.1)] + ([randn(rng, (o,))] if bias else [])
    compare("Convolution", attrs, params, [randn(rng, (n, c, h, w))])


def test_pointwise_convolution_two_bottoms(kernels):
    attrs = layer_attrs("Convolution", "convolution_param { num_output: 8 kernel_size: 1 }", 2, 2)
    rng = np.random.default_rng(1)
    params = [randn(rng, (8, 6, 1, 1)), randn(rng, (8,))]
    compare("Convolution", attrs, params, [randn(rng, (2, 6, 5, 5)), randn(rng, (2, 6, 5, 5))])


# k x k convolutions (XLA's convolution, channels-last): the zoo's stems and the corpus's
# odd cases — stride with a window that overhangs (Caffe's cropped last window), rectangular
# kernels and strides, groups, dilation, a padded 1x1
KXK = [
    ("kernel_size: 11 stride: 4", (2, 3, 35, 35), 8),  # NIN ImageNet conv1, spatial shrunk
    ("kernel_size: 7 stride: 2 pad: 1", (1, 3, 24, 24), 8),  # NIN-ZFNet conv1
    ("kernel_size: 5 pad: 2", (2, 6, 9, 9), 8),  # NIN CIFAR-10 conv1/conv2
    ("kernel_size: 3 stride: 2", (1, 4, 10, 9), 5),  # the last window overhangs: cropped
    ("kernel_h: 1 kernel_w: 3 pad_w: 1", (1, 4, 6, 6), 4),
    ("kernel_h: 3 kernel_w: 2 stride_h: 2 stride_w: 1 pad_h: 1", (2, 4, 7, 6), 6),
    ("kernel_size: 3 pad: 1 group: 2", (1, 8, 6, 6), 6),  # AlexNet-style groups
    ("kernel_size: 3 pad: 2 dilation: 2", (1, 4, 9, 9), 5),  # DeepLab-style dilation
    ("kernel_size: 1 pad: 1", (1, 4, 6, 6), 3),  # padded 1x1
    ("kernel_size: 1 stride: 2 pad: 1 group: 2", (2, 4, 5, 5), 6),
    # strided: dx by output phases (one convolution below 32 channels, one per phase from 32)
    ("kernel_size: 5 stride: 2", (2, 32, 11, 11), 6),  # NIN-ZFNet conv2, phases
    ("kernel_size: 3 stride: 2 pad: 1", (1, 40, 8, 7), 5),  # phases, cropped last window
    ("kernel_size: 2 stride: 3", (1, 4, 11, 11), 3),  # the stride skips rows: zero phases
    ("kernel_size: 2 stride: 3", (1, 32, 11, 10), 3),
    ("kernel_size: 5 stride: 3 pad: 2", (2, 3, 13, 12), 4),
    ("kernel_h: 4 kernel_w: 3 stride_h: 4 stride_w: 3 pad_w: 1", (1, 5, 17, 13), 4),
    ("kernel_h: 3 kernel_w: 5 stride_h: 1 stride_w: 3", (1, 33, 7, 14), 4),
]


@pytest.mark.parametrize("body,shape,o", KXK)
def test_kxk_convolution_matches_table(body, shape, o, kernels):
    attrs = layer_attrs("Convolution", f"convolution_param {{ num_output: {o} {body} }}")
    g = fast._geometry(attrs, shape)
    rng = np.random.default_rng(sum(shape) + o)
    params = [randn(rng, (o, shape[1] // attrs.group, *g.kernel), 0.1), randn(rng, (o,))]
    compare("Convolution", attrs, params, [randn(rng, shape)])


@pytest.mark.parametrize(
    "body,shape",
    [
        ("kernel_size: 1", (1, 4, 6)),  # 1-D
        ("kernel_size: 1 axis: 2", (1, 2, 4, 6, 6)),
        ("kernel_size: 3 pad: 1", (1, 4, 6, 6, 6)),  # 3-D
        ("kernel_size: 9", (1, 4, 6, 6)),  # does not fit: the table reports it
    ],
)
def test_fast_convolution_leaves_other_shapes_to_the_table(body, shape):
    attrs = layer_attrs("Convolution", f"convolution_param {{ num_output: 4 {body} }}")
    assert fast.lowering_for("Convolution", attrs, [shape]) is None


def test_pointwise_dilation_is_irrelevant():
    attrs = layer_attrs(
        "Convolution", "convolution_param { num_output: 5 kernel_size: 1 dilation: 3 }"
    )
    rng = np.random.default_rng(2)
    compare(
        "Convolution",
        attrs,
        [randn(rng, (5, 3, 1, 1)), randn(rng, (5,))],
        [randn(rng, (2, 3, 7, 7))],
    )


# ---------------------------------------------------------------- pooling

# (method, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, h, w): the zoo's and corpus's
# pools (3x3/2 with ceil overhang, 2x2/2), GoogLeNet's 3x3/1 pad 1, and rectangular, padded,
# strided-by-3 and clipped-window cases
POOLS = [
    ("MAX", 3, 3, 2, 2, 0, 0, 32, 32),  # NIN CIFAR-10 pool1: ceil overhang
    ("MAX", 3, 3, 2, 2, 0, 0, 54, 54),  # NIN ImageNet pool0
    ("MAX", 3, 3, 2, 2, 0, 0, 13, 13),
    ("MAX", 3, 3, 2, 2, 0, 0, 55, 55),  # AlexNet
    ("MAX", 2, 2, 2, 2, 0, 0, 14, 14),  # VGG / LeNet
    ("MAX", 2, 2, 2, 2, 0, 0, 9, 7),
    ("MAX", 3, 3, 1, 1, 1, 1, 7, 7),  # GoogLeNet's 3x3/1 pad 1
    ("MAX", 3, 2, 2, 3, 1, 1, 11, 10),
    ("MAX", 5, 5, 3, 3, 2, 2, 12, 12),  # pad and Caffe's clip of the last window
    ("MAX", 2, 2, 3, 3, 0, 0, 10, 10),  # stride > kernel: gaps no window reads
    ("MAX", 4, 4, 2, 2, 1, 1, 9, 9),  # 16 offsets: window index packed 8 bits wide
    ("MAX", 17, 16, 1, 1, 0, 0, 18, 17),  # 272 offsets: window index left unpacked
    ("AVE", 3, 3, 2, 2, 0, 0, 16, 16),  # NIN CIFAR-10 pool2
    ("AVE", 3, 3, 2, 2, 1, 1, 9, 9),  # divisor counts padding, not the overhang
    ("AVE", 4, 3, 2, 3, 1, 1, 10, 11),
    ("AVE", 2, 2, 1, 1, 0, 0, 5, 5),
]


def pool_attrs(method, kh, kw, sh, sw, ph, pw, tops=1):
    return layer_attrs(
        "Pooling",
        f"pooling_param {{ pool: {method} kernel_h: {kh} kernel_w: {kw} stride_h: {sh} "
        f"stride_w: {sw} pad_h: {ph} pad_w: {pw} }}",
        tops,
    )


@pytest.mark.parametrize("method,kh,kw,sh,sw,ph,pw,h,w", POOLS)
def test_pooling_matches_table(method, kh, kw, sh, sw, ph, pw, h, w, kernels):
    rng = np.random.default_rng(h * w + kh)
    compare("Pooling", pool_attrs(method, kh, kw, sh, sw, ph, pw), [], [randn(rng, (2, 3, h, w))])


@pytest.mark.parametrize("kernel,stride,pad", [(3, 2, 0), (2, 2, 0), (3, 1, 1), (3, 2, 1)])
def test_max_pooling_ties_go_to_the_first_maximum(kernel, stride, pad, kernels):
    """Small integers (and the zeros of a ReLU) make most windows hold several maxima."""
    rng = np.random.default_rng(kernel + stride)
    x = np.maximum(rng.integers(-2, 3, (2, 3, 9, 9)), 0).astype(np.float32)
    attrs = pool_attrs("MAX", kernel, kernel, stride, stride, pad, pad)
    compare("Pooling", attrs, [], [jnp.asarray(x)])


def test_max_pooling_nan_and_infinities(kernels):
    """NaN never wins, -inf only against -inf: a window with nothing above -FLT_MAX yields
    -FLT_MAX and passes no gradient, as the table (Caffe) does."""
    x = np.random.default_rng(3).standard_normal((1, 2, 6, 6)).astype(np.float32)
    x[0, 0, 0:2, 0:2] = -np.inf
    x[0, 0, 2, 3] = np.nan
    x[0, 1, 4:6, 4:6] = np.inf
    compare("Pooling", pool_attrs("MAX", 2, 2, 2, 2, 0, 0), [], [jnp.asarray(x)])


@pytest.mark.parametrize(
    "body,tops",
    [
        ("pool: MAX kernel_size: 2 stride: 2", 2),  # with the mask top
        ("pool: STOCHASTIC kernel_size: 2 stride: 2", 1),
        ("pool: AVE global_pooling: true", 1),
        ("pool: MAX kernel_size: 6", 1),  # a single window
    ],
)
def test_fast_pooling_leaves_other_cases_to_the_table(body, tops):
    attrs = layer_attrs("Pooling", f"pooling_param {{ {body} }}", tops)
    assert fast.lowering_for("Pooling", attrs, [(1, 2, 6, 6)]) is None


# ---------------------------------------------------------------- LRN

# (channels, h, w, local_size, alpha, beta, k): NIN-ZFNet's norm1/norm2 and AlexNet's constants
# (shrunk planes), a large alpha so the window term matters, Caffe's betas with a square-root
# form (0.75, 0.5, 1) and a general one, and fewer channels than the window
LRNS = [
    (96, 11, 11, 5, 1e-4, 0.75, 1.0),
    (256, 6, 6, 5, 1e-4, 0.75, 1.0),
    (16, 7, 5, 5, 2.0, 0.75, 1.0),
    (12, 5, 5, 3, 1.5, 0.5, 2.0),
    (12, 5, 5, 7, 0.8, 1.0, 1.0),
    (12, 5, 5, 5, 0.9, 0.6, 1.5),
    (2, 4, 4, 5, 3.0, 0.75, 1.0),
]


@pytest.mark.parametrize("c,h,w,size,alpha,beta,k", LRNS)
def test_lrn_across_channels_matches_table(c, h, w, size, alpha, beta, k):
    attrs = layer_attrs(
        "LRN", f"lrn_param {{ local_size: {size} alpha: {alpha} beta: {beta} k: {k} }}"
    )
    rng = np.random.default_rng(c + size)
    compare("LRN", attrs, [], [randn(rng, (2, c, h, w), 2.0)])


def test_lrn_within_channel_runs_on_onednn_or_is_left_to_the_table(monkeypatch):
    """WITHIN_CHANNEL takes the fast lowering where oneDNN runs it (k ignored, as Caffe does),
    and matches the table's; elsewhere the table's lowering runs."""
    attrs = layer_attrs(
        "LRN", "lrn_param { local_size: 3 alpha: 0.5 beta: 0.75 k: 7 norm_region: WITHIN_CHANNEL }"
    )
    if onednn.available():
        assert fast.forward_note("LRN", attrs, [(2, 32, 8, 7)]) == "oneDNN"
        compare("LRN", attrs, [], [randn(np.random.default_rng(1), (2, 32, 8, 7), 2.0)])
    # oneDNN's vector kernel wants channels in 16s: 4 would be its reference kernel
    assert fast.lowering_for("LRN", attrs, [(1, 4, 6, 6)]) is None
    monkeypatch.setenv(onednn.OPT_OUT, "0")
    assert fast.lowering_for("LRN", attrs, [(2, 32, 8, 7)]) is None


# ---------------------------------------------------------------- choosing


def test_run_graph_chooses_fast_table_or_named_types():
    from nincc.compile import choose_lowering
    from nincc.ir import Layer

    conv = layer_attrs("Convolution", "convolution_param { num_output: 4 kernel_size: 1 }")
    layer = Layer(name="c", type="Convolution", bottoms=("x",), tops=("y",), attrs=conv)
    shapes = [(1, 2, 6, 6)]
    assert choose_lowering(layer, shapes, True)[1] == "fast"
    assert choose_lowering(layer, shapes, False) == (REGISTRY["Convolution"].lower, "table")
    assert choose_lowering(layer, shapes, ("Pooling",))[1] == "table"
    assert choose_lowering(layer, shapes, ("Convolution",))[1] == "fast"


def test_every_fast_lowering_names_a_table_type():
    for name, fl in fast.FAST_LOWERINGS.items():
        assert name in REGISTRY
        assert fl.doc


def test_whole_net_gradients_match_with_fast_lowerings(kernels):
    """NIN CIFAR-10's train net (dropout off): loss and every weight gradient agree."""
    import dataclasses

    import nincc
    from nincc.compile import run_graph, total_loss

    from .conftest import REPO

    graph = nincc.load_graph(
        REPO / "zoo" / "nin_cifar10.prototxt",
        phase="TRAIN",
        input_shapes={"data": (2, 3, 32, 32), "label": (2,)},
    )
    graph = dataclasses.replace(graph, phase="TEST")
    params = nincc.compile(graph, jit=False).init(seed=0)
    rng = np.random.default_rng(0)
    feeds = {"data": randn(rng, (2, 3, 32, 32)), "label": jnp.asarray([3.0, 7.0])}

    def value_and_grad(use_fast):
        def loss(p):
            env, _ = run_graph(graph, p, feeds, fast=use_fast)
            return total_loss(graph, env)

        return jax.jit(jax.value_and_grad(loss))(params)

    ref_loss, ref = value_and_grad(False)
    got_loss, got = value_and_grad(True)
    assert_close(got_loss, ref_loss, FWD_REL, "loss")
    for name in ref:
        for i, (g, r) in enumerate(zip(got[name], ref[name], strict=True)):
            assert_close(g, r, BWD_REL, f"{name}[{i}]")


@pytest.mark.parametrize("slope", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 3, 5, 7)])
def test_relu_backward_from_its_mask_matches_table_at_zero(slope, shape):
    """The fast ReLU's backward reads a bit mask of where its top is positive (as Caffe's
    in-place ReLU reads its top); at x == 0 exactly the gradient is still Caffe's
    negative_slope, and negative values pass slope * dy. 105 elements: the mask's last byte
    is partly padding."""
    attrs = layer_attrs("ReLU", f"relu_param {{ negative_slope: {slope} }}")
    x = np.random.default_rng(3).standard_normal(shape).astype(np.float32)
    x[0, 0, 0, :3] = 0.0
    x[-1, 2] = -np.abs(x[-1, 2])
    compare("ReLU", attrs, [], [jnp.asarray(x)])


@pytest.mark.parametrize("size", [1, 7, 8, 9, 64, 1001])
def test_bit_mask_round_trip(size):
    m = np.random.default_rng(size).random(size) < 0.5
    shape = (size,) if size % 7 else (size // 7, 7)
    packed = fast._pack_bits(jnp.asarray(m.reshape(shape)))
    assert packed.dtype == jnp.uint8 and packed.shape == (-(-size // 8),)
    np.testing.assert_array_equal(np.asarray(fast._unpack_bits(packed, shape)), m.reshape(shape))


@pytest.mark.parametrize("top,size", [(9, 7), (9, 64), (15, 1), (16, 33), (255, 10), (256, 5)])
def test_window_index_pair_round_trip(top, size):
    """Two window indices per element: 4 bits each below 16, 8 bits below 256, else as is."""
    first = np.random.default_rng(size).integers(0, top + 1, size)
    shape = (size,) if size % 11 else (size // 11, 11)
    packed = fast._pack_pairs(jnp.asarray(first.reshape(shape), jnp.int32), top)
    if top < 256:
        assert packed.dtype == (jnp.uint8 if top < 16 else jnp.uint16)
        assert packed.shape == (-(-size // 2),)
    got = np.asarray(fast._unpack_pairs(packed, shape, top))
    np.testing.assert_array_equal(got, first.reshape(shape))


def test_relu_with_a_negative_slope_is_left_to_the_table():
    attrs = layer_attrs("ReLU", "relu_param { negative_slope: -0.5 }")
    assert fast.lowering_for("ReLU", attrs, [(1, 2, 3, 3)]) is None


MIXED_LAYOUTS = """
name: "mixed"
input: "data" input_shape { dim: 2 dim: 3 dim: 9 dim: 9 }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 6 kernel_size: 3 pad: 1 } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "a" type: "Convolution" bottom: "conv" top: "a"
        convolution_param { num_output: 4 kernel_size: 1 } }
layer { name: "b" type: "Pooling" bottom: "conv" top: "b"
        pooling_param { pool: MAX kernel_size: 3 stride: 1 pad: 1 } }
layer { name: "bn" type: "Power" bottom: "b" top: "bp" power_param { scale: 0.5 } }
layer { name: "cat" type: "Concat" bottom: "a" bottom: "bp" top: "cat" }
layer { name: "lrn" type: "LRN" bottom: "cat" top: "lrn" lrn_param { local_size: 3 } }
layer { name: "sum" type: "Eltwise" bottom: "lrn" bottom: "cat" top: "sum" }
layer { name: "pool" type: "Pooling" bottom: "sum" top: "pool"
        pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "gp" type: "Pooling" bottom: "pool" top: "gp"
        pooling_param { pool: AVE global_pooling: true } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 3 } }
"""


@pytest.mark.parametrize("fast_types", [True, ("Pooling",), ("Convolution", "LRN")])
def test_channels_last_blobs_meet_table_layers(tmp_path, fast_types):
    """Blobs kept channels-last feed table lowerings (Power, Concat, Eltwise, global pooling,
    InnerProduct) and fast ones; a blob read by both is converted once. Every blob comes back
    in Caffe's layout, and every blob's value and diff (read through taps) equals the table's."""
    import nincc
    from nincc.compile import run_graph

    path = tmp_path / "mixed.prototxt"
    path.write_text(MIXED_LAYOUTS)
    graph = nincc.load_graph(path, phase="TEST")
    rng = np.random.default_rng(5)
    params = {k: [randn(rng, np.shape(b), 0.3) for b in v]
              for k, v in nincc.compile(graph, jit=False).init(seed=0).items()}
    feeds = {"data": randn(rng, (2, 3, 9, 9))}
    vids = [v for layer in graph.layers for v in layer.tops]
    taps = {v: jnp.zeros(graph.value(v).shape, jnp.float32) for v in vids}
    weights = {v: randn(rng, graph.value(v).shape) for v in vids}

    def run(fast):
        def objective(p, t):
            env, _ = run_graph(graph, p, feeds, taps=t, fast=fast)
            return sum(jnp.sum(env[v] * weights[v]) for v in vids), env

        (_, env), grads = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(
            params, taps
        )
        return env, grads

    ref_env, (ref_p, ref_t) = run(False)
    env, (got_p, got_t) = run(fast_types)
    for v in vids:
        assert env[v].shape == tuple(graph.value(v).shape), v
        assert_close(env[v], ref_env[v], FWD_REL, f"blob {v}")
        assert_close(got_t[v], ref_t[v], BWD_REL, f"diff of {v}")
    for name in ref_p:
        for i, (g, r) in enumerate(zip(got_p[name], ref_p[name], strict=True)):
            assert_close(g, r, BWD_REL, f"{name}[{i}]")


# ---------------------------------------------------------------- against real Caffe

FIXTURE_CASES = [
    "nin_cifar10_deploy",
    "lrn_across",
    "v1_nin_cifar10",
    "conv_group_dilation",
    "pool_ave_pad",
    "pool_empty_window",
    "pool_max_ceil",
    "pool_pad_clip_axes",
    "ties",
]


@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixture_case_with_reference_lowerings(case, monkeypatch):
    """tests/test_fixtures.py runs every case with the fast lowerings (the default); the
    table's reference lowerings must match Caffe on the cases the fast paths cover too."""
    from .fixture_harness import run_case

    path = FIXTURES / case
    if not (path / "forward.npz").exists():
        pytest.skip(f"fixture {case} not found under {FIXTURES}")
    monkeypatch.chdir(path)
    problems = run_case(path, fast=False)
    assert not problems, "\n".join(problems[:20])


# ---------------------------------------------------------------- XLA flags


def test_xla_flags_append_and_keep_the_users_values():
    from nincc import xla_flags

    env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
    added = xla_flags.apply(environ=env)
    assert added == [f.text for f in xla_flags.FLAGS]
    assert env["XLA_FLAGS"].split() == ["--xla_cpu_multi_thread_eigen=true", *added]
    assert xla_flags.apply(environ=env) == []  # idempotent
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}
    assert xla_flags.apply(environ=mine) == []
    assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type="


@pytest.mark.parametrize("value", ["0", "off", "false", "No"])
def test_xla_flags_opt_out(value):
    from nincc import xla_flags

    env = {xla_flags.OPT_OUT: value}
    assert xla_flags.apply(environ=env) == []
    assert "XLA_FLAGS" not in env


def test_xla_flags_take_effect_before_the_backend_starts():
    """In a fresh process, nincc's flags keep YNNPACK out of a compiled convolution; without
    them (opted out) this jaxlib hands the convolution to YNNPACK."""
    import os
    import subprocess
    import sys

    probe = (
        "from nincc import xla_flags; xla_flags.apply()\n"
        "import jax, jax.numpy as jnp\n"
        "f = jax.jit(lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME'))\n"
        "x, w = jnp.ones((8, 64, 32, 32)), jnp.ones((64, 64, 3, 3))\n"
        "print('ynn_fusion' in f.lower(x, w).compile().as_text())\n"
    )

    def run(opt_out: str) -> str:
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env["NINCC_XLA_FLAGS"] = opt_out
        out = subprocess.run(
            [sys.executable, "-c", probe],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        return out.stdout.strip()

    assert run("1") == "False"
    if run("0") != "True":
        pytest.skip("this jaxlib does not use YNNPACK for convolutions by default")


# -------------------------------------------------------- every shape the zoo and corpus use


def _zoo_and_corpus_layers():
    """(net, layer, bottom shapes at batch 1) of every layer of the zoo and corpus nets that a
    fast lowering takes, one per distinct (type, attrs, shapes)."""
    import json

    import nincc

    from .conftest import CORPUS

    graphs = []
    for path in sorted((REPO / "zoo").glob("*.prototxt")):
        if "solver" in path.name:
            continue
        shapes = {}
        if "deploy" not in path.name:
            image = (3, 32, 32) if "cifar" in path.name else (1, 8, 8) if "digits" in path.name \
                else (3, 224, 224)
            shapes = {"data": (1, *image), "label": (1,)}
        graphs.append((path.name, nincc.load_graph(path, phase="TRAIN", input_shapes=shapes)))
    spec_dir = FIXTURES / "shapes_corpus"
    for spec_path in sorted(spec_dir.glob("*.shapes.json")) if spec_dir.is_dir() else []:
        spec = json.loads(spec_path.read_text())
        if any(layer["type"] == "Python" for layer in spec["layers"]):
            continue
        subs = {}
        for sub in spec["substitutions"]:
            rules = " ".join(sub.get("rules", []))
            if "phase" not in rules or f"phase: {spec['phase']}" in rules:
                subs.update(sub["tops"])
        graph = nincc.load_graph(
            CORPUS / spec["corpus_file"], phase=spec["phase"], stages=spec["stages"],
            input_shapes=subs,
        )
        graphs.append((spec["corpus_file"], graph))
    seen, out = set(), []
    for name, graph in graphs:
        for layer in graph.layers:
            if layer.type not in fast.FAST_LOWERINGS:
                continue
            shapes = [(1, *graph.value(b).shape[1:]) for b in layer.bottoms]
            key = (layer.type, repr(layer.attrs), tuple(shapes))
            if key in seen or fast.lowering_for(layer.type, layer.attrs, shapes) is None:
                continue
            seen.add(key)
            out.append(pytest.param(layer, shapes, id=f"{name}:{layer.name}"))
    return out


@pytest.mark.parametrize("layer,shapes", _zoo_and_corpus_layers())
def test_fast_lowering_matches_table_on_zoo_and_corpus_shapes(layer, shapes, monkeypatch):
    """Convolutions, pooling and ACROSS_CHANNELS LRN both on XLA's kernels and, where
    installed, oneDNN's; InnerProduct's and WITHIN_CHANNEL LRN's fast lowerings are oneDNN's
    alone."""
    from nincc import onednn

    rng = np.random.default_rng(len(layer.name))
    params = [randn(rng, p.shape, 0.1) for p in layer.params]
    bottoms = [randn(rng, s) for s in shapes]
    only = layer.type == "InnerProduct" or (layer.type == "LRN" and layer.attrs.within_channel)
    both = layer.type in ("Convolution", "Pooling", "LRN") and not only
    kernels = ([] if only else ["0"]) + (["1"] if (both or only) and onednn.available() else [])
    for switch in kernels:
        monkeypatch.setenv(onednn.OPT_OUT, switch)
        compare(layer.type, layer.attrs, params, bottoms)

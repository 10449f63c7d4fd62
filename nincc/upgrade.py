"""Caffe's legacy-format upgrades (util/upgrade_proto.cpp), one ``needs_x``/``upgrade_x`` pair each.

Caffe 1.0 upgrades a net on load in this order, and so does :func:`upgrade_net`:

1. V0 -> V1: ``layers { layer { type: "conv" kernelsize: 5 } }``; V0 ``padding`` layers are folded
   into the convolution or pooling that reads them;
2. data transformation: ``scale``/``mean_file``/``crop_size``/``mirror`` of V1 Data, ImageData
   and WindowData layers move into ``transform_param``;
3. V1 -> current: ``layers { type: CONVOLUTION blobs_lr ... }`` become ``layer { type: "Convolution"
   param { lr_mult decay_mult } }``; a net mixing ``layer`` and ``layers`` is refused;
4. net-level ``input``/``input_dim``/``input_shape`` become one Input layer named "input", first;
5. BatchNorm layers declaring three ``param`` specs get lr_mult and decay_mult 0 on each.

Each ``upgrade_x`` returns a new message and leaves its argument untouched. Where Caffe logs an
error and carries on (a V0 field that does not apply to the layer's type), the field is dropped
as in Caffe and a note is added; where Caffe aborts, :class:`~nincc.errors.UpgradeError` is raised.
:func:`rewrite_cccp` (Network-in-Network's CCCP type -> Convolution) is not a Caffe pass and runs
only when asked. :func:`upgrade_solver` is Caffe's solver_type enum -> type string upgrade.
"""

from __future__ import annotations

from google.protobuf.message import Message

from . import caffe_pb2
from .errors import UpgradeError

Notes = list[str]

# --------------------------------------------------------------------------- V0 -> V1

# V0 type string -> V1 LayerType enum name (Caffe's UpgradeV0LayerType).
V0_TYPES: dict[str, str] = {
    "accuracy": "ACCURACY",
    "bnll": "BNLL",
    "concat": "CONCAT",
    "conv": "CONVOLUTION",
    "data": "DATA",
    "dropout": "DROPOUT",
    "euclidean_loss": "EUCLIDEAN_LOSS",
    "flatten": "FLATTEN",
    "hdf5_data": "HDF5_DATA",
    "hdf5_output": "HDF5_OUTPUT",
    "im2col": "IM2COL",
    "images": "IMAGE_DATA",
    "infogain_loss": "INFOGAIN_LOSS",
    "innerproduct": "INNER_PRODUCT",
    "lrn": "LRN",
    "multinomial_logistic_loss": "MULTINOMIAL_LOGISTIC_LOSS",
    "pool": "POOLING",
    "relu": "RELU",
    "sigmoid": "SIGMOID",
    "softmax": "SOFTMAX",
    "softmax_loss": "SOFTMAX_LOSS",
    "split": "SPLIT",
    "tanh": "TANH",
    "window_data": "WINDOW_DATA",
}

_ANY = "*"
_CONV_IP = {"conv": "convolution_param", "innerproduct": "inner_product_param"}
_CONV_POOL = {"conv": "convolution_param", "pool": "pooling_param"}
_IMAGES = {"images": "image_data_param"}
_WINDOW = {"window_data": "window_data_param"}
_LRN = {"lrn": "lrn_param"}
_TRANSFORM = {_ANY: "transform_param"}

# V0 field -> (field name in the V1 *_param, {V0 type: V1 *_param}); "*" = every type.
# A type not listed is Caffe's "Unknown parameter <field> for layer type <type>": dropped.
V0_FIELDS: dict[str, tuple[str, dict[str, str]]] = {
    "num_output": ("num_output", _CONV_IP),
    "biasterm": ("bias_term", _CONV_IP),
    "weight_filler": ("weight_filler", _CONV_IP),
    "bias_filler": ("bias_filler", _CONV_IP),
    "pad": ("pad", _CONV_POOL),
    "kernelsize": ("kernel_size", _CONV_POOL),
    "group": ("group", {"conv": "convolution_param"}),
    "stride": ("stride", _CONV_POOL),
    "pool": ("pool", {"pool": "pooling_param"}),
    "dropout_ratio": ("dropout_ratio", {"dropout": "dropout_param"}),
    "local_size": ("local_size", _LRN),
    "alpha": ("alpha", _LRN),
    "beta": ("beta", _LRN),
    "k": ("k", _LRN),
    "source": (
        "source",
        {
            "data": "data_param",
            "hdf5_data": "hdf5_data_param",
            "images": "image_data_param",
            "window_data": "window_data_param",
            "infogain_loss": "infogain_loss_param",
        },
    ),
    "scale": ("scale", _TRANSFORM),
    "meanfile": ("mean_file", _TRANSFORM),
    "batchsize": (
        "batch_size",
        {
            "data": "data_param",
            "hdf5_data": "hdf5_data_param",
            "images": "image_data_param",
            "window_data": "window_data_param",
        },
    ),
    "cropsize": ("crop_size", _TRANSFORM),
    "mirror": ("mirror", _TRANSFORM),
    "rand_skip": ("rand_skip", {"data": "data_param", "images": "image_data_param"}),
    "shuffle_images": ("shuffle", _IMAGES),
    "new_height": ("new_height", _IMAGES),
    "new_width": ("new_width", _IMAGES),
    "concat_dim": ("concat_dim", {"concat": "concat_param"}),
    "det_fg_threshold": ("fg_threshold", _WINDOW),
    "det_bg_threshold": ("bg_threshold", _WINDOW),
    "det_fg_fraction": ("fg_fraction", _WINDOW),
    "det_context_pad": ("context_pad", _WINDOW),
    "det_crop_mode": ("crop_mode", _WINDOW),
}


def needs_v0_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Any ``layers`` entry holding a V0 ``layer { ... }`` (Caffe's NetNeedsV0ToV1Upgrade)."""
    return any(entry.HasField("layer") for entry in net.layers)


def upgrade_v0_net(
    net: caffe_pb2.NetParameter, notes: Notes | None = None
) -> caffe_pb2.NetParameter:
    """V0 net -> V1 net: padding layers folded, V0 fields moved to V1 ``*_param`` messages.

    As in Caffe only name, layers, input, input_dim and force_backward carry over.
    """
    padded = _fold_v0_padding(net)
    out = caffe_pb2.NetParameter()
    if padded.HasField("name"):
        out.name = padded.name
    for entry in padded.layers:
        _v0_layer_to_v1(entry, out.layers.add(), notes)
    out.input.extend(padded.input)
    out.input_dim.extend(padded.input_dim)
    if padded.HasField("force_backward"):
        out.force_backward = padded.force_backward
    return out


def _fold_v0_padding(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Drop V0 ``padding`` layers; the conv/pool reading one takes its pad and its bottom.

    Caffe's UpgradeV0PaddingLayers; a padding layer feeding anything else is refused.
    """
    out = caffe_pb2.NetParameter()
    out.CopyFrom(net)
    del out.layers[:]
    last_writer: dict[str, int] = {name: -1 for name in net.input}
    for i, entry in enumerate(net.layers):
        v0 = entry.layer
        if v0.type != "padding":
            out.layers.add().CopyFrom(entry)
        for j, blob in enumerate(entry.bottom):
            if blob not in last_writer:
                raise UpgradeError(
                    f"V0 layer '{v0.name}': bottom '{blob}' comes from no earlier layer or input"
                )
            source_index = last_writer[blob]
            if source_index < 0:
                continue
            source = net.layers[source_index]
            if source.layer.type != "padding":
                continue
            if v0.type not in ("conv", "pool"):
                raise UpgradeError(
                    f"V0 layer '{v0.name}': a padding layer feeds type '{v0.type}'; "
                    "only conv and pool layers can take padding"
                )
            if len(entry.bottom) != 1 or len(source.bottom) != 1 or len(source.top) != 1:
                raise UpgradeError(
                    f"V0 layer '{v0.name}': padding layer '{source.layer.name}' must have one "
                    "bottom and one top and feed a layer with one bottom"
                )
            target = out.layers[-1]
            target.layer.pad = source.layer.pad
            target.bottom[j] = source.bottom[0]
        for blob in entry.top:
            last_writer[blob] = i
    return out


def _v0_layer_to_v1(
    entry: caffe_pb2.V1LayerParameter, out: caffe_pb2.V1LayerParameter, notes: Notes | None
) -> None:
    """One V0 layer connection -> V1LayerParameter (UpgradeV0LayerParameter)."""
    out.bottom.extend(entry.bottom)
    out.top.extend(entry.top)
    if not entry.HasField("layer"):
        return
    v0 = entry.layer
    if v0.HasField("name"):
        out.name = v0.name
    v0_type = v0.type
    if v0.HasField("type"):
        if v0_type not in V0_TYPES:
            raise UpgradeError(
                f"V0 layer '{v0.name}': unknown V0 type '{v0_type}' "
                f"(allowed: {', '.join(sorted(V0_TYPES))})"
            )
        out.type = caffe_pb2.V1LayerParameter.LayerType.Value(V0_TYPES[v0_type])
    out.blobs.extend(v0.blobs)
    out.blobs_lr.extend(v0.blobs_lr)
    out.weight_decay.extend(v0.weight_decay)
    for v0_field, (target_field, by_type) in V0_FIELDS.items():
        if not v0.HasField(v0_field):
            continue
        param_name = by_type.get(v0_type, by_type.get(_ANY))
        if param_name is None:
            _note(
                notes,
                f"V0 layer '{v0.name}': {v0_field} does not apply to type '{v0_type}'; dropped",
            )
            continue
        value = getattr(v0, v0_field)
        if v0_field == "pool":
            value = caffe_pb2.PoolingParameter.PoolMethod.Value(
                caffe_pb2.V0LayerParameter.PoolMethod.Name(value)
            )
        _assign(getattr(out, param_name), target_field, value)
    if v0.HasField("hdf5_output_param"):
        if v0_type == "hdf5_output":
            out.hdf5_output_param.CopyFrom(v0.hdf5_output_param)
        else:
            _note(notes, f"V0 layer '{v0.name}': hdf5_output_param does not apply to '{v0_type}'")


def _assign(msg: Message, name: str, value: object) -> None:
    """Set scalar, append to repeated, or copy a sub-message, by the field's kind."""
    field = msg.DESCRIPTOR.fields_by_name[name]
    if field.is_repeated:
        getattr(msg, name).append(value)
    elif field.message_type is not None:
        getattr(msg, name).CopyFrom(value)
    else:
        setattr(msg, name, value)


# --------------------------------------------------------------------------- data transformation

_DATA_LAYERS = {
    caffe_pb2.V1LayerParameter.DATA: "data_param",
    caffe_pb2.V1LayerParameter.IMAGE_DATA: "image_data_param",
    caffe_pb2.V1LayerParameter.WINDOW_DATA: "window_data_param",
}
_TRANSFORM_FIELDS = ("scale", "mean_file", "crop_size", "mirror")


def needs_data_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """A V1 data layer with transformation fields in its own ``*_param`` (NetNeedsDataUpgrade)."""
    for entry in net.layers:
        param_name = _DATA_LAYERS.get(entry.type)
        if param_name is None:
            continue
        param = getattr(entry, param_name)
        if any(param.HasField(name) for name in _TRANSFORM_FIELDS):
            return True
    return False


def upgrade_data_transformation(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Move scale/mean_file/crop_size/mirror of V1 data layers into ``transform_param``.

    Like Caffe, every V1 Data/ImageData/WindowData layer ends up with its ``*_param`` and
    ``transform_param`` present (possibly empty).
    """
    out = _copy(net)
    for entry in out.layers:
        param_name = _DATA_LAYERS.get(entry.type)
        if param_name is None:
            continue
        param = getattr(entry, param_name)
        param.SetInParent()
        entry.transform_param.SetInParent()
        for name in _TRANSFORM_FIELDS:
            if param.HasField(name):
                setattr(entry.transform_param, name, getattr(param, name))
                param.ClearField(name)
    return out


# --------------------------------------------------------------------------- V1 -> current

# V1 LayerType enum name -> current type string (Caffe's UpgradeV1LayerType).
V1_TYPES: dict[str, str] = {
    "NONE": "",
    "ABSVAL": "AbsVal",
    "ACCURACY": "Accuracy",
    "ARGMAX": "ArgMax",
    "BNLL": "BNLL",
    "CONCAT": "Concat",
    "CONTRASTIVE_LOSS": "ContrastiveLoss",
    "CONVOLUTION": "Convolution",
    "DECONVOLUTION": "Deconvolution",
    "DATA": "Data",
    "DROPOUT": "Dropout",
    "DUMMY_DATA": "DummyData",
    "EUCLIDEAN_LOSS": "EuclideanLoss",
    "ELTWISE": "Eltwise",
    "EXP": "Exp",
    "FLATTEN": "Flatten",
    "HDF5_DATA": "HDF5Data",
    "HDF5_OUTPUT": "HDF5Output",
    "HINGE_LOSS": "HingeLoss",
    "IM2COL": "Im2col",
    "IMAGE_DATA": "ImageData",
    "INFOGAIN_LOSS": "InfogainLoss",
    "INNER_PRODUCT": "InnerProduct",
    "LRN": "LRN",
    "MEMORY_DATA": "MemoryData",
    "MULTINOMIAL_LOGISTIC_LOSS": "MultinomialLogisticLoss",
    "MVN": "MVN",
    "POOLING": "Pooling",
    "POWER": "Power",
    "RELU": "ReLU",
    "SIGMOID": "Sigmoid",
    "SIGMOID_CROSS_ENTROPY_LOSS": "SigmoidCrossEntropyLoss",
    "SILENCE": "Silence",
    "SOFTMAX": "Softmax",
    "SOFTMAX_LOSS": "SoftmaxWithLoss",
    "SPLIT": "Split",
    "SLICE": "Slice",
    "TANH": "TanH",
    "WINDOW_DATA": "WindowData",
    "THRESHOLD": "Threshold",
}

# The per-type parameter messages Caffe carries from V1LayerParameter to LayerParameter.
V1_PARAMS: tuple[str, ...] = (
    "accuracy_param",
    "argmax_param",
    "concat_param",
    "contrastive_loss_param",
    "convolution_param",
    "data_param",
    "dropout_param",
    "dummy_data_param",
    "eltwise_param",
    "exp_param",
    "hdf5_data_param",
    "hdf5_output_param",
    "hinge_loss_param",
    "image_data_param",
    "infogain_loss_param",
    "inner_product_param",
    "lrn_param",
    "memory_data_param",
    "mvn_param",
    "pooling_param",
    "power_param",
    "relu_param",
    "sigmoid_param",
    "softmax_param",
    "slice_param",
    "tanh_param",
    "threshold_param",
    "window_data_param",
    "transform_param",
    "loss_param",
)


def needs_v1_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Any deprecated ``layers`` entry (Caffe's NetNeedsV1ToV2Upgrade)."""
    return len(net.layers) > 0


def check_not_mixed(net: caffe_pb2.NetParameter) -> None:
    """Refuse a net that has both ``layer`` and ``layers``, as Caffe's UpgradeV1Net does."""
    if len(net.layers) and len(net.layer):
        raise UpgradeError(
            f"the net mixes {len(net.layer)} current 'layer' and {len(net.layers)} V1 'layers' "
            'entries; Caffe refuses to upgrade it: write every layer as layer { type: "Type" }'
        )


def upgrade_v1_net(
    net: caffe_pb2.NetParameter, notes: Notes | None = None
) -> caffe_pb2.NetParameter:
    """V1 ``layers`` -> current ``layer`` entries; net-level fields are kept."""
    check_not_mixed(net)
    out = _copy(net)
    del out.layers[:]
    del out.layer[:]
    for entry in net.layers:
        _v1_layer_to_current(entry, out.layer.add(), notes)
    return out


def _v1_layer_to_current(
    v1: caffe_pb2.V1LayerParameter, out: caffe_pb2.LayerParameter, notes: Notes | None
) -> None:
    """One V1LayerParameter -> LayerParameter (UpgradeV1LayerParameter)."""
    out.bottom.extend(v1.bottom)
    out.top.extend(v1.top)
    if v1.HasField("name"):
        out.name = v1.name
    out.include.extend(v1.include)
    out.exclude.extend(v1.exclude)
    if v1.HasField("type"):
        out.type = V1_TYPES[caffe_pb2.V1LayerParameter.LayerType.Name(v1.type)]
    out.blobs.extend(v1.blobs)

    def spec(i: int) -> caffe_pb2.ParamSpec:
        while len(out.param) <= i:
            out.param.add()
        return out.param[i]

    for i, name in enumerate(v1.param):
        spec(i).name = name
    for i, mode in enumerate(v1.blob_share_mode):
        mode_name = caffe_pb2.V1LayerParameter.DimCheckMode.Name(mode)
        spec(i).share_mode = caffe_pb2.ParamSpec.DimCheckMode.Value(mode_name)
    for i, lr in enumerate(v1.blobs_lr):
        spec(i).lr_mult = lr
    for i, decay in enumerate(v1.weight_decay):
        spec(i).decay_mult = decay
    out.loss_weight.extend(v1.loss_weight)
    for name in V1_PARAMS:
        if v1.HasField(name):
            getattr(out, name).CopyFrom(getattr(v1, name))
    if v1.HasField("layer"):
        _note(notes, f"V1 layer '{v1.name}' also holds a V0 layer; it was ignored")


# --------------------------------------------------------------------------- input fields


def needs_input_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Net-level ``input`` fields (Caffe's NetNeedsInputUpgrade)."""
    return len(net.input) > 0


def upgrade_input(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """``input`` + ``input_shape``/``input_dim`` -> one Input layer named "input", placed first.

    Inputs with neither shape nor dims (old weight files) are simply dropped, as in Caffe.
    """
    n_inputs = len(net.input)
    has_shape, has_dim = len(net.input_shape) > 0, len(net.input_dim) > 0
    if has_shape and len(net.input_shape) < n_inputs:
        raise UpgradeError(
            f"net has {n_inputs} input fields but {len(net.input_shape)} input_shape entries"
        )
    if not has_shape and has_dim and len(net.input_dim) < 4 * n_inputs:
        raise UpgradeError(
            f"net has {n_inputs} input fields but {len(net.input_dim)} input_dim values "
            f"(4 per input: {4 * n_inputs} needed)"
        )
    out = _copy(net)
    if has_shape or has_dim:
        layer = caffe_pb2.LayerParameter(name="input", type="Input")
        for i, blob in enumerate(net.input):
            layer.top.append(blob)
            shape = layer.input_param.shape.add()
            if has_shape:
                shape.CopyFrom(net.input_shape[i])
            else:
                shape.dim.extend(net.input_dim[4 * i : 4 * i + 4])
        out.layer.insert(0, layer)
    out.ClearField("input")
    out.ClearField("input_shape")
    out.ClearField("input_dim")
    return out


# --------------------------------------------------------------------------- BatchNorm


def _is_old_batchnorm(layer: caffe_pb2.LayerParameter) -> bool:
    return layer.type == "BatchNorm" and len(layer.param) == 3


def needs_batchnorm_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """A BatchNorm layer declaring three ``param`` specs (NetNeedsBatchNormUpgrade)."""
    return any(_is_old_batchnorm(layer) for layer in net.layer)


def upgrade_batchnorm(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Set lr_mult 0 and decay_mult 0 on each of those specs; other spec fields stay."""
    out = _copy(net)
    for layer in out.layer:
        if _is_old_batchnorm(layer):
            for spec in layer.param:
                spec.lr_mult = 0.0
                spec.decay_mult = 0.0
    return out


# --------------------------------------------------------------------------- CCCP (not Caffe's)


def needs_cccp_rewrite(net: caffe_pb2.NetParameter) -> bool:
    """A layer of Network-in-Network's type "CCCP" (any case)."""
    return any(layer.type.lower() == "cccp" for layer in net.layer)


def rewrite_cccp(net: caffe_pb2.NetParameter) -> caffe_pb2.NetParameter:
    """Type "CCCP" -> "Convolution": CCCP is a convolution (1x1 in NIN) with convolution_param."""
    out = _copy(net)
    for layer in out.layer:
        if layer.type.lower() == "cccp":
            layer.type = "Convolution"
    return out


# --------------------------------------------------------------------------- whole net


def needs_upgrade(net: caffe_pb2.NetParameter) -> bool:
    """Whether Caffe would call this net not in the latest format (tools' NetNeedsUpgrade)."""
    return (
        needs_v0_upgrade(net)
        or needs_v1_upgrade(net)
        or needs_data_upgrade(net)
        or needs_input_upgrade(net)
        or needs_batchnorm_upgrade(net)
    )


def upgrade_net(
    net: caffe_pb2.NetParameter, cccp: bool = False, path: str | None = None
) -> tuple[caffe_pb2.NetParameter, list[str]]:
    """Every needed pass in Caffe's order (then CCCP -> Convolution if ``cccp``).

    Returns the current-format net (``net`` is not modified) and one line per pass run, plus a
    line per field Caffe would drop with an error log. ``path`` prefixes UpgradeError messages.
    """
    try:
        return _upgrade_net(net, cccp)
    except UpgradeError as err:
        if path is None:
            raise
        raise UpgradeError(f"{path}: {err}") from None


def _upgrade_net(
    net: caffe_pb2.NetParameter, cccp: bool
) -> tuple[caffe_pb2.NetParameter, list[str]]:
    notes: Notes = []
    original = net
    if needs_v0_upgrade(net):
        net = upgrade_v0_net(net, notes)
        notes.append("upgraded deprecated V0LayerParameter layers")
    if needs_data_upgrade(net):
        net = upgrade_data_transformation(net)
        notes.append("moved deprecated data transformation fields into transform_param")
    if needs_v1_upgrade(net):
        net = upgrade_v1_net(net, notes)
        notes.append("upgraded deprecated V1LayerParameter 'layers' to 'layer'")
    if needs_input_upgrade(net):
        net = upgrade_input(net)
        notes.append("replaced deprecated net-level input fields by an Input layer")
    if needs_batchnorm_upgrade(net):
        net = upgrade_batchnorm(net)
        notes.append("set lr_mult and decay_mult 0 on deprecated BatchNorm param specs")
    if cccp and needs_cccp_rewrite(net):
        net = rewrite_cccp(net)
        notes.append("rewrote CCCP layers as Convolution")
    if net is original:
        net = _copy(net)
    return net, notes


# --------------------------------------------------------------------------- solver

# SolverParameter.SolverType enum name -> type string (Caffe's UpgradeSolverType).
SOLVER_TYPES: dict[str, str] = {
    "SGD": "SGD",
    "NESTEROV": "Nesterov",
    "ADAGRAD": "AdaGrad",
    "RMSPROP": "RMSProp",
    "ADADELTA": "AdaDelta",
    "ADAM": "Adam",
}


def needs_solver_type_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    """The deprecated ``solver_type`` enum is set (SolverNeedsTypeUpgrade)."""
    return solver.HasField("solver_type")


def upgrade_solver_type(solver: caffe_pb2.SolverParameter) -> caffe_pb2.SolverParameter:
    """``solver_type: NESTEROV`` -> ``type: "Nesterov"``; both set is refused, as in Caffe."""
    if solver.HasField("type"):
        raise UpgradeError(
            f"solver sets both the deprecated solver_type ({_solver_type_name(solver)}) and "
            f'type ("{solver.type}"); Caffe refuses this: keep only type'
        )
    out = _copy(solver)
    out.type = SOLVER_TYPES[_solver_type_name(solver)]
    out.ClearField("solver_type")
    return out


def _solver_type_name(solver: caffe_pb2.SolverParameter) -> str:
    return caffe_pb2.SolverParameter.SolverType.Name(solver.solver_type)


def needs_solver_upgrade(solver: caffe_pb2.SolverParameter) -> bool:
    """Whether Caffe would call this solver not in the latest format."""
    return needs_solver_type_upgrade(solver)


def upgrade_solver(
    solver: caffe_pb2.SolverParameter, path: str | None = None
) -> caffe_pb2.SolverParameter:
    """The solver in current form (Caffe's UpgradeSolverAsNeeded); ``solver`` is not modified.

    ``path`` prefixes UpgradeError messages.
    """
    if not needs_solver_type_upgrade(solver):
        return _copy(solver)
    try:
        return upgrade_solver_type(solver)
    except UpgradeError as err:
        if path is None:
            raise
        raise UpgradeError(f"{path}: {err}") from None


# --------------------------------------------------------------------------- helpers


def _copy(msg: Message) -> Message:
    out = type(msg)()
    out.CopyFrom(msg)
    return out


def _note(notes: Notes | None, text: str) -> None:
    if notes is not None:
        notes.append(text)

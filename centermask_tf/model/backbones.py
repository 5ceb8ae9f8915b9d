"""Backbones that map RGB images in [0, 255] to stride-4 feature maps.

- resnet18 (native) and resnet50/101 (keras.applications), each followed by CenterNet's neck of
  three 4x4 stride-2 transposed convs (256/128/64 channels).
- dla34 (native) with CenterNet's IDA-up path to stride 4; plain 3x3 convs stand in for the
  deformable ones and bilinear upsampling for the (bilinear-initialised) grouped deconvolutions.
- hourglass104 (native): CenterNet's large hourglass, two stacked 5-level hourglasses, one
  stride-4 map per stack (the first feeds intermediate supervision in training).
- mobilenetv3_large/small (keras.applications) with a light FPN-style neck (depthwise-separable
  convs) for edge devices; mobilenetv3_large_minimalistic is the variant without hard-swish,
  squeeze-excite and 5x5 kernels, which int8 runtimes run fastest (LiteRT's XNNPACK takes no
  int8 HARD_SWISH; its fallback kernel cost about 5 ns per element here).

`width_multiplier` scales every channel count we own (tiny test models use 0.125-0.25); for
keras.applications networks it is passed as `alpha` to MobileNetV3 and scales only the neck of
ResNet-50/101.
"""

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import keras

from centermask_tf.errors import UserError

logger = logging.getLogger("centermask_tf.model")

class BackboneWeightsError(UserError, ValueError):
    """Backbone weights that cannot be loaded; the message says how to provide them."""


@keras.saving.register_keras_serializable(package="centermask")
class ImageNormalization(keras.layers.Layer):
    """Maps RGB images in [0, 255] to the input range a backbone family expects.

    Args:
        mode: "torch" ((x/255 - mean) / std, RGB), "caffe" (BGR minus the mean, as
            keras.applications ResNets expect), "tf" (x / 127.5 - 1) or "affine"
            (x * scale + offset, a keras-hub image converter's).
        scale, offset: mode "affine": a number or one per channel.
    """

    _MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
    _STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
    _CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self, mode="torch", scale=1.0, offset=0.0, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("torch", "caffe", "tf", "affine"):
            raise ValueError(f"ImageNormalization mode must be torch, caffe, tf or affine; got {mode!r}.")
        self.mode = mode
        self.scale, self.offset = scale, offset

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "affine":
            return (images * keras.ops.array(self.scale, self.compute_dtype)
                    + keras.ops.array(self.offset, self.compute_dtype))
        # The constants in the compute dtype: under a mixed policy the images are float16, which
        # a float32 constant does not combine with.
        if self.mode == "caffe":
            return keras.ops.flip(images, axis=-1) - keras.ops.array(self._CAFFE_MEAN_BGR, self.compute_dtype)
        mean, std = keras.ops.array(self._MEAN, self.compute_dtype), keras.ops.array(self._STD, self.compute_dtype)
        return (images - mean) / std

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, scale=self.scale, offset=self.offset)
        return config


# PyTorch-style momentum 0.1 (Keras 0.9), as CenterNet trains with: Keras' default 0.99 (0.999
# in keras.applications' MobileNetV3) leaves the inference statistics far behind during short
# schedules: the edge config trained 750 steps from scratch detected nothing in inference mode.
BN_MOMENTUM = 0.9


def _batch_norm(name):
    return keras.layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=1e-5, name=name)


def scaled_channels(channels, width_multiplier):
    """Channels scaled by the width multiplier, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(channels * width_multiplier / 8.0)) * 8)


def _conv_bn(x, filters, kernel, stride=1, relu=True, name=None):
    x = keras.layers.Conv2D(
        filters, kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_conv"
    )(x)
    x = _batch_norm(f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def _basic_block(x, filters, stride, name, residual=None):
    """ResNet basic block: two 3x3 convs; `residual` defaults to x (or its projection)."""
    if residual is None:
        residual = x
        if stride != 1 or x.shape[-1] != filters:
            residual = _conv_bn(x, filters, 1, stride, relu=False, name=f"{name}_proj")
    y = _conv_bn(x, filters, 3, stride, name=f"{name}_a")
    y = _conv_bn(y, filters, 3, 1, relu=False, name=f"{name}_b")
    return keras.layers.ReLU(name=f"{name}_out")(keras.layers.Add(name=f"{name}_add")([y, residual]))


def _deconv_neck(x, width_multiplier, laterals=None):
    """CenterNet's ResNet neck: three 4x4 stride-2 transposed convs, 256/128/64 channels.

    With `laterals` (the backbone's stride-16, 8 and 4 features), each upsampled map also adds
    a 1x1 projection of the backbone stage at its resolution before the ReLU: U-Net/FPN-style
    skips, so positions come from the fine stages rather than only from the stride-32 map
    (4x4 at a 128-px input).
    """
    laterals = list(reversed(laterals or []))  # stride 16 first
    for i, channels in enumerate((256, 128, 64)):
        filters = scaled_channels(channels, width_multiplier)
        x = keras.layers.Conv2DTranspose(
            filters, 4, strides=2, padding="same", use_bias=False, name=f"neck_deconv{i}"
        )(x)
        x = _batch_norm(f"neck_deconv{i}_bn")(x)
        if laterals:
            side = _conv_bn(laterals[i], filters, 1, relu=False, name=f"neck_lateral{i}")
            x = keras.layers.Add(name=f"neck_add{i}")([x, side])
        x = keras.layers.ReLU(name=f"neck_deconv{i}_relu")(x)
    return x


# === ResNet-18 (native) ===


def _resnet18_stages(x, width_multiplier):
    """The outputs of ResNet-18's four stages, at strides 4, 8, 16 and 32."""
    x = _conv_bn(x, scaled_channels(64, width_multiplier), 7, 2, name="stem")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", name="stem_pool")(x)
    stages = []
    for stage, (channels, stride) in enumerate(((64, 1), (128, 2), (256, 2), (512, 2))):
        filters = scaled_channels(channels, width_multiplier)
        x = _basic_block(x, filters, stride, name=f"stage{stage + 1}_block1")
        x = _basic_block(x, filters, 1, name=f"stage{stage + 1}_block2")
        stages.append(x)
    return stages


# === DLA-34 (native) with IDA-up ===


def _dla_tree(x, levels, filters, stride, level_root, name, children=None):
    """One DLA aggregation tree (CenterNet's `Tree` with BasicBlocks, no root residual)."""
    children = [] if children is None else children
    bottom = keras.layers.MaxPooling2D(stride, stride, name=f"{name}_down")(x) if stride > 1 else x
    residual = bottom
    if x.shape[-1] != filters:
        residual = _conv_bn(bottom, filters, 1, relu=False, name=f"{name}_project")
    if level_root:
        children.append(bottom)
    if levels == 1:
        x1 = _basic_block(x, filters, stride, f"{name}_tree1", residual=residual)
        x2 = _basic_block(x1, filters, 1, f"{name}_tree2")
        merged = keras.layers.Concatenate(name=f"{name}_root_cat")([x2, x1, *children])
        return _conv_bn(merged, filters, 1, name=f"{name}_root")
    x1 = _dla_tree(x, levels - 1, filters, stride, False, f"{name}_tree1")
    children.append(x1)
    return _dla_tree(x1, levels - 1, filters, 1, False, f"{name}_tree2", children=children)


def _ida_up(layers, start, end, filters, name):
    """Iterative deep aggregation: folds layers[start+1:end] into layers[start]'s resolution."""
    for i in range(start + 1, end):
        factor = layers[start].shape[1] // layers[i].shape[1]
        up = _conv_bn(layers[i], filters, 3, name=f"{name}_proj{i}")
        if factor > 1:
            up = keras.layers.UpSampling2D(factor, interpolation="bilinear", name=f"{name}_up{i}")(up)
        merged = keras.layers.Add(name=f"{name}_add{i}")([up, layers[i - 1]])
        layers[i] = _conv_bn(merged, filters, 3, name=f"{name}_node{i}")


def _dla34(x, width_multiplier):
    channels = [scaled_channels(c, width_multiplier) for c in (16, 32, 64, 128, 256, 512)]
    x = _conv_bn(x, channels[0], 7, name="base")
    x = _conv_bn(x, channels[0], 3, name="level0")
    x = _conv_bn(x, channels[1], 3, 2, name="level1")
    levels = []
    for level, (depth, level_root) in enumerate(((1, False), (2, True), (2, True), (1, True))):
        x = _dla_tree(x, depth, channels[level + 2], 2, level_root, name=f"level{level + 2}")
        levels.append(x)  # strides 4, 8, 16, 32

    # DLAUp: aggregate from the deepest level down, keeping each stage's result.
    outputs = [levels[-1]]
    for i in range(len(levels) - 1):
        start = len(levels) - i - 2
        _ida_up(levels, start, len(levels), levels[start].shape[-1], name=f"dla_up{i}")
        outputs.insert(0, levels[-1])
    # Final IDAUp over strides 4, 8, 16 to one stride-4 map.
    final = outputs[:3]
    _ida_up(final, 0, len(final), final[0].shape[-1], name="ida_up")
    return final[-1]


# === Hourglass-104 (native), as CenterNet's `large_hourglass` ===

HOURGLASS_CHANNELS = (256, 256, 384, 384, 384, 512)
HOURGLASS_MODULES = (2, 2, 2, 2, 2, 4)
HOURGLASS_STACKS = 2


def _residuals(x, filters, count, name, stride=1):
    """`count` residual modules; the first may change the channels and stride."""
    for i in range(count):
        x = _basic_block(x, filters, stride if i == 0 else 1, f"{name}{i}")
    return x


def _hourglass(x, channels, modules, name):
    """One hourglass level (CenterNet's `kp_module`), recursing until one level is left:
    a residual branch at this resolution plus the inner levels at half resolution,
    upsampled (nearest) and added."""
    up = _residuals(x, channels[0], modules[0], f"{name}_up")
    low = _residuals(x, channels[1], modules[0], f"{name}_down", stride=2)
    if len(channels) > 2:
        low = _hourglass(low, channels[1:], modules[1:], f"{name}i")
    else:
        low = _residuals(low, channels[1], modules[1], f"{name}_bottom")
    low = _residuals(low, channels[1], modules[0] - 1, f"{name}_back")
    low = _basic_block(low, channels[0], 1, f"{name}_back_out")
    low = keras.layers.UpSampling2D(2, interpolation="nearest", name=f"{name}_upsample")(low)
    return keras.layers.Add(name=f"{name}_merge")([up, low])


def _hourglass104(x, width_multiplier):
    """Stride-4 features of each of the two stacks: stem (7x7 stride-2 conv, stride-2 residual),
    then hourglass -> 3x3 conv per stack, with 1x1 conv + BN merges between them."""
    channels = [scaled_channels(c, width_multiplier) for c in HOURGLASS_CHANNELS]
    x = _conv_bn(x, scaled_channels(128, width_multiplier), 7, 2, name="stem")
    inter = _basic_block(x, channels[0], 2, "stem_res")
    stacks = []
    for stack in range(HOURGLASS_STACKS):
        features = _hourglass(inter, channels, HOURGLASS_MODULES, f"hg{stack}")
        features = _conv_bn(features, channels[0], 3, name=f"hg{stack}_out")
        stacks.append(features)
        if stack + 1 < HOURGLASS_STACKS:
            merged = keras.layers.Add(name=f"hg{stack}_merge_add")([
                _conv_bn(inter, channels[0], 1, relu=False, name=f"hg{stack}_merge_inter"),
                _conv_bn(features, channels[0], 1, relu=False, name=f"hg{stack}_merge_features"),
            ])
            inter = _basic_block(keras.layers.ReLU(name=f"hg{stack}_merge_relu")(merged), channels[0], 1,
                                 f"hg{stack}_merge_res")
    return stacks


# === keras.applications backbones ===


def _application(name, input_size, weights, width_multiplier):
    spec = BACKBONES[name]
    fn = getattr(keras.applications, spec.application)
    kwargs = dict(include_top=False, weights=weights, input_shape=(input_size, input_size, 3), **spec.options)
    if spec.neck == "mobilenet":  # MobileNetV3's own width multiplier
        kwargs.update(alpha=width_multiplier)
    try:
        model = fn(**kwargs)
    except Exception as e:  # keras.utils.get_file raises a bare Exception when offline
        if weights != "imagenet":
            raise
        raise BackboneWeightsError(
            f"Could not load ImageNet weights for {name} ({e}). Without network access, "
            f"download the keras.applications '{BACKBONES[name].application}' no-top weights file "
            "on a connected machine, then either copy it into ~/.keras/models/ or set "
            "model.weights: /path/to/that_file.h5 (or --set model.weights=/path/to/file.h5). "
            "model.weights: null trains from scratch, as the paper does."
        ) from e
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = BN_MOMENTUM
    return model


# keras-hub's pyramid level names by stride.
HUB_LEVELS = {4: "P2", 8: "P3", 16: "P4", 32: "P5"}


def _hub_backbone(preset, weights):
    """The keras-hub backbone of `preset` (with the preset's weights when `weights` is
    "preset") and the ImageNormalization its image converter asks for."""
    try:
        import keras_hub  # optional, and slow to import (it brings tensorflow-text)
    except ImportError:
        raise BackboneWeightsError(
            "model.backbone=keras_hub needs keras-hub: .venv/bin/pip install -e '.[keras-hub]'."
        ) from None
    try:
        hub = keras_hub.models.Backbone.from_preset(preset, load_weights=weights == "preset")
    except Exception as e:  # hub downloads raise whatever their client raises
        raise BackboneWeightsError(
            f"model.backbone_preset={preset!r}: cannot load it ({' '.join(str(e).split())[:200]}). Pass a "
            "keras-hub preset handle (needs network access) or a local preset folder."
        ) from None
    if not getattr(hub, "pyramid_outputs", None):
        raise BackboneWeightsError(
            f"model.backbone_preset={preset!r}: {type(hub).__name__} has no feature pyramid "
            "(pyramid_outputs); CenterMask needs one, as ResNetBackbone has."
        )
    try:
        converter = keras_hub.layers.ImageConverter.from_preset(preset)
        normalize = ImageNormalization("affine", converter.scale or 1.0, converter.offset or 0.0, name="normalize")
    except (ValueError, FileNotFoundError):  # a preset without an image converter
        logger.warning("preset %s has no image converter: normalising with ImageNet's statistics", preset)
        normalize = ImageNormalization("torch", name="normalize")
    return hub, normalize


def _hub_stages(hub, strides):
    """A model from `hub`'s input to its pyramid levels at `strides`."""
    missing = [HUB_LEVELS[s] for s in strides if HUB_LEVELS[s] not in hub.pyramid_outputs]
    if missing:
        raise BackboneWeightsError(f"{type(hub).__name__} has no pyramid level {', '.join(missing)}.")
    return keras.Model(hub.inputs, [hub.pyramid_outputs[HUB_LEVELS[s]] for s in strides], name="keras_hub_features")


def _feature_taps(app, input_size, strides):
    """The last layer output of `app` at each of `strides` (by static spatial size)."""
    taps = {}
    for layer in app.layers:
        shape = layer.output.shape
        if len(shape) == 4 and shape[1] and input_size % shape[1] == 0:
            taps[input_size // shape[1]] = layer.output
    missing = [s for s in strides if s not in taps]
    if missing:
        raise ValueError(f"{app.name} has no feature map at strides {missing}.")
    return [taps[s] for s in strides]


def _mobilenet_neck(features, width_multiplier):
    """FPN-style top-down path from stride 32 to 4 with depthwise-separable convs."""
    channels = scaled_channels(96, width_multiplier)
    *lateral, top = features
    x = _conv_bn(top, channels, 1, name="neck_top")
    for level, feature in zip((16, 8, 4), reversed(lateral)):
        x = keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"neck_up{level}")(x)
        side = _conv_bn(feature, channels, 1, relu=False, name=f"neck_lateral{level}")
        x = keras.layers.Add(name=f"neck_add{level}")([x, side])
        x = keras.layers.SeparableConv2D(
            channels, 3, padding="same", use_bias=False, name=f"neck_sep{level}"
        )(x)
        x = _batch_norm(f"neck_sep{level}_bn")(x)
        x = keras.layers.ReLU(name=f"neck_sep{level}_relu")(x)
    return x


# === Entry points ===


@dataclass(frozen=True)
class Backbone:
    """One backbone: what `build_backbone` and `build_pyramid_backbone` need to know of it.

    Attributes:
        normalization: the per-channel ImageNet statistics its weights expect ("torch",
            "caffe" or "tf", see `ImageNormalization`).
        application: the `keras.applications` model it wraps (None: built here).
        options: extra arguments of that application.
        stages: built here: `(x, width_multiplier)` -> its stage outputs at strides 4-32.
        build: built here, with a neck of its own: `(x, width_multiplier)` -> stride-4 features.
        neck: "deconv" (CenterNet's three transposed convs, optionally with stage skips) or
            "mobilenet" (the light FPN-style neck).
        pyramid: FCOS's FPN may build on its C3-C5.
        hub: a keras-hub preset's backbone (`model.backbone_preset`), normalised as its image
            converter says.
    """

    normalization: str
    application: Optional[str] = None
    options: dict = field(default_factory=dict)
    stages: Optional[Callable] = None
    build: Optional[Callable] = None
    neck: str = "deconv"
    pyramid: bool = False
    hub: bool = False


_MOBILENET = {"include_preprocessing": False}
BACKBONES = {
    "resnet18": Backbone("torch", stages=_resnet18_stages, pyramid=True),
    "resnet50": Backbone("caffe", "ResNet50", pyramid=True),
    "resnet101": Backbone("caffe", "ResNet101", pyramid=True),
    "dla34": Backbone("torch", build=_dla34),
    "hourglass104": Backbone("torch", build=_hourglass104),
    "mobilenetv3_large": Backbone("tf", "MobileNetV3Large", _MOBILENET, neck="mobilenet"),
    "mobilenetv3_large_minimalistic": Backbone(
        "tf", "MobileNetV3Large", {**_MOBILENET, "minimalistic": True}, neck="mobilenet"
    ),
    "mobilenetv3_small": Backbone("tf", "MobileNetV3Small", _MOBILENET, neck="mobilenet"),
    "keras_hub": Backbone("affine", pyramid=True, hub=True),
}
# The backbones FCOS's feature pyramid takes its C3-C5 from.
PYRAMID_BACKBONES = tuple(name for name, spec in BACKBONES.items() if spec.pyramid)


def _check_weights(name, weights):
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {sorted(BACKBONES)}.")
    if BACKBONES[name].hub:
        if weights not in (None, "preset"):
            raise BackboneWeightsError(f"model.weights={weights!r}: keras_hub takes null or preset.")
        return
    if weights not in (None, "imagenet") and not os.path.isfile(weights):
        raise BackboneWeightsError(f"model.weights: file '{weights}' does not exist.")
    if weights == "imagenet" and BACKBONES[name].application is None:
        raise BackboneWeightsError(
            f"model.weights=imagenet: keras.applications has no ImageNet weights for {name}. "
            "Set model.weights: null to train from scratch (as the paper does), or to the path "
            f"of a .weights.h5 file saved from this backbone (`backbone.save_weights`)."
        )


def _load_own_weights(backbone, name, weights):
    if weights not in (None, "imagenet", "preset") and BACKBONES[name].application is None:
        backbone.load_weights(weights)
    return backbone


def _stage_outputs(name, x, input_size, weights, width_multiplier, strides, hub=None):
    """The backbone's stage outputs at `strides` (of 4, 8, 16, 32); `hub`: the keras-hub
    backbone of a keras_hub one."""
    spec = BACKBONES[name]
    if hub is not None:
        return _hub_stages(hub, strides)(x)
    if spec.stages is not None:
        stages = dict(zip((4, 8, 16, 32), spec.stages(x, width_multiplier)))
        return [stages[s] for s in strides]
    app = _application(name, input_size, weights, width_multiplier)
    return keras.Model(app.inputs, _feature_taps(app, input_size, strides), name=f"{name}_features")(x)


def _normalized_input(name, input_size, preset, weights):
    """The image input, its normalisation, and the keras-hub backbone (None for ours)."""
    images = keras.Input((input_size, input_size, 3), name="images")
    if BACKBONES[name].hub:
        hub, normalize = _hub_backbone(preset, weights)
        return images, normalize(images), hub
    return images, ImageNormalization(BACKBONES[name].normalization, name="normalize")(images), None


def build_backbone(name, input_size, width_multiplier=1.0, weights=None, neck="deconv", preset=None):
    """A `keras.Model` from RGB images `[B, N, N, 3]` in [0, 255] to stride-4 features (for
    hourglass104 a list of them, one per stack; the last is the one inference uses).

    Args:
        name: one of `BACKBONES`.
        input_size: N, a multiple of 32.
        width_multiplier: channel scale (see the module docstring).
        weights: None, "imagenet" (keras.applications backbones) or a weights file path.
        neck: ResNets and keras_hub only: "deconv" (CenterNet's) or "skip" (the same with stage
            skips, see `_deconv_neck`). DLA-34 and MobileNetV3 have their own multi-scale necks.
        preset: keras_hub: the keras-hub preset handle or folder.
    """
    if neck not in ("deconv", "skip"):
        raise ValueError(f"Unknown neck {neck!r}; choose 'deconv' or 'skip'.")
    _check_weights(name, weights)
    spec = BACKBONES[name]
    if neck == "skip" and (spec.build is not None or spec.neck != "deconv"):
        raise ValueError(f"neck='skip' applies to the ResNet backbones; {name} fuses its stages already.")

    images, x, hub = _normalized_input(name, input_size, preset, weights)
    if spec.build is not None:
        features = spec.build(x, width_multiplier)
    elif spec.neck == "mobilenet":
        features = _mobilenet_neck(_stage_outputs(name, x, input_size, weights, width_multiplier, (4, 8, 16, 32)),
                                   width_multiplier)
    elif neck == "skip" or hub is not None:
        strides = (4, 8, 16, 32) if neck == "skip" else (32,)
        *laterals, top = _stage_outputs(name, x, input_size, weights, width_multiplier, strides, hub)
        features = _deconv_neck(top, width_multiplier, laterals or None)
    elif spec.stages is not None:
        features = _deconv_neck(spec.stages(x, width_multiplier)[-1], width_multiplier)
    else:  # the application as one nested layer, as checkpoints of it were saved
        features = _deconv_neck(_application(name, input_size, weights, width_multiplier)(x), width_multiplier)
    return _load_own_weights(keras.Model(images, features, name=f"{name}_backbone"), name, weights)


def build_pyramid_backbone(name, input_size, width_multiplier=1.0, weights=None, preset=None):
    """A `keras.Model` from RGB images `[B, N, N, 3]` in [0, 255] to the backbone's stage
    outputs at strides 8, 16 and 32 (C3, C4, C5), which an FPN builds on (CenterMask-FCOS).

    Args: as `build_backbone`; `name` one of `PYRAMID_BACKBONES`.
    """
    if name not in PYRAMID_BACKBONES:
        raise ValueError(f"The FCOS feature pyramid builds on {', '.join(PYRAMID_BACKBONES)}; got {name!r}.")
    _check_weights(name, weights)
    images, x, hub = _normalized_input(name, input_size, preset, weights)
    stages = _stage_outputs(name, x, input_size, weights, width_multiplier, (8, 16, 32), hub)
    return _load_own_weights(keras.Model(images, list(stages), name=f"{name}_pyramid_backbone"), name, weights)


def backbone_layers(network):
    """The layers of `network`'s backbone proper: what `train.freeze_backbone_epochs` freezes.
    The neck we add on top (layers named `neck_*`) keeps training, as do the FPN and the heads."""
    backbone = next(layer for layer in network.layers if isinstance(layer, keras.Model) and "backbone" in layer.name)
    return [layer for layer in backbone.layers if not layer.name.startswith("neck_")]

"""The CenterMask-FCOS functional network: ResNet -> FPN P3-P7 -> heads shared over the levels,
plus the Global Saliency map at stride 4.

FCOS (Tian et al., ICCV 2019) predicts at every location of every pyramid level; CenterMask
adds its two mask factors (the paper's "CenterMask-FCOS", 38.5 mask AP; docs/paper.md):
- the Local Shape: S*S channels per location, a 1x1 conv on the box tower (the tower's 3x3
  convs play the part of the CenterNet Shape head's hidden 3x3 conv);
- the Global Saliency: a `Head` on P3 (stride 8) upsampled x2 to stride 4, the resolution the
  CenterNet variant's saliency has, so masks are assembled at the same scale. The paper's
  exact saliency level is not known (unconfirmed); the finest level is the natural reading.
  `model.saliency_stride: 8` runs the head on P3 itself and upsamples its logits instead: a
  quarter of the head's work (49 -> 12 GFLOPs at 800 px, 256 channels, 80 classes).

Heads, as FCOS: a classification tower and a box tower of `tower_convs` x (3x3 conv, GroupNorm,
ReLU), shared by all levels; classification logits (prior 0.01) on the first, box distances
(l, t, r, b), centerness and the Shape on the second ("centerness on the regression branch",
FCOS's later default). Distances are ReLU(scale_level * x) * stride (FCOS's
`norm_reg_targets`), with a learnt scale per level.

Outputs are flattened over the levels, level by level and row-major within a level: the order
`targets.fcos_locations` lists locations in.
"""

import math

import keras
import tensorflow as tf

from centermask_tf.arch.base import once_per_network
from centermask_tf.arch.fcos.targets import FCOS_STRIDES
from centermask_tf.model.backbones import build_pyramid_backbone
from centermask_tf.model.heads import Head, mask_heads

# Classification bias: every location starts at p = 0.01 (RetinaNet/FCOS prior).
CLASSIFICATION_BIAS = -math.log((1.0 - 0.01) / 0.01)
# Outputs of an FCOS network (besides `shape` and `saliency`), the key that tells it apart.
FCOS_OUTPUTS = ("classification", "centerness", "box")
SALIENCY_STRIDE = 4


@keras.saving.register_keras_serializable(package="centermask")
class LevelScale(keras.layers.Layer):
    """FCOS's box output of one level: ReLU(scale * x) * stride, with a learnt scalar `scale`
    (starting at 1), so levels share the box conv while predicting distances of their own
    magnitude.

    Args:
        stride: the level's stride in input pixels.

    Example:

    >>> LevelScale(stride=8)(keras.ops.ones([1, 2, 2, 4])).numpy().max()
    8.0
    """

    def __init__(self, stride, **kwargs):
        super().__init__(**kwargs)
        self.stride = int(stride)

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, x):
        return keras.ops.relu(x * keras.ops.cast(self.scale, x.dtype)) * self.stride

    def get_config(self):
        return {**super().get_config(), "stride": self.stride}


def _tower(prefix, depth, channels):
    """`depth` x (3x3 conv, GroupNorm, ReLU) as a list of layers to apply in order."""
    layers = []
    for i in range(depth):
        layers += [
            keras.layers.Conv2D(channels, 3, padding="same", use_bias=False, name=f"{prefix}{i}_conv"),
            keras.layers.GroupNormalization(min(32, channels), name=f"{prefix}{i}_gn"),
            keras.layers.ReLU(name=f"{prefix}{i}_relu"),
        ]
    return layers


def _apply(layers, x):
    for layer in layers:
        x = layer(x)
    return x


def _pyramid(stages, channels):
    """FPN: lateral 1x1 convs and a nearest-neighbour top-down path over C3-C5 (P3-P5, each
    through a 3x3 conv), then P6 = 3x3 stride-2 conv of P5 and P7 = the same of ReLU(P6)."""
    laterals = [keras.layers.Conv2D(channels, 1, name=f"fpn_lateral{i + 3}")(c) for i, c in enumerate(stages)]
    merged = [laterals[-1]]
    for level in (4, 3):
        up = keras.layers.UpSampling2D(2, name=f"fpn_up{level}")(merged[0])
        merged.insert(0, keras.layers.Add(name=f"fpn_add{level}")([laterals[level - 3], up]))
    levels = [keras.layers.Conv2D(channels, 3, padding="same", name=f"fpn_p{i + 3}")(m) for i, m in enumerate(merged)]
    p6 = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="fpn_p6")(levels[-1])
    p7 = keras.layers.Conv2D(channels, 3, strides=2, padding="same", name="fpn_p7")(keras.layers.ReLU(name="fpn_p6_relu")(p6))
    return [*levels, p6, p7]


def build_fcos_model(config) -> keras.Model:
    """A functional `keras.Model` from images to CenterMask-FCOS's raw outputs.

    Args:
        config: a `ModelConfig` with `type: fcos` (or a full `Config`).

    Returns:
        A model from float RGB images `[B, N, N, 3]` in [0, 255] to a dict of float32 tensors
        over all L pyramid locations (`fcos_locations(N)`): `classification [B, L, C]` logits,
        `centerness [B, L, 1]` logits, `box [B, L, 4]` (l, t, r, b) distances in input pixels,
        `shape [B, L, S*S]` logits; and `saliency [B, N/4, N/4, 1 or C]` logits.
        `model.mask_factors` shape or saliency leaves out the other mask head.
    """
    config = getattr(config, "model", config)
    channels = config.head_conv
    heads = mask_heads(config.mask_factors)
    backbone = build_pyramid_backbone(config.backbone, config.input_size, config.width_multiplier, config.weights,
                                      config.backbone_preset)
    images = keras.Input((config.input_size, config.input_size, 3), name="images")
    levels = _pyramid(backbone(images), channels)

    classification_tower = _tower("cls_tower", config.tower_convs, channels)
    box_tower = _tower("box_tower", config.tower_convs, channels)
    convs = {
        "classification": keras.layers.Conv2D(
            config.num_classes, 3, padding="same", name="classification",
            bias_initializer=keras.initializers.Constant(CLASSIFICATION_BIAS)),
        "centerness": keras.layers.Conv2D(1, 3, padding="same", name="centerness"),
        "box": keras.layers.Conv2D(4, 3, padding="same", name="box"),
    }
    if "shape" in heads:
        convs["shape"] = keras.layers.Conv2D(config.shape_size**2, 1, name="shape")
    per_level = {name: [] for name in convs}
    for stride, features in zip(FCOS_STRIDES, levels):
        classified = _apply(classification_tower, features)
        boxed = _apply(box_tower, features)
        maps = {name: conv(classified if name == "classification" else boxed) for name, conv in convs.items()}
        maps["box"] = LevelScale(stride, name=f"box_scale{stride}")(maps["box"])
        for name, value in maps.items():
            flat = keras.layers.Reshape((-1, value.shape[-1]), name=f"{name}_flat{stride}")(value)
            per_level[name].append(flat)
    # float32 outputs also under a mixed-precision policy: they feed losses and sigmoids.
    outputs = {name: keras.layers.Concatenate(axis=1, dtype="float32", name=f"{name}_levels")(values)
               for name, values in per_level.items()}
    if "saliency" in heads:
        saliency_head = Head(config.num_classes if config.saliency == "specific" else 1, channels, name="saliency")
        if config.saliency_stride == 8:  # the head's logits upsampled, not its input features
            outputs["saliency"] = keras.layers.UpSampling2D(
                2, interpolation="bilinear", dtype="float32", name="saliency_up")(saliency_head(levels[0]))
        else:
            upsampled = keras.layers.UpSampling2D(2, interpolation="bilinear", name="saliency_up")(levels[0])
            outputs["saliency"] = saliency_head(upsampled)
    return keras.Model(images, outputs, name=f"centermask_fcos_{config.backbone}")


@once_per_network
def inference_network(network):
    """`network` with the Shape conv's input, the box tower's features over all levels
    (`shape_features [B, L, C]`), in place of its dense `[B, L, S*S]` Shape output, sharing every
    layer and weight; a network without a Shape head is returned as it is."""
    if "shape" not in network.output:
        return network
    levels = []
    for stride in FCOS_STRIDES:
        # The Shape conv is shared by the levels, so its `input` is only the first level's:
        # each level's is the input of the call that made that level's flattened output.
        operation, node_index, _ = network.get_layer(f"shape_flat{stride}").input._keras_history
        (features,) = operation._inbound_nodes[node_index].input_tensors
        levels.append(keras.layers.Reshape((-1, features.shape[-1]), name=f"shape_features{stride}")(features))
    outputs = {name: value for name, value in network.output.items() if name != "shape"}
    outputs["shape_features"] = keras.layers.Concatenate(axis=1, name="shape_features")(levels)
    return keras.Model(network.input, outputs, name=f"{network.name}_inference")


def shape_at_locations(shape_conv, features, locations):
    """The 1x1 Shape conv at a few locations only: `[B, L, C]` features and `[B, K]` location
    indices -> `[B, K, S*S]` float32 logits, equal to the dense output gathered there."""
    picked = tf.cast(tf.gather(features, locations, batch_dims=1), tf.float32)
    kernel = tf.cast(shape_conv.kernel, tf.float32)[0, 0]  # [C, S*S]
    return tf.matmul(picked, kernel) + tf.cast(shape_conv.bias, tf.float32)


def training_network(network):
    """The network `fit` runs: `inference_network`'s view, whose Shape conv the mask loss runs at
    the sampled positive locations only (`shape_at_locations`): the loss reads its S*S channels
    nowhere else, so losses and gradients are the dense conv's, without its `[B, L, S*S]` output."""
    return inference_network(network)

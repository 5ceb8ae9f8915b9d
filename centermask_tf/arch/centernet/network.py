"""The CenterMask functional network: backbone -> stride-4 features -> five parallel heads."""

import keras

from centermask_tf.arch.base import once_per_network
from centermask_tf.model.backbones import build_backbone
from centermask_tf.model.heads import HEAD_NAMES, build_heads

OUTPUT_STRIDE = 4
# Output key of the earlier stacks' head outputs (a list of dicts) in stacked networks.
INTERMEDIATE = "intermediate"


def build_network(config) -> keras.Model:
    """A functional `keras.Model` from images to the five raw head outputs.

    Args:
        config: a `ModelConfig`.

    Returns:
        A model from float RGB images `[B, N, N, 3]` in [0, 255] (N = `input_size`) to a dict of
        float32 logits/regressions at stride 4 (N/4 x N/4):
        `heatmap [B, N/4, N/4, C]`, `offset [.., 2]` (dy, dx), `size [.., 2]` (h, w in output
        pixels), `shape [.., S*S]`, `saliency [.., 1 or C]`. `model.mask_factors` shape or
        saliency leaves out the other mask head. Stacked backbones (hourglass104) add
        `intermediate`: the same dict for each earlier stack.
    """
    backbone = build_backbone(
        config.backbone, config.input_size, config.width_multiplier, config.weights, config.neck,
        config.backbone_preset,
    )

    def heads(features, prefix=""):
        layers = build_heads(
            config.num_classes,
            config.shape_size,
            config.head_conv,
            config.saliency == "specific",
            separable=config.head_type == "separable",
            mask_factors=config.mask_factors,
            prefix=prefix,
        )
        return {name: layers[name](features) for name in HEAD_NAMES if name in layers}

    images = keras.Input((config.input_size, config.input_size, 3), name="images")
    features = backbone(images)
    if not isinstance(features, (list, tuple)):
        return keras.Model(images, heads(features), name=f"centermask_{config.backbone}")
    # Stacked backbones (hourglass104): every stack gets heads; the last stack's are the
    # outputs inference uses, the others' are only for intermediate supervision in training.
    outputs = heads(features[-1])
    outputs[INTERMEDIATE] = [heads(stack, f"stack{i}_") for i, stack in enumerate(features[:-1])]
    return keras.Model(images, outputs, name=f"centermask_{config.backbone}")


@once_per_network
def inference_network(network):
    """`network` with the Shape head's input features (`shape_features`) in place of its dense
    `[B, H, W, S*S]` output, sharing every layer and weight."""
    names = [layer.name for layer in network.layers]
    outputs = {name: network.get_layer(name).output for name in ("heatmap", "offset", "size", "saliency")
               if name in names}
    if "shape" in names:
        outputs["shape_features"] = network.get_layer("shape").input
    return keras.Model(network.input, outputs, name=f"{network.name}_inference")


def training_network(network):
    """The network `fit` runs: `inference_network`'s view, whose Shape head the mask loss runs at
    the objects' centres only (`Head.call_at`): the loss reads the S*S channels nowhere else, so
    losses and gradients are the dense head's, without its `[B, H, W, S*S]` map. Stacked
    networks (hourglass104) keep their dense heads: each stack's loss would need its own head."""
    return network if INTERMEDIATE in network.output else inference_network(network)

"""CenterMask as in the paper: CenterNet's centre heatmap, offset and size heads at stride 4,
plus the Local Shape and Global Saliency heads."""

import functools

from centermask_tf.arch.base import Architecture
from centermask_tf.arch.centernet.decoder import CenterMaskDecoder
from centermask_tf.arch.centernet.losses import LOSS_TERMS, compute_losses
from centermask_tf.arch.centernet.network import OUTPUT_STRIDE, build_network, inference_network, training_network
from centermask_tf.arch.centernet.targets import encode_targets, target_spec
from centermask_tf.config import ConfigError


def _target_arguments(config):
    model = config.model
    return {
        "input_size": model.input_size, "num_classes": model.num_classes,
        "max_instances": config.data.max_instances, "mask_size": model.mask_size,
        "stride": OUTPUT_STRIDE, "map_masks": model.assembly == "native",
    }


def validate(model):
    if model.saliency_stride != OUTPUT_STRIDE:
        raise ConfigError(
            "model.saliency_stride applies to model.type=fcos (the CenterNet variant's saliency head "
            f"runs on its stride-{OUTPUT_STRIDE} features); remove model.saliency_stride."
        )


ARCH = Architecture(
    name="centernet",
    loss_terms=LOSS_TERMS,
    build_network=build_network,
    target_encoder=lambda config: functools.partial(encode_targets, **_target_arguments(config)),
    target_spec=lambda config: target_spec(**_target_arguments(config)),
    compute_losses=compute_losses,
    decoder=CenterMaskDecoder,
    score_heads=("heatmap",),
    inference_network=inference_network,
    training_network=training_network,
    validate=validate,
)

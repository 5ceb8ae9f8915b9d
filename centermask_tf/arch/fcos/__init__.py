"""CenterMask-FCOS: FCOS's per-location heads on an FPN (P3-P7) with the Local Shape on the box
tower and the Global Saliency at stride 4 (the paper's Table 5 variant)."""

import functools

from centermask_tf.arch.base import Architecture
from centermask_tf.arch.fcos.decoder import FcosDecoder
from centermask_tf.arch.fcos.losses import LOSS_TERMS, compute_fcos_losses
from centermask_tf.arch.fcos.network import build_fcos_model, inference_network, training_network
from centermask_tf.arch.fcos.targets import encode_fcos_targets, fcos_target_spec
from centermask_tf.config import ConfigError
from centermask_tf.model.backbones import PYRAMID_BACKBONES


def _target_arguments(config):
    model = config.model
    return {
        "input_size": model.input_size, "max_instances": config.data.max_instances,
        "mask_size": model.mask_size, "mask_samples": model.mask_samples,
    }


def validate(model):
    if model.backbone not in PYRAMID_BACKBONES:
        raise ConfigError(
            f"model.type=fcos builds its feature pyramid on {', '.join(PYRAMID_BACKBONES[:-1])} or "
            f"{PYRAMID_BACKBONES[-1]}; "
            f"got model.backbone={model.backbone}."
        )
    if model.neck != "deconv":
        raise ConfigError("model.neck applies to model.type=centernet (fcos has its FPN); remove model.neck.")
    if model.assembly != "box":
        raise ConfigError(
            "model.type=fcos assembles masks on each box's M x M grid: remove model.assembly or set it to box."
        )


ARCH = Architecture(
    name="fcos",
    loss_terms=LOSS_TERMS,
    build_network=build_fcos_model,
    target_encoder=lambda config: functools.partial(encode_fcos_targets, **_target_arguments(config)),
    target_spec=lambda config: fcos_target_spec(**_target_arguments(config)),
    compute_losses=compute_fcos_losses,
    decoder=FcosDecoder,
    score_heads=("classification", "centerness"),
    inference_network=inference_network,
    training_network=training_network,
    validate=validate,
)

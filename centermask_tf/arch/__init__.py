"""The architectures, by `model.type`: the one place that reads it (see `base.Architecture`)."""

from centermask_tf.arch import centernet, fcos
from centermask_tf.arch.base import Architecture

ARCHS = {"centernet": centernet.ARCH, "fcos": fcos.ARCH}

__all__ = ["ARCHS", "Architecture", "architecture", "build_network"]


def architecture(model_config):
    """The `Architecture` of a `ModelConfig`, after checking the config against it."""
    arch = ARCHS[model_config.type]
    arch.validate(model_config)
    return arch


def build_network(model_config):
    """The functional network of a `ModelConfig` (or a `Config`'s model section)."""
    model_config = getattr(model_config, "model", model_config)
    return architecture(model_config).build_network(model_config)

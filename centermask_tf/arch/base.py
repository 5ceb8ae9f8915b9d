"""What every architecture provides: the roles the detector, the training pipeline and the
exports call, so that none of them asks which architecture it holds.

A new architecture is a package `arch/<name>/` whose `__init__.py` defines `ARCH`, one
`Architecture`, and one line in `arch/__init__.py`'s `ARCHS` (plus the name in `model.type`'s
choices).
"""

import functools
import weakref
from dataclasses import dataclass
from typing import Callable


def once_per_network(build):
    """`build(network)` memoised per network object (weakly: a network let go frees its entry),
    for the inference views of a network that decoding builds on every trace."""
    cache = weakref.WeakKeyDictionary()

    @functools.wraps(build)
    def cached(network):
        if network not in cache:
            cache[network] = build(network)
        return cache[network]

    return cached


def _unchanged(network):
    return network


def _no_check(model_config):
    del model_config


@dataclass(frozen=True)
class Architecture:
    """One architecture's parts.

    Attributes:
        name: its `model.type`.
        loss_terms: the loss terms it logs, in order; each is weighted by `train.<term>_weight`
            (`saliency` is computed only when that weight is above 0).
        build_network: `ModelConfig` -> functional `keras.Model` from images to raw head outputs.
        target_encoder: `Config` -> `(boxes, classes, masks, is_crowd) -> targets` for one image,
            the function the training pipeline maps.
        target_spec: `Config` -> `{key: tf.TensorSpec}` of one image's targets.
        compute_losses: `(outputs, targets, weights)` -> `{term: loss, ..., "total": sum}`.
        decoder: a Keras layer class with `from_model_config(model_config)`; called on the
            inference network's outputs, it returns detections with the keys every decoder has.
        score_heads: names of the network layers whose outputs make the detections' scores
            (int8 exports keep them float32, `export.float_score_heads`).
        inference_network: network -> the network decoding runs (same weights), e.g. one whose
            Shape head runs at the peaks only.
        training_network: network -> the network `fit` runs (same weights), e.g. one whose
            Shape head the loss runs at the objects' centres only (`compute_losses` then gets
            the head as `shape_head`).
        validate: raises `ConfigError` for a `ModelConfig` this architecture cannot build.
    """

    name: str
    loss_terms: tuple[str, ...]
    build_network: Callable
    target_encoder: Callable
    target_spec: Callable
    compute_losses: Callable
    decoder: type
    score_heads: tuple[str, ...]
    inference_network: Callable = _unchanged
    training_network: Callable = _unchanged
    validate: Callable = _no_check

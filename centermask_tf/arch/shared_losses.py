"""What the loss terms of every architecture share: a clamped BCE, the Global Saliency
target and loss, and the weighted sum of the terms.

Every term is normalised by the number of objects in the batch (at least 1, so an image with no
objects gives finite values) and computed in float32 with clamped logs, so it is also stable when
the network runs in float16.
"""

import tensorflow as tf

from centermask_tf.config import TrainConfig
from centermask_tf.model.assembly import paste_masks

# CenterNet clamps probabilities to [1e-4, 1 - 1e-4] before taking logs.
EPS = 1e-4


def loss_weights(terms, train=None):
    """`{term: train.<term>_weight}` for an architecture's loss terms: the one home of the
    weights (the config's; defaults when `train` is None)."""
    train = train or TrainConfig()
    return {term: getattr(train, f"{term}_weight") for term in terms}


def computed_terms(terms, weights):
    """The terms a loss computes: the saliency BCE only when its weight is above 0."""
    return [name for name in terms if name != "saliency" or weights.get(name, 0.0) > 0]


def weighted_total(losses, weights):
    """`losses` with their weighted sum added as `total`."""
    return {**losses, "total": tf.add_n([weights[name] * value for name, value in losses.items()])}


def bce(prob, truth):
    prob = tf.clip_by_value(prob, EPS, 1.0 - EPS)
    return -(truth * tf.math.log(prob) + (1.0 - truth) * tf.math.log(1.0 - prob))


def output_mask_heads(outputs):
    """The mask heads ("shape", "saliency") whose outputs a network's `outputs` carry, the Shape
    head's also as its input features (`shape_features`, a training network's)."""
    return tuple(head for head in ("shape", "saliency") if head in outputs or f"{head}_features" in outputs)


def saliency_target(targets, height, width, channels, boxes=None):
    """`[B, H, W, channels]` 0/1 map: the union of the instance masks (one channel per class
    when `channels` > 1): the output-resolution `map_masks` when the targets have them, else
    the box-relative mask targets pasted onto the output map at `boxes` (`[B, M, 4]` ymin,
    xmin, ymax, xmax in output pixels, each architecture's own)."""
    if "map_masks" in targets:
        inside = tf.cast(targets["map_masks"], tf.float32)
    else:
        pasted = paste_masks(tf.cast(targets["masks"], tf.float32), boxes, height, width)  # [B, M, H, W]
        inside = tf.cast(pasted >= 0.5, tf.float32)
    inside *= targets["valid"][..., None, None]
    if channels == 1:
        return tf.reduce_max(inside, axis=1)[..., None]
    # Max over the instances of each (image, class); padding slots go to one extra segment.
    batch, slots = tf.shape(inside)[0], tf.shape(inside)[1]
    segments = tf.range(batch)[:, None] * channels + targets["classes"]
    segments = tf.where(targets["valid"] > 0, segments, batch * channels)
    per_class = tf.math.unsorted_segment_max(
        tf.reshape(inside, [batch * slots, height, width]), tf.reshape(segments, [-1]), batch * channels + 1
    )[:-1]  # [B * C, H, W]; empty segments come back as the lowest float
    per_class = tf.reshape(tf.maximum(per_class, 0.0), [batch, channels, height, width])
    return tf.transpose(per_class, [0, 2, 3, 1])


def saliency_loss(outputs, targets, boxes=None):
    """Per-pixel BCE of the saliency map against `saliency_target`, averaged over pixels."""
    logits = tf.cast(outputs["saliency"], tf.float32)
    _, height, width, channels = logits.shape
    truth = saliency_target(targets, height, width, channels, boxes)
    return tf.reduce_mean(bce(tf.sigmoid(logits), truth))


def check_saliency(outputs):
    if "saliency" not in outputs:
        raise ValueError("train.saliency_weight > 0 needs a Saliency head (model.mask_factors both or saliency).")

"""The optimiser and its learning-rate schedule (warmup, then step or cosine decay)."""

import math

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="centermask")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warmup to `base`, then step decay (x0.1 at each boundary) or cosine decay.

    Args:
        base: learning rate after warmup.
        warmup_steps: linear warmup length.
        total_steps: training length (cosine decays to 0 at its end).
        kind: "step" or "cosine".
        boundaries: steps at which the step schedule divides the rate by 10.
    """

    def __init__(self, base, warmup_steps, total_steps, kind="step", boundaries=()):
        self.base = float(base)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.kind = kind
        self.boundaries = [int(b) for b in boundaries]

    def __call__(self, step):
        step = tf.cast(step, tf.float32)
        warmup = tf.minimum(1.0, (step + 1.0) / max(self.warmup_steps, 1))
        if self.kind == "cosine":
            progress = tf.clip_by_value(step / max(self.total_steps, 1), 0.0, 1.0)
            decay = 0.5 * (1.0 + tf.cos(math.pi * progress))
        else:
            passed = tf.add_n([tf.cast(step >= b, tf.float32) for b in self.boundaries] or [0.0])
            decay = tf.pow(0.1, passed)
        return self.base * warmup * decay

    def get_config(self):
        return {
            "base": self.base,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "kind": self.kind,
            "boundaries": self.boundaries,
        }



def build_optimizer(train_config, steps_per_epoch):
    """Adam/AdamW/SGD with warmup + step/cosine decay, optional EMA and gradient-norm clipping."""
    total = train_config.epochs * steps_per_epoch
    schedule = WarmupSchedule(
        train_config.learning_rate,
        train_config.warmup_steps,
        total,
        train_config.schedule,
        [e * steps_per_epoch for e in train_config.decay_epochs],
    )
    options = dict(learning_rate=schedule, global_clipnorm=train_config.clipnorm)
    if train_config.ema_decay is not None:
        options.update(use_ema=True, ema_momentum=train_config.ema_decay)
    if train_config.optimizer == "adamw":
        return keras.optimizers.AdamW(weight_decay=train_config.weight_decay, **options)
    if train_config.optimizer == "sgd":
        # FCOS's optimiser: momentum 0.9 and weight decay (Keras applies it to the weights
        # directly; PyTorch adds it to the gradient before the momentum, nearly the same).
        return keras.optimizers.SGD(momentum=0.9, weight_decay=train_config.weight_decay, **options)
    return keras.optimizers.Adam(**options)

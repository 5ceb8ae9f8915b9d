"""The training model: the functional network plus the CenterMask losses, for `model.fit`."""

import keras
import tensorflow as tf

from centermask_tf.losses import LOSS_NAMES, compute_losses


@keras.saving.register_keras_serializable(package="centermask")
class CenterMaskTrainer(keras.Model):
    """Wraps the functional network so that `fit` computes the CenterMask losses.

    `fit` takes `(images, targets)` batches where `targets` is a batch of `encode_targets`
    dicts. Every loss term is tracked as a metric (`heatmap_loss`, `offset_loss`, `size_loss`,
    `mask_loss`), so it shows in the progress bar and in TensorBoard.

    Args:
        network: the functional model from `build_model`.
        loss_weights: {"heatmap", "offset", "size", "mask"} -> lambda.

    Example:

        trainer = CenterMaskTrainer(build_model(config), loss_weights={...})
        trainer.compile(optimizer="adam")
        trainer.fit(dataset, epochs=10)
    """

    def __init__(self, network, loss_weights=None, **kwargs):
        super().__init__(**kwargs)
        self.network = network
        self.loss_weights = dict(
            loss_weights or {"heatmap": 1.0, "offset": 1.0, "size": 0.1, "mask": 1.0}
        )
        self.loss_trackers = {name: keras.metrics.Mean(name=f"{name}_loss") for name in LOSS_NAMES}

    def call(self, images, training=False):
        return self.network(images, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        losses = compute_losses(y_pred, y, self.loss_weights)
        for name in LOSS_NAMES:
            self.loss_trackers[name].update_state(losses[name])
        # Keras sums gradients over replicas, so each replica's loss is divided by their count.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return losses["total"] / tf.cast(replicas, tf.float32)

    @property
    def metrics(self):
        return [*super().metrics, *self.loss_trackers.values()]

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "network": keras.saving.serialize_keras_object(self.network),
                "loss_weights": self.loss_weights,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)

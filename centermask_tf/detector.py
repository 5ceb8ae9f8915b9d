"""`CenterMask`: the detector object, from training to prediction on images in memory.

One Keras model owns the functional network of its architecture (`arch.ARCHS`), the losses (so
`compile`/`fit` train it), its decoder, the letterbox preprocessing, and
the dataset's category ids and names. Training, evaluation, prediction, benchmarks and exports
all take it.

    from centermask_tf import CenterMask

    detector = CenterMask.from_workdir("work/demo")
    (result,) = detector.detect("work/shapes/val/100001.jpg")
    result["boxes"], result["class_names"], result["masks"].shape   # [N, 4] xyxy, names, [N, H, W]

    detector.save_to_preset("presets/shapes")   # config.yaml, categories.json, model.weights.h5
    detector = CenterMask.from_preset("presets/shapes")
"""

import dataclasses
import json
import logging
import os
import zipfile

import keras
import tensorflow as tf

from centermask_tf.arch import architecture, build_network
from centermask_tf.arch.shared_losses import computed_terms, loss_weights
from centermask_tf.config import Config, config_from_dict
from centermask_tf.errors import UserError
from centermask_tf.files import sha256_of, write_json
from centermask_tf.inference import ImageDetector
from centermask_tf.model.heads import mask_heads, network_factors
from centermask_tf.transfer import check_source_path, layer_weights, transfer_weights, weights_file_layers
from centermask_tf.workdir import load_workdir, save_run_files, save_weights, weights_path

PRESET_WEIGHTS = "model.weights.h5"
PRESET_DIGESTS = "digests.json"
PRESET_FILES = ("config.yaml", "categories.json", PRESET_WEIGHTS)
logger = logging.getLogger("centermask_tf.detector")


class PresetError(UserError):
    """A preset handle or folder that cannot be loaded."""


@keras.saving.register_keras_serializable(package="centermask")
class CenterMask(keras.Model):
    """CenterMask instance segmentation: network, losses, decoding, preprocessing, categories.

    Args:
        config: a `Config` (or its dict form): the model section builds the network and the
            decoder; the train section gives the loss weights.
        categories: `[{"id", "name"}]` in contiguous-index order (default: ids 1..C, names
            "class_<id>").
        network: an already built functional network (default: the architecture's, built from
            `config.model`).

    Example:

        detector = CenterMask(load_config("configs/shapes_tiny.yaml"))
        detector.compile(optimizer="adam")
        detector.fit(train_batches, epochs=1)     # (images, targets) from data.pipeline
        results = detector.detect([image_a, image_b])
    """

    def __init__(self, config, categories=None, network=None, **kwargs):
        super().__init__(**kwargs)
        self.config = config if isinstance(config, Config) else config_from_dict(config)
        model = self.config.model
        self.categories = [dict(c) for c in categories] if categories else [
            {"id": i + 1, "name": f"class_{i + 1}"} for i in range(model.num_classes)
        ]
        if len(self.categories) != model.num_classes:
            raise UserError(
                f"{len(self.categories)} categories for model.num_classes={model.num_classes}; "
                "they must agree."
            )
        self.arch = architecture(model)
        self.network = network or self.arch.build_network(model)
        trained = network_factors(self.network)
        missing = set(mask_heads(model.mask_factors)) - set(mask_heads(trained))
        if missing:
            raise UserError(
                f"model.mask_factors={model.mask_factors} needs the {missing.pop().capitalize()} head, "
                f"which a network trained with mask_factors={trained} does not have; use "
                f"model.mask_factors={trained}."
            )
        self.decoder = self.arch.decoder.from_model_config(model)
        self.loss_weights = loss_weights(self.arch.loss_terms, self.config.train)
        self.loss_trackers = {
            name: keras.metrics.Mean(name=f"{name}_loss")
            for name in computed_terms(self.arch.loss_terms, self.loss_weights)
        }
        self._detect_canvases = None
        self.built = True  # the functional network is built; the rest holds no weights

    # === Training ===

    def call(self, images, training=False):
        # In training, the architecture's view whose loss may run a head sparsely (at the
        # objects' centres); the outputs are the raw network's otherwise.
        network = self.arch.training_network(self.network) if training else self.network
        return network(images, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        shape_head = self.network.get_layer("shape") if "shape_features" in y_pred else None
        losses = self.arch.compute_losses(y_pred, y, self.loss_weights, shape_head=shape_head)
        for name, tracker in self.loss_trackers.items():
            tracker.update_state(losses[name])
        # Gradients are summed over replicas, so each replica's loss is divided by their count.
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        return losses["total"] / tf.cast(replicas, tf.float32)

    @property
    def metrics(self):
        return [*super().metrics, *self.loss_trackers.values()]

    # === Detection ===

    @property
    def input_size(self):
        return self.config.model.input_size

    @property
    def category_ids(self):
        return [c["id"] for c in self.categories]

    @property
    def mask_factors(self):
        """What masks are made of at inference: "both", "shape" or "saliency"."""
        return self.config.model.mask_factors

    @property
    def inference_network(self):
        """The network decoding runs: the architecture's view of `network`, same weights."""
        return self.arch.inference_network(self.network)

    @property
    def shape_head(self):
        """The Shape head, when the inference network leaves it to the decoder (to run at the
        peaks only), else None."""
        return self.network.get_layer("shape") if "shape_features" in self.inference_network.output else None

    def decode(self, canvases):
        """Letterboxed float images `[B, N, N, 3]` (0..255) -> decoded detections: `boxes`
        (ymin, xmin, ymax, xmax, canvas pixels), `scores`, contiguous `classes`, box-relative
        `masks [B, K, M, M]` (for `model.assembly: native`, windows of the output-map masks
        and their `mask_boxes`) and `num_detections`. The Shape head runs at the peaks only.
        With `eval.flip_test` the network also runs on the mirror images (in the same batch)
        and the decoder averages the two."""
        network, shape_head = self.inference_network, self.shape_head
        if not self.config.eval.flip_test:
            return self.decoder(network(canvases, training=False), shape_head=shape_head)
        both = network(tf.concat([canvases, tf.reverse(canvases, axis=[2])], axis=0), training=False)
        batch = tf.shape(canvases)[0]
        outputs = {name: value[:batch] for name, value in both.items()}
        mirrored = {name: value[batch:] for name, value in both.items()}
        return self.decoder(outputs, shape_head=shape_head, mirrored=mirrored)

    def detect_canvases(self, canvases):
        """`decode` as one compiled graph (traced once per batch size)."""
        if self._detect_canvases is None:
            self._detect_canvases = tf.function(self.decode)
        return self._detect_canvases(canvases)

    def detect(self, images, score_threshold=None, max_detections=None, batch_size=8, tile=None, tile_overlap=0.25):
        """Detects instances in images in memory or in files: one `Results` per image (see
        `inference.ImageDetector.detect` for the arguments; `tile` cuts large images into
        overlapping tiles and merges detections across the seams)."""
        return self.image_detector().detect(images, score_threshold, max_detections, batch_size, tile, tile_overlap)

    def detect_video(self, path, score_threshold=None, max_detections=None, batch_size=8, tile=None, tile_overlap=0.25):
        """A generator of `Results`, one per frame of a video file (see
        `inference.ImageDetector.detect_video`)."""
        return self.image_detector().detect_video(path, score_threshold, max_detections, batch_size, tile, tile_overlap)

    def image_detector(self):
        """This model as an `inference.ImageDetector` (images and streams of them -> `Results`)."""
        model = self.config.model
        return ImageDetector(self.detect_canvases, self.input_size, self.categories, model.score_threshold,
                             model.mask_threshold)

    # === Saving and loading ===

    def get_config(self):
        config = super().get_config()
        config.update({
            "config": self.config.to_dict(),
            "categories": [dict(c) for c in self.categories],
            "network": keras.saving.serialize_keras_object(self.network),
        })
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["network"] = keras.saving.deserialize_keras_object(config["network"])
        return cls(**config)

    @classmethod
    def from_workdir(cls, workdir, weights=None, overrides=()):
        """The detector a training run made: its config and categories, and `weights` (default:
        the best checkpoint, else the last). `overrides` (`"key=value"`) change how it decodes,
        e.g. `["model.mask_factors=shape", "eval.flip_test=true"]`."""
        config, categories = load_workdir(workdir, overrides)
        return cls.with_weights(config, categories, weights_path(workdir, weights), trained_factors(workdir))

    @classmethod
    def from_preset(cls, path, overrides=()):
        """A detector saved with `save_to_preset`: a local folder holding `config.yaml`,
        `categories.json` and `model.weights.h5`. Hub handles (`kaggle://`, `hf://`) are not
        supported: download the folder first. `overrides` as in `from_workdir`."""
        if "://" in str(path):
            raise PresetError(
                f"'{path}': only local preset folders are supported; download it and pass the folder."
            )
        config, categories = load_workdir(path, overrides)
        _check_digests(path)
        return cls.with_weights(config, categories, os.path.join(path, PRESET_WEIGHTS), trained_factors(path))

    def save_to_preset(self, path):
        """Writes `config.yaml`, `categories.json` and `model.weights.h5` (the network's weights)
        into the folder `path`, each file atomically, then `digests.json`, their SHA-256, which
        `from_preset` checks. The config records the mask heads the network has (its trained
        `mask_factors`)."""
        config = config_from_dict(self.config.to_dict(), [f"model.mask_factors={network_factors(self.network)}"])
        save_run_files(config, path, self.categories)  # what `load_workdir` reads back
        save_weights(self.network, os.path.join(path, PRESET_WEIGHTS), "preset")
        write_json(os.path.join(path, PRESET_DIGESTS),
                   {"sha256": {name: sha256_of(os.path.join(path, name)) for name in PRESET_FILES}})

    def load_matching_weights(self, source):
        """Loads, from the model at `source` (a training workdir's best checkpoint, a preset
        folder, a `.keras` file or a `.weights.h5` file), every layer whose name and weight
        shapes match this network's; the others keep their weights. Fine-tuning onto other
        classes starts here: the class-specific heads stay freshly initialised.

        Returns:
            A `transfer.TransferReport`; `report.summary()` is one line.

        Raises:
            UserError: `source` is missing, unreadable, or not one layer matches.
        """
        layers, name = source_layers(source, self.config.model)
        return transfer_weights(self.network, layers, name, self.config.model.num_classes)

    @classmethod
    def with_weights(cls, config, categories, weights, trained_factors=None):
        """`CenterMask(config, categories)` with its network's weights read from `weights`.

        `trained_factors` is the `model.mask_factors` the weights were trained with (default:
        the config's); it picks the network's mask heads, while the config's value picks how
        masks are assembled."""
        config.model.weights = None  # the checkpoint holds every weight, the backbone's too
        trained = trained_factors or config.model.mask_factors
        network = build_network(dataclasses.replace(config.model, mask_factors=trained))
        try:
            network.load_weights(weights)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load weights '{weights}' into the network of this config "
                f"({' '.join(str(e).split())[:200]}); pass weights trained with this config."
            ) from None
        return cls(config, categories, network)


def source_layers(path, model_config):
    """`({layer path: [arrays]}, description)` of the model at `path` (see
    `CenterMask.load_matching_weights`). A `.weights.h5` in a workdir or preset is read with
    that run's config; any other names its layers only by position, so it is read with
    `model_config`'s layout, and a layer of another shape there counts as not in it."""
    path = check_source_path(path)
    try:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, PRESET_WEIGHTS)):
                return layer_weights(CenterMask.from_preset(path).network), path
            return layer_weights(CenterMask.from_workdir(path).network), path
        if path.endswith(".keras"):
            model = keras.saving.load_model(path, compile=False)
            return layer_weights(getattr(model, "network", model)), path
        folder = os.path.dirname(os.path.abspath(path))
        for run in (folder, os.path.dirname(folder)):  # a preset's weights, or a workdir checkpoint
            if all(os.path.isfile(os.path.join(run, name)) for name in ("config.yaml", "categories.json")):
                config, categories = load_workdir(run)
                network = CenterMask.with_weights(config, categories, path, trained_factors(run)).network
                return layer_weights(network), path
        reader = build_network(dataclasses.replace(model_config, weights=None))
        return weights_file_layers(reader, path), f"{path} (read by position with this config's layout)"
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        raise UserError(
            f"train.init_from: cannot read '{path}' ({' '.join(str(e).split())[:160]}); is the file "
            "complete? Copy it again or pass another model."
        ) from None


def _check_digests(path):
    """Refuses a preset whose files differ from the digests written when it was saved (a
    damaged download or copy loads without a word and detects other boxes)."""
    try:
        with open(os.path.join(path, PRESET_DIGESTS), encoding="utf-8") as f:
            digests = json.load(f)["sha256"]
    except FileNotFoundError:
        logger.warning("preset '%s' has no %s (saved by an older version): its files are not checked",
                       path, PRESET_DIGESTS)
        return
    except (ValueError, KeyError, TypeError) as e:
        raise PresetError(f"'{os.path.join(path, PRESET_DIGESTS)}' is damaged ({e}); copy the preset again.") from None
    for name in PRESET_FILES:
        if name in digests and sha256_of(os.path.join(path, name)) != digests[name]:
            raise PresetError(
                f"'{os.path.join(path, name)}' does not match its SHA-256 in {PRESET_DIGESTS}: it was damaged "
                "or changed after the preset was saved. Copy or download the preset again (or save it anew "
                "with CenterMask.save_to_preset)."
            )


def trained_factors(folder):
    """The `model.mask_factors` a workdir or preset was trained with (its saved config's)."""
    return load_workdir(folder)[0].model.mask_factors

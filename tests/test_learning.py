"""Targets -> losses -> assembly -> decode learn together: a tiny model overfits two images."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from centermask_tf.arch.centernet.decoder import decode_detections
from centermask_tf.arch.centernet.targets import encode_targets
from centermask_tf.config import Config, ModelConfig
from centermask_tf.detector import CenterMask
from centermask_tf.model.assembly import paste_masks

SIZE = 128


def draw(kind, box):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    ymin, xmin, ymax, xmax = box
    cy, cx, ry, rx = (ymin + ymax) / 2, (xmin + xmax) / 2, (ymax - ymin) / 2, (xmax - xmin) / 2
    if kind == 0:  # ellipse
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    if kind == 1:  # rectangle
        return (yy >= ymin) & (yy < ymax) & (xx >= xmin) & (xx < xmax)
    # triangle with its apex at the top centre
    inside_y = (yy >= ymin) & (yy < ymax)
    half_width = rx * (yy - ymin) / (ymax - ymin)
    return inside_y & (np.abs(xx - cx) <= half_width)


def two_images():
    rng = np.random.default_rng(1)
    scenes = [
        [(0, [10, 12, 60, 70]), (2, [64, 60, 120, 118])],
        [(1, [20, 70, 70, 120]), (0, [70, 8, 118, 56]), (2, [8, 10, 50, 50])],
    ]
    images, objects = [], []
    for scene in scenes:
        image = rng.uniform(60, 110, (SIZE, SIZE, 3))
        boxes, classes, masks = [], [], []
        for kind, box in scene:
            mask = draw(kind, box)
            image[mask] = [(220, 60, 60), (60, 200, 60), (70, 90, 230)][kind]
            boxes.append(box)
            classes.append(kind)
            masks.append(mask.astype(np.uint8))
        images.append(image.astype(np.float32))
        objects.append((np.float32(boxes), np.int32(classes), np.stack(masks)))
    return np.stack(images), objects


@pytest.mark.slow
@pytest.mark.parametrize("backbone, width, copies, epochs", [("resnet18", 0.25, 1, 10), ("hourglass104", 0.125, 4, 4)])
def test_tiny_model_overfits_two_images(backbone, width, copies, epochs):
    """Also Hourglass-104 at channels / 8, its two stacks supervised. Its innermost level is
    1 x 1 at 128 px, where BatchNorm over a batch of 2 only learns to tell the two images
    apart (inference then finds nothing), so it trains on 4 noisy copies of each."""
    keras.utils.set_random_seed(0)
    config = ModelConfig(
        backbone=backbone, width_multiplier=width, num_classes=3, input_size=SIZE,
        head_conv=32, shape_size=16, mask_size=16,
    )
    images, objects = two_images()
    targets = [
        encode_targets(b, c, m, np.zeros(len(b), bool), input_size=SIZE, num_classes=3,
                       max_instances=8, mask_size=16)
        for b, c, m in objects
    ]
    batch = {k: tf.concat([tf.stack([t[k] for t in targets])] * copies, 0) for k in targets[0]}
    noise = np.random.default_rng(0).normal(0, 8, (copies - 1, *images.shape))
    noisy = np.concatenate([images, *(images + noise)]).astype(np.float32)
    dataset = tf.data.Dataset.from_tensors((noisy, batch)).repeat()

    trainer = CenterMask(Config(model=config))
    trainer.compile(optimizer=keras.optimizers.Adam(2e-3))
    history = trainer.fit(dataset, epochs=epochs, steps_per_epoch=30, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]

    outputs = trainer.network(images, training=False)
    detections = decode_detections(outputs, max_detections=10, score_threshold=0.3, mask_size=16)
    pasted = paste_masks(detections["masks"], detections["boxes"], SIZE, SIZE).numpy() >= 0.4
    ious = []
    for i, (boxes, classes, masks) in enumerate(objects):
        n = int(detections["num_detections"][i])
        for cls, mask in zip(classes, masks):
            same_class = [k for k in range(n) if int(detections["classes"][i, k]) == cls]
            best = max(
                ((pasted[i, k] & (mask > 0)).sum() / (pasted[i, k] | (mask > 0)).sum() for k in same_class),
                default=0.0,
            )
            ious.append(best)
    print("mask IoU per object:", np.round(ious, 3))
    assert np.mean(ious) >= 0.8, ious

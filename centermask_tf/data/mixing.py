"""Augmentations that mix training images on the canvas: mosaic and copy-paste.

Both work on augmented canvas samples (`pipeline.augment`: image float32 `[N, N, 3]`, boxes
`[n, 4]` (ymin, xmin, ymax, xmax) in canvas pixels, classes, is_crowd, uint8 masks `[n, N, N]` of
each object's visible pixels, surplus, seed). `mix_groups` groups consecutive samples of a
tf.data stream, and each sample of a group is replaced, with a probability, by a mix of the
group: the stream keeps its length and every step is a TF op.

- Mosaic (Ultralytics' default, 4 images): the canvas is split at a random centre and each
  quadrant shows the corner of one image of the group that touches the centre.
- Copy-paste (Ghiasi et al., CVPR 2021): a random half of another image's objects is pasted on
  top (same canvas position: each image was scaled and placed by its own random jitter, as in
  the paper). Pasted pixels are the source's, the pasted-over objects lose exactly the covered
  pixels, and an object left with less than `MIN_VISIBLE` of its pixels is dropped. The paper's
  Gaussian smoothing of pasted edges is left out (it reports no gain from it).

Objects cut by a quadrant or covered by a paste get boxes re-tightened to what is left; crowd
regions are never pasted and keep their flag (the encoders never make them positives).
"""

import tensorflow as tf

# An object with less than this fraction of its pixels left visible is dropped: the rule the
# shapes generator annotates by (`shapes._MIN_VISIBLE`), so mixed images look like its own.
MIN_VISIBLE = 0.25
# The keys of a canvas sample that hold one entry per object.
OBJECT_KEYS = ("boxes", "classes", "is_crowd", "masks")


def tightened_boxes(boxes, masks, changed):
    """`boxes` of the `changed` objects shrunk to the pixel extent of their masks.

    Intersecting the float box with the mask's whole-pixel extent keeps the box's sub-pixel
    sides where nothing was removed. An empty mask gives an empty box.

    Args:
        boxes: float32 `[n, 4]` (ymin, xmin, ymax, xmax) in canvas pixels.
        masks: uint8 `[n, N, N]`.
        changed: bool `[n]`, objects that lost pixels.
    """
    size = tf.shape(masks)[1]
    index = tf.range(size, dtype=tf.float32)

    def extent(present):  # [n, N] bool -> first, last + 1 (N, 0 when empty)
        first = tf.reduce_min(tf.where(present, index, tf.cast(size, tf.float32)), axis=1)
        return first, tf.reduce_max(tf.where(present, index + 1.0, 0.0), axis=1)

    present = masks > 0
    top, bottom = extent(tf.reduce_any(present, axis=2))
    left, right = extent(tf.reduce_any(present, axis=1))
    tight = tf.concat(
        [tf.maximum(boxes[:, :2], tf.stack([top, left], -1)), tf.minimum(boxes[:, 2:], tf.stack([bottom, right], -1))],
        axis=-1,
    )
    return tf.where(changed[:, None], tight, boxes)


def _keep_visible(sample, masks, valid):
    """`sample` with `masks` (its objects' masks after a cover or cut); objects that lost
    pixels get tightened boxes, and those left with less than `MIN_VISIBLE` are invalid."""
    before = tf.reduce_sum(tf.cast(sample["masks"], tf.float32), axis=[1, 2])
    after = tf.reduce_sum(tf.cast(masks, tf.float32), axis=[1, 2])
    changed = after < before
    visible = tf.logical_not(changed) | (after >= MIN_VISIBLE * before)
    boxes = tightened_boxes(sample["boxes"], masks, changed)
    return dict(sample, masks=masks, boxes=boxes, valid=valid & visible)


def _padded(sample, count):
    """`sample`'s objects padded with invalid ones to `count`."""
    extra = count - tf.shape(sample["valid"])[0]
    padded = {}
    for key in (*OBJECT_KEYS, "valid"):
        value = sample[key]
        padded[key] = tf.pad(value, [[0, extra]] + [[0, 0]] * (len(value.shape) - 1))
    return dict(sample, **padded)


def _concat(samples, **rest):
    """One sample holding the objects of `samples` in order, with the other keys from `rest`."""
    objects = {key: tf.concat([s[key] for s in samples], axis=0) for key in (*OBJECT_KEYS, "valid")}
    return dict(rest, **objects)


def mosaic(samples, order, centre):
    """A mosaic of four canvas samples.

    Rolling every canvas by `centre` puts each one's bottom-right corner just above-left of the
    centre, its bottom-left corner above-right of it, and so on: quadrant k (0 top-left, 1
    top-right, 2 bottom-left, 3 bottom-right) shows sample `order[k]` rolled.

    Args:
        samples: four canvas samples with `valid` flags.
        order: four Python ints, the sample shown in each quadrant.
        centre: int32 `[2]` (y, x), where the quadrants meet.
    """
    size = tf.shape(samples[0]["image"])[0]
    rows = tf.range(size)[:, None] >= centre[0]
    cols = tf.range(size)[None, :] >= centre[1]
    shift = tf.concat([centre, centre], 0)
    parts = []
    image = 0.0
    for quadrant, index in enumerate(order):
        sample = samples[index]
        region = (rows if quadrant >= 2 else ~rows) & (cols if quadrant % 2 else ~cols)  # [N, N]
        image += tf.roll(sample["image"], centre, axis=[0, 1]) * tf.cast(region, tf.float32)[..., None]
        masks = tf.roll(sample["masks"], centre, axis=[1, 2]) * tf.cast(region, tf.uint8)[None]
        # Where the quadrant's content came from: the top quadrants show rows N - cy.. of their
        # sample (shifted by cy - N), the bottom ones rows 0.. (shifted by cy); likewise columns.
        top_left = tf.stack([0 if quadrant < 2 else centre[0], 0 if quadrant % 2 == 0 else centre[1]])
        bottom_right = tf.stack([centre[0] if quadrant < 2 else size, centre[1] if quadrant % 2 == 0 else size])
        offset = shift - tf.stack([size if quadrant < 2 else 0, size if quadrant % 2 == 0 else 0] * 2)
        boxes = sample["boxes"] + tf.cast(offset, tf.float32)
        boxes = tf.clip_by_value(
            boxes, tf.cast(tf.tile(top_left, [2]), tf.float32), tf.cast(tf.tile(bottom_right, [2]), tf.float32)
        )
        parts.append(_keep_visible(dict(sample, boxes=boxes), masks, sample["valid"]))
    return _concat(parts, image=image, surplus=sum(s["surplus"] for s in samples), seed=samples[order[0]]["seed"])


def copy_paste(target, source, seed):
    """`target` with a random half of `source`'s objects pasted on top (crowd regions never).

    Args:
        target, source: canvas samples with `valid` flags.
        seed: `[2]` int seed of the object choice.
    """
    count = tf.shape(source["valid"])[0]
    chosen = (
        (tf.random.stateless_uniform([count], seed) < 0.5)
        & source["valid"]
        & tf.logical_not(source["is_crowd"])
    )
    pasted = tf.reduce_max(source["masks"] * tf.cast(chosen, tf.uint8)[:, None, None], axis=0)  # [N, N]
    image = tf.where(pasted[..., None] > 0, source["image"], target["image"])
    covered = _keep_visible(target, target["masks"] * (1 - pasted)[None], target["valid"])
    return _concat(
        [covered, dict(source, valid=chosen)], image=image, surplus=target["surplus"], seed=target["seed"]
    )


def _unstack(group, size):
    return [{key: value[i] for key, value in group.items()} for i in range(size)]


def _mix_or_keep(samples, draws, probability, mix):
    """Each sample replaced by `mix(i)` (a mix of all of them) when its draw is below
    `probability`, stacked. A mix holds every object slot of the group (len(samples) times
    the padded count), so samples kept as they are are padded to that."""
    count = len(samples) * tf.shape(samples[0]["valid"])[0]
    outputs = [
        tf.cond(tf.random.stateless_uniform([], draw) < probability,
                lambda i=i: mix(i), lambda sample=sample: _padded(sample, count))
        for i, (sample, draw) in enumerate(zip(samples, draws))
    ]
    return {key: tf.stack([output[key] for output in outputs]) for key in outputs[0]}


def _mosaic_group(group, probability):
    samples = _unstack(group, 4)
    seeds = [tf.random.experimental.stateless_split(sample["seed"], 2) for sample in samples]

    def mix(i):  # sample i in the top-left quadrant, the next ones in reading order
        size = tf.cast(tf.shape(samples[i]["image"])[0], tf.float32)
        centre = tf.cast(tf.random.stateless_uniform([2], seeds[i][0], 0.25 * size, 0.75 * size), tf.int32)
        return mosaic(samples, [(i + k) % 4 for k in range(4)], centre)

    return _mix_or_keep(samples, [seed[1] for seed in seeds], probability, mix)


def _copy_paste_group(group, probability):
    samples = _unstack(group, 2)
    # Other draws than the mosaic's from the same element seed.
    seeds = [tf.random.experimental.stateless_split(tf.bitwise.bitwise_xor(s["seed"], 0x5EED), 2) for s in samples]
    return _mix_or_keep(
        samples, [seed[1] for seed in seeds], probability, lambda i: copy_paste(samples[i], samples[1 - i], seeds[i][0])
    )


MIXES = {"mosaic": (4, _mosaic_group), "copy_paste": (2, _copy_paste_group)}


def mix_groups(dataset, kind, probability, deterministic):
    """Replaces each canvas sample of `dataset`, with `probability`, by a mix (`MIXES`) of the
    group of consecutive samples it belongs to. Samples keep their keys; objects a mix drops
    are gone, those it adds are appended."""
    size, mix = MIXES[kind]

    def flag(sample):
        # At least one (invalid) slot: `unbatch` of a zero-size tensor (a group of images
        # without objects) segfaults in TF 2.21.
        sample = dict(sample, valid=tf.ones(tf.shape(sample["classes"]), tf.bool))
        return _padded(sample, tf.maximum(tf.size(sample["classes"]), 1))

    def unflag(sample):
        valid = sample.pop("valid")
        return dict(sample, **{key: tf.boolean_mask(sample[key], valid) for key in OBJECT_KEYS})

    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    dataset = dataset.map(flag).padded_batch(size, drop_remainder=True)
    return dataset.map(lambda group: mix(group, probability), **parallel).unbatch().map(unflag)

"""tf.data pipelines over a prepared `CocoFolder` TFDS dataset.

read -> decode (JPEG/PNG/..., grayscale and RGBA -> RGB; RLE masks with `tf.repeat`) ->
augment (random scale, crop/placement, horizontal flip, colour jitter; boxes and masks move with
the image; objects cropped away are dropped) -> resample onto the square input canvas ->
`encode_targets` -> batch -> prefetch. Every step is a TF op (no `py_function`) and runs with
`AUTOTUNE` parallelism. Random draws are stateless, seeded by (seed, element index), so
`data.deterministic: true` reproduces the same batches run after run.

Training elements are `(images, targets)`: `images` float32 `[B, N, N, 3]` RGB in [0, 255] and
`targets` the `target_spec` dict. Validation elements are `(images, info)` with `info` =
`image_id` int64, `original_size` int32 (h, w) and `scale` float32 (input pixels per original
pixel; the image sits at the canvas's top-left corner).
"""

import tensorflow as tf

from centermask_tf.data.targets import encode_targets


def decode_rle(counts, runs, height, width):
    """Expands concatenated uncompressed COCO RLE counts into `[N, height, width]` uint8 masks.

    Args:
        counts: `[R]` int32 run lengths of all objects, each object's runs alternating 0/1
            (starting with 0) in column-major order.
        runs: `[N]` number of runs of each object.
    """
    starts = tf.cumsum(runs, exclusive=True)
    run_index = tf.range(tf.size(counts)) - tf.repeat(starts, runs)  # position within its object
    values = tf.cast(run_index % 2, tf.uint8)
    flat = tf.repeat(values, counts)  # [N * W * H]
    masks = tf.reshape(flat, [tf.size(runs), width, height])  # column-major
    return tf.transpose(masks, [0, 2, 1])


def decode_example(example):
    """A TFDS example -> image uint8 `[H, W, 3]`, boxes, classes, crowd flags, masks, ids."""
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    height, width = example["height"], example["width"]
    objects = example["objects"]
    return {
        "image": image,
        "boxes": objects["bbox"],
        "classes": objects["label"],
        "is_crowd": objects["is_crowd"],
        "masks": decode_rle(example["rle"], objects["runs"], height, width),
        "image_id": example["image_id"],
        "original_size": tf.stack([height, width]),
    }


def place_on_canvas(sample, size, scale, offset, flip):
    """Resamples image, masks and boxes so that canvas = original * scale + offset (then flip).

    Args:
        sample: a `decode_example` dict.
        size: canvas side N.
        scale: scalar, canvas pixels per original pixel.
        offset: `[2]` (y, x) canvas position of the original's top-left corner.
        flip: scalar bool, mirror the canvas horizontally.

    Returns:
        `sample` with `image` float32 `[N, N, 3]`, `masks` uint8 `[n, N, N]`, and boxes in canvas
        pixels; objects left with less than 1 px of height or width are dropped.
    """
    original = tf.cast(sample["original_size"], tf.float32)
    # Canvas pixel centre u + 0.5 sits at original position (u + 0.5 - offset) / scale; in
    # crop_and_resize's corner-aligned normalised coordinates that gives this box.
    first = (0.5 - offset) / scale - 0.5
    last = (size - 0.5 - offset) / scale - 0.5
    extent = tf.maximum(original - 1.0, 1.0)
    window = tf.concat([first / extent, last / extent], axis=0)[None]  # [1, 4]

    image = tf.image.crop_and_resize(
        tf.cast(sample["image"], tf.float32)[None], window, [0], [size, size]
    )[0]
    masks = sample["masks"]
    count = tf.shape(masks)[0]
    masks = tf.image.crop_and_resize(
        tf.cast(masks, tf.float32)[..., None],
        tf.tile(window, [count, 1]),
        tf.range(count),
        [size, size],
    )[..., 0]
    masks = tf.cast(masks >= 0.5, tf.uint8)

    boxes = sample["boxes"] * scale + tf.tile(offset, [2])[None]
    boxes = tf.clip_by_value(boxes, 0.0, float(size))
    if flip is not None:
        image = tf.cond(flip, lambda: image[:, ::-1], lambda: image)
        masks = tf.cond(flip, lambda: masks[:, :, ::-1], lambda: masks)
        mirrored = tf.stack([boxes[:, 0], size - boxes[:, 3], boxes[:, 2], size - boxes[:, 1]], -1)
        boxes = tf.cond(flip, lambda: mirrored, lambda: boxes)

    keep = (boxes[:, 2] - boxes[:, 0] >= 1.0) & (boxes[:, 3] - boxes[:, 1] >= 1.0)
    return dict(
        sample,
        image=image,
        masks=tf.boolean_mask(masks, keep),
        boxes=tf.boolean_mask(boxes, keep),
        classes=tf.boolean_mask(sample["classes"], keep),
        is_crowd=tf.boolean_mask(sample["is_crowd"], keep),
    )


def _jitter_colour(image, strength, seeds):
    """CenterNet-style brightness, contrast and saturation jitter of a [0, 255] image."""
    factors = 1.0 + tf.random.stateless_uniform([3], seeds, -strength, strength)
    gray = tf.image.rgb_to_grayscale(image)
    image = image * factors[0]
    image = image * factors[1] + tf.reduce_mean(gray) * factors[0] * (1.0 - factors[1])
    gray = tf.image.rgb_to_grayscale(image)
    image = image * factors[2] + gray * (1.0 - factors[2])
    return tf.clip_by_value(image, 0.0, 255.0)


def augment(sample, size, data_config, seed):
    """Random scale, crop/placement, flip and colour jitter onto an N x N canvas.

    Args:
        sample: a `decode_example` dict.
        size: canvas side N.
        data_config: a `DataConfig` (scale_range, flip, color_jitter).
        seed: `[2]` int seed of this element (stateless random ops).
    """
    seeds = tf.random.experimental.stateless_split(seed, 4)
    original = tf.cast(sample["original_size"], tf.float32)
    low, high = data_config.scale_range
    scale = size / tf.reduce_max(original) * tf.random.stateless_uniform([], seeds[0], low, high)
    free = size - original * scale  # < 0: the image is larger than the canvas -> random crop
    offset = tf.random.stateless_uniform([2], seeds[1]) * free
    flip = tf.random.stateless_uniform([], seeds[2]) < 0.5 if data_config.flip else None
    sample = place_on_canvas(sample, size, scale, offset, flip)
    if data_config.color_jitter > 0:
        sample["image"] = _jitter_colour(sample["image"], data_config.color_jitter, seeds[3])
    return sample


def letterbox(sample, size):
    """Deterministic resize: the long side fits the canvas, image at the top-left corner."""
    scale = size / tf.reduce_max(tf.cast(sample["original_size"], tf.float32))
    sample = place_on_canvas(sample, size, scale, tf.zeros([2]), None)
    sample["scale"] = scale
    return sample


def _options(deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    return options


def train_dataset(
    builder, data_config, *, input_size, num_classes, mask_size, batch_size, stride=4, seed=0
):
    """Infinite, shuffled, augmented training batches `(images, targets)`.

    Args:
        builder: a prepared `CocoFolder` builder (`tfds_builder.prepare_dataset`).
        data_config: the `DataConfig` section.
        input_size, num_classes, mask_size, stride: what the targets are encoded for.
        batch_size: global batch size (a `tf.distribute` strategy splits it).
        seed: base seed for shuffling and augmentation.
    """
    deterministic = data_config.deterministic
    dataset = builder.as_dataset(split="train", shuffle_files=not deterministic)
    dataset = dataset.repeat().shuffle(data_config.shuffle_buffer, seed=seed)

    def prepare(index, example):
        sample = augment(decode_example(example), input_size, data_config, tf.stack([seed, index]))
        targets = encode_targets(
            sample["boxes"],
            sample["classes"],
            sample["masks"],
            sample["is_crowd"],
            input_size=input_size,
            num_classes=num_classes,
            max_instances=data_config.max_instances,
            mask_size=mask_size,
            stride=stride,
        )
        return sample["image"], targets

    dataset = dataset.enumerate().map(
        lambda i, ex: prepare(tf.cast(i, tf.int32), ex),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=deterministic,
    )
    dataset = dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return dataset.with_options(_options(deterministic))


def eval_dataset(builder, *, input_size, batch_size, split="val"):
    """Letterboxed validation batches `(images, info)` in a fixed order (see module docstring)."""

    def prepare(example):
        sample = letterbox(decode_example(example), input_size)
        info = {
            "image_id": sample["image_id"],
            "original_size": sample["original_size"],
            "scale": sample["scale"],
        }
        return sample["image"], info

    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)

"""tf.data pipelines over a prepared `CocoFolder` TFDS dataset.

read -> decode (JPEG/PNG/..., grayscale and RGBA -> RGB; RLE masks by cumulative sums) ->
augment (random scale or large-scale jitter, crop/placement, horizontal flip, colour jitter;
boxes and masks move with the image; objects cropped away are dropped) -> resample onto the
square input canvas -> mosaic and copy-paste (`mixing`, optional) -> the architecture's target
encoder -> batch -> prefetch. Every step is a TF op (no `py_function`) and runs with
`AUTOTUNE` parallelism. Random draws are stateless, seeded by (seed, element index), so
`data.deterministic: true` reproduces the same batches run after run.

Training elements are `(images, targets)`: `images` float32 `[B, N, N, 3]` RGB in [0, 255] and
`targets` the `target_spec` dict. Validation elements are `(images, info)` with `info` =
`image_id` int64, `original_size` int32 (h, w) and `scale` float32 (input pixels per original
pixel; the image sits at the canvas's top-left corner).
"""

import tensorflow as tf

from centermask_tf.data.instances import target_instances
from centermask_tf.data.mixing import mix_groups
from centermask_tf.data.service import wait_reachable

# Large-scale jitter (Ghiasi et al., CVPR 2021): the image's scale factor drawn from 0.1-2.0
# instead of `data.scale_range`, then cropped or padded onto the canvas like any scale.
LARGE_SCALE_JITTER = (0.1, 2.0)


def decode_rle(counts, runs, height, width):
    """Expands concatenated uncompressed COCO RLE counts into `[N, height, width]` uint8 masks.

    Linear in the number of pixels: mark where each run ends, cumsum the marks to get every
    pixel's run number, and take its parity within its object (runs alternate 0/1, starting
    with 0). `tf.repeat` would build a `[runs, longest run]` mask instead, ~100x slower here.

    Args:
        counts: `[R]` int32 run lengths of all objects, each object's runs in column-major order.
        runs: `[N]` number of runs of each object.
    """
    count = tf.size(runs)
    area = height * width
    ends = tf.cumsum(counts)[:, None]  # [R, 1] position where the next run starts
    # uint8 arithmetic wraps modulo 256, which keeps parity and moves 4x fewer bytes.
    marks = tf.scatter_nd(ends, tf.ones_like(counts, tf.uint8), [count * area + 1])[:-1]
    run_number = tf.reshape(tf.cumsum(marks), [count, area])  # global run of each pixel
    first_run = tf.cast(tf.cumsum(runs, exclusive=True) % 256, tf.uint8)[:, None]  # [N, 1]
    values = tf.bitwise.bitwise_and(run_number - first_run, 1)
    return tf.transpose(tf.reshape(values, [count, width, height]), [0, 2, 1])  # column-major


def decode_example(example, max_objects=None):
    """A TFDS example -> image uint8 `[H, W, 3]`, boxes, classes, crowd flags, masks, ids.

    With `max_objects`, only the first `max_objects` objects that can become targets (not crowd,
    a box of positive size; `targets.target_instances`) are kept, and only their masks are
    decoded: an image with 100,000 annotations must not decode 100,000 masks for 128 slots.
    `surplus` counts the others, which the targets' `dropped` count includes.
    """
    image = tf.io.decode_image(example["image"], channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    height, width = example["height"], example["width"]
    objects = dict(example["objects"])
    rle, surplus = example["rle"], tf.constant(0, tf.int32)
    if max_objects is not None:
        keep, total = target_instances(objects["bbox"], objects["is_crowd"], max_objects)
        surplus = total - tf.size(keep)
        runs = tf.RaggedTensor.from_row_lengths(rle, tf.cast(objects["runs"], tf.int64))
        rle = tf.gather(runs, keep).flat_values
        objects = {name: tf.gather(value, keep) for name, value in objects.items()}
    return {
        "image": image,
        "boxes": objects["bbox"],
        "classes": objects["label"],
        "is_crowd": objects["is_crowd"],
        "masks": decode_rle(rle, objects["runs"], height, width),
        "image_id": example["image_id"],
        "original_size": tf.stack([height, width]),
        "surplus": surplus,
    }


def canvas_window(original_size, size, scale, offset):
    """The `crop_and_resize` box `[4]` (y1, x1, y2, x2) that maps an image of `original_size`
    (h, w) onto a `size` canvas as canvas = original * scale + offset."""
    # Canvas pixel centre u + 0.5 sits at original position (u + 0.5 - offset) / scale; in
    # crop_and_resize's corner-aligned normalised coordinates that gives this box.
    first = (0.5 - offset) / scale - 0.5
    last = (size - 0.5 - offset) / scale - 0.5
    extent = tf.maximum(original_size - 1.0, 1.0)
    return tf.concat([first / extent, last / extent], axis=0)


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
    window = canvas_window(original, size, scale, offset)
    if flip is not None:
        # x1 > x2 makes crop_and_resize mirror the crop: the flip costs nothing.
        window = tf.where(flip, tf.gather(window, [0, 3, 2, 1]), window)
    # crop_and_resize reads uint8 directly: no full-size float copy of the image.
    image = tf.image.crop_and_resize(sample["image"][None], window[None], [0], [size, size])[0]

    # Binary masks take the nearest original pixel: two uint8 gathers instead of a float
    # bilinear resample of N full-size maps (the pipeline's largest cost at 512 px).
    centres = tf.range(size, dtype=tf.float32) + 0.5
    source = tf.floor((centres[None, :] - offset[:, None]) / scale)  # [2, N]: rows, cols
    inside = (source >= 0) & (source < original[:, None])
    source = tf.cast(tf.clip_by_value(source, 0.0, original[:, None] - 1.0), tf.int32)
    rows, cols = source[0], source[1]
    rows_inside, cols_inside = inside[0], inside[1]
    if flip is not None:
        cols = tf.cond(flip, lambda: cols[::-1], lambda: cols)
        cols_inside = tf.cond(flip, lambda: cols_inside[::-1], lambda: cols_inside)
    masks = tf.gather(tf.gather(sample["masks"], rows, axis=1), cols, axis=2)  # [n, N, N]
    masks *= tf.cast(rows_inside[:, None] & cols_inside[None, :], tf.uint8)

    boxes = sample["boxes"] * scale + tf.tile(offset, [2])[None]
    boxes = tf.clip_by_value(boxes, 0.0, float(size))
    if flip is not None:
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
    """CenterNet-style brightness, contrast and saturation jitter of a [0, 255] image.

    The three adjustments are linear (scale; blend with the mean grey; blend with the grey
    image), so they fold into one multiply-add with the grey image: two passes, not ten.
    """
    brightness, contrast, saturation = tf.unstack(
        1.0 + tf.random.stateless_uniform([3], seeds, -strength, strength)
    )
    gray = tf.image.rgb_to_grayscale(image)  # [N, N, 1]
    gain = brightness * contrast
    bias = tf.reduce_mean(gray) * brightness * (1.0 - contrast)
    image = image * (gain * saturation) + gray * (gain * (1.0 - saturation)) + bias
    return tf.clip_by_value(image, 0.0, 255.0)


def augment(sample, size, data_config, seed):
    """Random scale, crop/placement, flip and colour jitter onto an N x N canvas.

    Args:
        sample: a `decode_example` dict.
        size: canvas side N.
        data_config: a `DataConfig` (scale_range, large_scale_jitter, flip, color_jitter).
        seed: `[2]` int seed of this element (stateless random ops).
    """
    seeds = tf.random.experimental.stateless_split(seed, 6)
    original = tf.cast(sample["original_size"], tf.float32)
    low, high = data_config.scale_range
    factor = tf.random.stateless_uniform([], seeds[0], low, high)
    if data_config.large_scale_jitter > 0:
        jitter = tf.random.stateless_uniform([], seeds[4], *LARGE_SCALE_JITTER)
        factor = tf.where(tf.random.stateless_uniform([], seeds[5]) < data_config.large_scale_jitter, jitter, factor)
    scale = size / tf.reduce_max(original) * factor
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


def letterbox_images(images, size):
    """`letterbox` for a batch of same-size images without annotations (prediction, export).

    Args:
        images: uint8 `[B, H, W, 3]`.
        size: canvas side N.

    Returns:
        (float32 canvases `[B, N, N, 3]`, scale: input pixels per original pixel).
    """
    original = tf.cast(tf.shape(images)[1:3], tf.float32)
    scale = size / tf.reduce_max(original)
    window = canvas_window(original, size, scale, tf.zeros([2]))
    batch = tf.shape(images)[0]
    canvases = tf.image.crop_and_resize(
        images, tf.tile(window[None], [batch, 1]), tf.range(batch), [size, size]
    )
    return canvases, scale


# What the augmentation stages pass on (`mixing` adds the element's seed).
CANVAS_KEYS = ("image", "boxes", "classes", "is_crowd", "masks", "surplus")


def _options(deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    options.autotune.enabled = True
    return options


def train_dataset(builder, data_config, *, input_size, batch_size, encode, seed=0):
    """Infinite, shuffled, augmented training batches `(images, targets)`.

    Args:
        builder: a prepared `CocoFolder` builder (`tfds_builder.prepare_dataset`).
        data_config: the `DataConfig` section.
        input_size: side of the square input canvas.
        batch_size: global batch size (a `tf.distribute` strategy splits it).
        encode: `(boxes, classes, masks, is_crowd) -> targets` of one image in canvas pixels:
            the architecture's target encoder (`Architecture.target_encoder`).
        seed: base seed for shuffling and augmentation.
    """
    deterministic = data_config.deterministic
    dataset = builder.as_dataset(split="train", shuffle_files=not deterministic)
    dataset = dataset.repeat().shuffle(data_config.shuffle_buffer, seed=seed)

    def prepare(index, example):
        sample = decode_example(example, data_config.max_instances)
        element_seed = tf.stack([seed, index])
        sample = augment(sample, input_size, data_config, element_seed)
        return {key: sample[key] for key in CANVAS_KEYS} | {"seed": element_seed}

    def encode_sample(sample):
        targets = encode(sample["boxes"], sample["classes"], sample["masks"], sample["is_crowd"])
        targets["dropped"] += sample["surplus"]
        return sample["image"], targets

    parallel = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    dataset = dataset.enumerate().map(lambda i, ex: prepare(tf.cast(i, tf.int32), ex), **parallel)
    # Mosaic, then copy-paste onto mosaics too (as Ultralytics orders them).
    for kind in ("mosaic", "copy_paste"):
        if getattr(data_config, kind) > 0:
            dataset = mix_groups(dataset, kind, getattr(data_config, kind), deterministic)
    dataset = dataset.map(encode_sample, **parallel)
    dataset = dataset.batch(batch_size, drop_remainder=True)
    if data_config.service:
        dataset = dataset.apply(from_service(data_config.service, deterministic))
    return dataset.prefetch(tf.data.AUTOTUNE).with_options(_options(deterministic))


def from_service(address, deterministic=False):
    """Runs everything before it on the workers of the tf.data service at `address`.

    Sharding by file: each worker reads its own share of the dataset's files, so no example is
    prepared twice (TFDS writes COCO train as 256 files; a set under about 128 MB is one file,
    and then each worker prepares every batch and keeps its share). In deterministic mode
    always by batch, so the batches are exactly the in-process ones, at the cost of repeated
    work. Both need the dispatcher to know its workers (`centermask data-service dispatcher
    --workers`). An address where no dispatcher answers is refused within
    `service.CONNECT_TIMEOUT` seconds (tf.data itself would wait forever, silently)."""
    wait_reachable(address, "data.service")
    policy = tf.data.experimental.service.ShardingPolicy
    return tf.data.experimental.service.distribute(
        processing_mode=policy.DATA if deterministic else policy.FILE_OR_DATA, service=address
    )


def eval_dataset(builder, *, input_size, batch_size, split="val", max_images=None):
    """Letterboxed validation batches `(images, info)` in a fixed order (see module docstring),
    of the first `max_images` images (None: all). `info["annotation_ids"]` (ragged `[B, None]`)
    lists the annotations each image kept when the dataset was built: the evaluation's ground
    truth, so evaluating never decodes a mask again."""

    def prepare(example):
        sample = letterbox(decode_example(example, max_objects=0), input_size)  # no mask needed
        info = {
            "image_id": sample["image_id"],
            "original_size": sample["original_size"],
            "scale": sample["scale"],
            "annotation_ids": example["objects"]["id"],
        }
        return sample["image"], info

    dataset = builder.as_dataset(split=split, shuffle_files=False)
    if max_images:
        dataset = dataset.take(max_images)
    dataset = dataset.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return dataset.ragged_batch(batch_size).prefetch(tf.data.AUTOTUNE)

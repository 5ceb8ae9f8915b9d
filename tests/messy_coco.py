"""A COCO-format folder the package never generated: what users' exports really look like.

Non-contiguous category ids (3, 7, 12), arbitrary image ids, JPEG and PNG, grayscale and RGBA
images, polygons, compressed and uncompressed RLE, a crowd region, and one sample of every fault
kind in `centermask_tf.data.coco.FAULT_KINDS`.
"""

import json
import os

import numpy as np
import pycocotools.mask as mask_utils
import tensorflow as tf

from centermask_tf.data.coco import uncompressed_counts

CATEGORY_IDS = (3, 7, 12)
GOOD_IMAGES = 6
# The fault kinds and how many of each `write_messy_coco` plants.
PLANTED_FAULTS = {
    "missing_image": 1,
    "unreadable_image": 2,
    "unsafe_path": 1,
    "size_mismatch": 1,
    "orphan_annotation": 1,
    "unknown_category": 1,
    "zero_area_box": 1,
    "degenerate_polygon": 1,
    "empty_segmentation": 1,
    "bad_rle": 1,
    "out_of_bounds": 1,
    "bad_image_record": 2,
    "bad_annotation_record": 3,
}


def _rectangle(h, w, y0, x0, y1, x1):
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 1
    return mask


def write_messy_coco(root, split="train"):
    """Writes `root/annotations/instances_{split}.json` and `root/{split}/`; returns the paths."""
    images_dir = os.path.join(root, split)
    os.makedirs(images_dir, exist_ok=True)
    os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
    rng = np.random.default_rng(7)
    images, annotations = [], []

    def add_ann(image_id, category_id, segmentation, bbox, iscrowd=0):
        annotations.append(
            {"id": 1000 + len(annotations), "image_id": image_id, "category_id": category_id,
             "segmentation": segmentation, "bbox": bbox, "area": float(bbox[2] * bbox[3]),
             "iscrowd": iscrowd}
        )

    formats = ["rgb.jpg", "gray.png", "rgba.png", "gray.jpg", "rgb.png", "rgb.jpg"]
    for i, kind in enumerate(formats):
        h, w = 72 + 8 * i, 96 - 4 * i
        image_id = 5000 + 37 * i  # arbitrary, non-consecutive ids
        channels = {"rgb": 3, "gray": 1, "rgba": 4}[kind.split(".")[0]]
        pixels = rng.integers(0, 120, (h, w, channels), dtype=np.uint8)
        y0, x0 = 8 + i, 10 + 2 * i
        pixels[y0 : y0 + 30, x0 : x0 + 24] = 230
        if channels == 4:
            pixels[..., 3] = 255
        encode = tf.io.encode_png if kind.endswith("png") else tf.io.encode_jpeg
        file_name = f"img_{image_id}_{kind.replace('.', '_')}.{kind.split('.')[1]}"
        tf.io.write_file(os.path.join(images_dir, file_name), encode(pixels))
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        category = CATEGORY_IDS[i % 3]
        bbox = [float(x0), float(y0), 24.0, 30.0]
        if i % 3 == 0:
            polygon = [x0, y0, x0 + 24, y0, x0 + 24, y0 + 30, x0, y0 + 30]
            add_ann(image_id, category, [polygon], bbox)
        else:
            mask = _rectangle(h, w, y0, x0, y0 + 30, x0 + 24)
            if i % 3 == 1:
                rle = mask_utils.encode(np.asfortranarray(mask))
                segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            else:
                segmentation = {"size": [h, w], "counts": uncompressed_counts(mask).tolist()}
            add_ann(image_id, category, segmentation, bbox)
        if i == 2:  # a crowd region beside the object
            crowd = _rectangle(h, w, 50, 40, 70, 60)
            add_ann(image_id, CATEGORY_IDS[0], {"size": [h, w], "counts": uncompressed_counts(crowd).tolist()},
                    [40.0, 50.0, 20.0, 20.0], iscrowd=1)

    good = images[0]
    h, w, gid = good["height"], good["width"], good["id"]
    # Annotation faults, all on the first good image (the image itself stays usable).
    add_ann(999999, 3, [[1, 1, 5, 1, 5, 5]], [1.0, 1.0, 4.0, 4.0])  # orphan_annotation
    add_ann(gid, 5, [[1, 1, 5, 1, 5, 5]], [1.0, 1.0, 4.0, 4.0])  # unknown_category
    add_ann(gid, 7, [[1, 1, 5, 1, 5, 5]], [1.0, 1.0, 0.0, 4.0])  # zero_area_box
    add_ann(gid, 7, [[1, 1, 5, 1]], [1.0, 1.0, 4.0, 4.0])  # degenerate_polygon
    add_ann(gid, 7, [], [1.0, 1.0, 4.0, 4.0])  # empty_segmentation
    add_ann(gid, 7, {"size": [h + 1, w], "counts": [h * w]}, [1.0, 1.0, 4.0, 4.0])  # bad_rle
    add_ann(gid, 7, [[1, 1, 500, 1, 500, 5]], [1.0, 1.0, 499.0, 4.0])  # out_of_bounds
    # bad_annotation_record: wrong types, as hand-edited or exported-by-script JSON has them.
    add_ann(gid, 7, [[1, 1, 5, 1, 5, 5]], [1.0, 1.0, 4.0, 4.0])
    annotations[-1]["bbox"] = ["1", "1", "4", "4"]
    add_ann(str(gid), 7, [[1, 1, 5, 1, 5, 5]], [1.0, 1.0, 4.0, 4.0])
    add_ann(gid, "7", [[1, 1, 5, 1, 5, 5]], [1.0, 1.0, 4.0, 4.0])

    # Image faults.
    def add_image(file_name, height=40, width=40):
        image_id = 9000 + len(images)
        images.append({"id": image_id, "file_name": file_name, "height": height, "width": width})
        add_ann(image_id, 3, [[2, 2, 20, 2, 20, 20]], [2.0, 2.0, 18.0, 18.0])

    add_image("does_not_exist.jpg")  # missing_image
    jpeg = tf.io.encode_jpeg(np.zeros((40, 40, 3), np.uint8)).numpy()
    with open(os.path.join(images_dir, "truncated.jpg"), "wb") as f:
        f.write(jpeg[: len(jpeg) // 3])
    add_image("truncated.jpg")  # unreadable_image
    with open(os.path.join(images_dir, "notes.jpg"), "w") as f:
        f.write("this is not an image")
    add_image("notes.jpg")  # unreadable_image
    tf.io.write_file(os.path.join(root, "outside.png"), tf.io.encode_png(np.zeros((40, 40, 3), np.uint8)))
    add_image("../outside.png")  # unsafe_path
    tf.io.write_file(os.path.join(images_dir, "wrong_size.png"), tf.io.encode_png(np.zeros((30, 40, 3), np.uint8)))
    add_image("wrong_size.png")  # size_mismatch
    # bad_image_record: a string id, and a string height.
    images.append({"id": "9100", "file_name": "img.png", "height": 40, "width": 40})
    images.append({"id": 9101, "file_name": "wrong_size.png", "height": "30", "width": 40})

    categories = [{"id": c, "name": f"class_{c}"} for c in reversed(CATEGORY_IDS)]
    annotation_path = os.path.join(root, "annotations", f"instances_{split}.json")
    with open(annotation_path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    return annotation_path, images_dir

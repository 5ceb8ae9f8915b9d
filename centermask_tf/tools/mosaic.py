"""Large images from a small-image split: `grid x grid` mosaics of its images with their
annotations moved along, so that objects are small relative to the image, to measure what tiled
inference recovers.

    centermask mosaic --annotations work/shapes/annotations/instances_val.json \\
        --images work/shapes/val --grid 4 --output work/mosaics
    centermask evaluate --workdir work/demo --set data.val.annotations=work/mosaics/annotations/instances_val.json \\
        --set data.val.images=work/mosaics/val --set eval.tile=128

Each source image sits at the top-left of its cell (cells are the largest source side, the rest
a grey 114 fill); the last mosaic leaves its unused cells empty. Every annotation keeps its
category, crowd flag and mask (written as compressed RLE at the mosaic's size); ids are renumbered.
"""

import os

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from centermask_tf.data.coco import load_annotations
from centermask_tf.files import atomic_write, write_json
from centermask_tf.images import load_image

FILL = 114


def make_mosaics(annotations, images, output, grid=4, split="val"):
    """Writes `output/<split>/mosaic_NNNN.png` and `output/annotations/instances_<split>.json`;
    returns (mosaics, annotations) written."""
    coco = load_annotations(annotations)
    ids = sorted(coco.imgs)
    cell = max(max(coco.imgs[i]["height"], coco.imgs[i]["width"]) for i in ids)
    side = grid * cell
    out_images, out_annotations = [], []
    for m, start in enumerate(range(0, len(ids), grid * grid)):
        canvas = np.full((side, side, 3), FILL, np.uint8)
        mosaic_id = m + 1
        for k, image_id in enumerate(ids[start : start + grid * grid]):
            info = coco.imgs[image_id]
            top, left = (k // grid) * cell, (k % grid) * cell
            pixels = load_image(os.path.join(images, info["file_name"]))
            canvas[top : top + pixels.shape[0], left : left + pixels.shape[1]] = pixels
            for ann in coco.imgToAnns[image_id]:
                mask = np.zeros((side, side), np.uint8, order="F")
                mask[top : top + info["height"], left : left + info["width"]] = coco.annToMask(ann)
                rle = mask_utils.encode(mask)
                x, y, w, h = ann["bbox"]
                out_annotations.append({
                    "id": len(out_annotations) + 1, "image_id": mosaic_id, "category_id": ann["category_id"],
                    "segmentation": {"size": [side, side], "counts": rle["counts"].decode("ascii")},
                    "area": float(mask_utils.area(rle)), "bbox": [x + left, y + top, w, h],
                    "iscrowd": int(ann.get("iscrowd", 0)),
                })
        name = f"mosaic_{mosaic_id:04d}.png"
        picture = Image.fromarray(canvas)
        atomic_write(os.path.join(output, split, name), lambda tmp, p=picture: p.save(tmp, format="PNG"), "mosaic",
                     canvas.size)
        out_images.append({"id": mosaic_id, "file_name": name, "height": side, "width": side})
    categories = [dict(c) for c in coco.dataset["categories"]]
    write_json(os.path.join(output, "annotations", f"instances_{split}.json"),
               {"images": out_images, "annotations": out_annotations, "categories": categories}, indent=None)
    return len(out_images), len(out_annotations)

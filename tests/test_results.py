"""`Results`: polygons that give the masks back, COCO annotations, selection, drawing; and tiled
inference, where an object cut by a seam comes out as one detection."""

import json

import cv2
import numpy as np
import pycocotools.mask as mask_utils
import pytest

from centermask_tf.errors import UserError
from centermask_tf.inference import ImageDetector
from centermask_tf.postprocess import InstanceMask
from centermask_tf.results import Results, mask_polygons
from centermask_tf.tiling import check_tiling, merge_tiles, tile_windows

CATEGORIES = [{"id": 4, "name": "star"}, {"id": 9, "name": "hexagon"}]


def rasterise(polygons, height, width):
    """What a COCO reader makes of polygons: pycocotools' fill, parts united."""
    flat = [np.asarray(p, np.float64).ravel().tolist() for p in polygons]
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(flat, height, width))).astype(bool)


def crop_of(full):
    rows, cols = np.nonzero(full)
    top, left = rows.min(), cols.min()
    return InstanceMask(int(top), int(left), full[top : rows.max() + 1, left : cols.max() + 1].copy())


def results_of(masks, scores=None, classes=None, image=None):
    n = len(masks)
    boxes = []
    for m in masks:
        rows, cols = np.nonzero(m.crop)
        boxes.append([m.left + cols.min(), m.top + rows.min(), m.left + cols.max() + 1, m.top + rows.max() + 1])
    return Results(
        boxes, np.linspace(0.9, 0.5, n) if scores is None else scores,
        [CATEGORIES[c]["id"] for c in (classes or [0] * n)], [CATEGORIES[c]["name"] for c in (classes or [0] * n)],
        masks, (40, 50), image,
    )


def test_polygons_of_squares_holes_and_parts_rasterise_to_the_same_pixels():
    full = np.zeros((40, 50), bool)
    full[5:25, 5:25] = True            # a square ...
    full[10:20, 10:20] = False         # ... with a square hole
    full[13:17, 13:17] = True          # ... holding an island
    full[30:38, 30:48] = True          # a second part
    full[30:38, 33:35] = False         # whose hole touches nothing: it splits it in two
    mask = crop_of(full)
    polygons = mask_polygons(mask)
    assert len(polygons) == 4  # square with its hole bridged in, island, two bars
    assert all(p.dtype == np.float32 and p.shape[1] == 2 for p in polygons)
    np.testing.assert_array_equal(rasterise(polygons, 40, 50), full)
    # Vertices lie a quarter pixel inside the pixel edges: the square spans x 5.25..24.75.
    outer = max(polygons, key=len)
    assert outer[:, 0].min() == pytest.approx(5.25) and outer[:, 0].max() == pytest.approx(24.75)


def test_polygons_of_the_shapes_sets_masks_give_them_back(shapes):
    """The round trip of every ground-truth mask of the shapes set (circles, rectangles,
    triangles; touching and cut by the border): polygons -> COCO -> masks."""
    from pycocotools.coco import COCO

    root, _ = shapes
    coco = COCO(str(root / "annotations" / "instances_train.json"))
    ious = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        full = coco.annToMask(ann).astype(bool)
        info = coco.imgs[ann["image_id"]]
        back = rasterise(mask_polygons(crop_of(full)), info["height"], info["width"])
        ious.append((back & full).sum() / (back | full).sum())
    assert len(ious) > 30
    assert min(ious) >= 0.95 and np.mean(ious) >= 0.99, (min(ious), np.mean(ious))


def test_results_select_read_like_dicts_and_write_coco_annotations():
    a, b, c = np.zeros((3, 40, 50), bool)
    a[2:12, 3:9] = True
    b[20:30, 20:45] = True
    c[30:40, 0:6] = True
    result = results_of([crop_of(a), crop_of(b), crop_of(c)], scores=[0.9, 0.6, 0.3], classes=[0, 1, 0])
    assert len(result) == 3 and set(result.keys()) >= {"boxes", "masks", "polygons"}
    np.testing.assert_array_equal(result["masks"], np.stack([a, b, c]))
    np.testing.assert_array_equal(result["boxes"][1], [20, 20, 45, 30])
    assert result[1].class_names == ["hexagon"] and len(result[1:]) == 2
    assert result[result.scores > 0.5].class_names == ["star", "hexagon"]
    assert len(result.filter(min_score=0.5, classes="star")) == 1
    assert result.filter(classes=[9]).class_names == ["hexagon"]
    np.testing.assert_array_equal(result.areas, [60, 250, 60])
    annotations = result.to_coco(image_id=7, first_id=11)
    assert [x["id"] for x in annotations] == [11, 12, 13]
    assert annotations[1] == {**annotations[1], "image_id": 7, "category_id": 9, "area": 250, "iscrowd": 0,
                              "bbox": [20.0, 20.0, 25.0, 10.0], "score": 0.6}
    for annotation, full in zip(annotations, [a, b, c]):
        np.testing.assert_array_equal(rasterise(annotation["segmentation"], 40, 50), full)
    rle = result.to_coco(segmentation="rle")[2]["segmentation"]
    np.testing.assert_array_equal(mask_utils.decode({**rle, "counts": rle["counts"].encode()}), c)
    json.dumps(annotations)  # plain Python types only
    with pytest.raises(KeyError, match="Results fields are"):
        result["mask"]


def test_plot_tints_mask_pixels_only_and_needs_an_image():
    image = np.full((40, 50, 3), 100, np.uint8)
    full = np.zeros((40, 50), bool)
    full[10:30, 10:30] = True
    result = results_of([crop_of(full)], image=image)
    overlay = result.plot(labels=False)
    assert overlay.shape == image.shape and overlay.dtype == np.uint8
    assert (overlay[12:28, 12:28] != 100).any(axis=-1).all()  # inside: tinted
    outside = np.ones((40, 50), bool)
    outside[9:31, 9:31] = False  # the box outline is drawn on the border
    assert (overlay[outside] == 100).all()
    with pytest.raises(UserError, match="pass plot"):
        Results(result.boxes, result.scores, result.class_ids, result.class_names, result.instance_masks,
                (40, 50)).plot()


# === Tiled inference ===

def test_tile_windows_cover_the_image_with_the_requested_overlap():
    windows = tile_windows(300, 520, 128, 0.25)
    covered = np.zeros((300, 520), int)
    for top, left, h, w in windows:
        assert h == 128 and w == 128
        covered[top : top + h, left : left + w] += 1
    assert covered.min() >= 1
    assert sorted({left for _, left, _, _ in windows}) == [0, 96, 192, 288, 384, 392]
    assert tile_windows(100, 120, 128) == [(0, 0, 100, 120)]  # fits in one tile: the whole image
    assert tile_windows(300, 520) == [(0, 0, 300, 520)]       # no tile: the whole image


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.6, 0.9])
def test_overlapping_tiles_are_found_among_neighbours_as_among_all_pairs(overlap):
    from centermask_tf.tiling import _intersection, _overlapping_pairs

    windows = tile_windows(700, 1000, 128, overlap)
    every = {(a, b) for a in range(len(windows)) for b in range(a + 1, len(windows))
             if _intersection(windows[a], windows[b]) is not None}
    found = [(a, b) for a, b, _ in _overlapping_pairs(windows)]
    assert len(found) == len(set(found)) and set(found) == every and every


@pytest.mark.parametrize("tile, overlap, message", [
    (64, 0.25, "at least the network input"), (128.0, 0.25, "an integer"), (128, 0.95, r"in \[0, 0.9\]"),
    (128, -0.1, r"in \[0, 0.9\]"),
])
def test_bad_tiling_arguments_are_refused(tile, overlap, message):
    with pytest.raises(UserError, match=message):
        check_tiling(tile, overlap, 128)


def found_of(masks, scores, classes):
    boxes = [[m.top, m.left, m.top + m.crop.shape[0], m.left + m.crop.shape[1]] for m in masks]
    return {"boxes": np.array(boxes, np.float32).reshape(-1, 4), "scores": np.array(scores, np.float32),
            "classes": np.array(classes), "masks": masks}


def test_a_seam_straddling_object_is_merged_and_its_neighbour_is_not():
    windows = [(0, 0, 100, 100), (0, 60, 100, 100)]  # a 40-px band: x 60..100; cores split at 80
    disc = np.zeros((100, 160), bool)
    yy, xx = np.mgrid[:100, :160]
    disc[(yy - 50) ** 2 + (xx - 80) ** 2 <= 30 ** 2] = True  # straddles both tiles' edges
    twin = np.zeros((100, 160), bool)
    twin[5:15, 62:72] = True   # a small square inside the band, seen whole by both tiles; tile 1 owns it
    other = np.zeros((100, 160), bool)
    other[85:95, 75:90] = True  # same class, overlaps the band, seen by tile 2 only
    left, right = disc.copy(), disc.copy()
    left[:, 100:] = False   # what tile 1 sees
    right[:, :60] = False   # what tile 2 sees
    parts = [found_of([crop_of(left), crop_of(twin)], [0.7, 0.5], [0, 0]),
             found_of([crop_of(right), crop_of(twin), crop_of(other)], [0.8, 0.6, 0.4], [0, 0, 0])]
    merged = merge_tiles(windows, parts)
    np.testing.assert_allclose(merged["scores"], [0.8, 0.5, 0.4])  # the disc's best half; the twin's owner
    whole = Results.from_detections({**merged, "size": (100, 160)}, CATEGORIES)
    np.testing.assert_array_equal(whole.masks, np.stack([disc, twin, other]))
    np.testing.assert_array_equal(whole.boxes[0], [50, 20, 111, 81])
    # Another class in the same place is another object.
    parts[1]["classes"] = np.array([1, 0, 0])
    assert len(merge_tiles(windows, parts)["scores"]) == 4
    # A view that no seam cuts wins over the union: tile 2 sees the object whole (x 66..96,
    # centre 81: its own); tile 1's view runs into its edge at 100 and too far left (58..100,
    # centre 79: its own too), an error a union would keep.
    small, wrong = np.zeros((2, 100, 160), bool)
    small[35:65, 66:96] = True
    wrong[35:65, 58:100] = True
    parts = [found_of([crop_of(wrong)], [0.9], [0]), found_of([crop_of(small)], [0.7], [0])]
    merged = merge_tiles(windows, parts)
    assert len(merged["masks"]) == 1 and merged["scores"][0] == np.float32(0.9)
    np.testing.assert_array_equal(Results.from_detections({**merged, "size": (100, 160)}, CATEGORIES).masks[0], small)
    np.testing.assert_array_equal(merged["boxes"][0], [35, 66, 65, 96])


def red_detector(input_size=64, cells=8):
    """A stand-in network: one detection per canvas, the red pixels (box and box-relative mask),
    score 0.9; nothing when a canvas holds no red."""

    def detect_canvases(canvases):
        canvases = np.asarray(canvases)
        n = len(canvases)
        out = {"boxes": np.zeros((n, 1, 4), np.float32), "scores": np.zeros((n, 1), np.float32),
               "classes": np.zeros((n, 1), np.int32), "masks": np.zeros((n, 1, cells, cells), np.float32),
               "num_detections": np.zeros(n, np.int32)}
        for i, canvas in enumerate(canvases):
            red = (canvas[..., 0] > 200) & (canvas[..., 1] < 50)
            if not red.any():
                continue
            rows, cols = np.nonzero(red)
            box = [rows.min(), cols.min(), rows.max() + 1, cols.max() + 1]
            crop = red[box[0] : box[2], box[1] : box[3]].astype(np.float32)
            out["boxes"][i, 0] = box
            out["masks"][i, 0] = cv2.resize(crop, (cells, cells), interpolation=cv2.INTER_AREA)
            out["scores"][i, 0], out["num_detections"][i] = 0.9, 1
        return out

    return ImageDetector(detect_canvases, input_size, CATEGORIES[:1], 0.3, 0.5)


def test_tiled_detection_finds_one_object_across_a_seam_and_keeps_image_pixels():
    image = np.zeros((100, 150, 3), np.uint8)
    yy, xx = np.mgrid[:100, :150]
    disc = (yy - 48) ** 2 + (xx - 75) ** 2 <= 20 ** 2  # crosses the seam at x = 64..86
    image[disc] = [255, 0, 0]
    detector = red_detector()
    (tiled,) = detector.detect(image, tile=64, tile_overlap=0.25, batch_size=3)
    assert len(tiled) == 1
    iou = (tiled.masks[0] & disc).sum() / (tiled.masks[0] | disc).sum()
    assert iou >= 0.9, iou
    np.testing.assert_allclose(tiled.boxes[0], [55, 28, 96, 69], atol=1.0)
    assert tiled.image is image and tiled.path is None
    (whole,) = detector.detect(image)  # one window: the image shrunk to 64 px
    assert len(whole) == 1 and tiled.scores[0] == whole.scores[0]
    # Streaming several images through shared batches keeps them apart and in order.
    empty = np.zeros((90, 200, 3), np.uint8)
    assert [len(r) for r in detector.detect([image, empty, image], tile=64, batch_size=4)] == [1, 0, 1]

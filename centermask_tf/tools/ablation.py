"""The paper's Local Shape / Global Saliency experiment: COCO AP with masks made of the Local
Shape alone, the Global Saliency alone, and both.

    centermask ablate --workdir work/demo       # one model trained with both, three inference modes
    centermask ablate --workdir work/ablation --config configs/shapes_tiny.yaml --train
                                                # one model trained per mode, same schedule

Writes into `WORKDIR/ablate/`: `ablation.json` (metrics per mode), `ablation.md` (the table),
`ablation.png` (the same validation images in three columns: Local Shape only, Global Saliency
only, both: the paper's figure) and per mode `<mode>/metrics.json` and `detections.json`. With
`--train`, `<mode>/` is that mode's training workdir (`model.mask_factors=<mode>`) and its
evaluation is in `<mode>/eval/`; a rerun reuses finished runs and resumes unfinished ones.
"""

import collections
import json
import os

from PIL import Image, ImageDraw, ImageFont

from centermask_tf.config import config_from_dict
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask, trained_factors
from centermask_tf.errors import UserError
from centermask_tf.evaluation import evaluate_detector
from centermask_tf.files import atomic_write, write_json, write_text
from centermask_tf.images import load_image
from centermask_tf.training.train import train
from centermask_tf.workdir import Workdir

# Column order of the table and the grid: each factor alone, then the product.
MODES = ("shape", "saliency", "both")
TITLES = {"shape": "Local Shape only", "saliency": "Global Saliency only", "both": "both (CenterMask)"}
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
# Grid cells: each overlay scaled so its longest side is this many pixels.
_CELL = 256
_GRID_SCORE = 0.3


def with_factors(config, mode):
    """`config` with `model.mask_factors=mode`; a Local-Shape-only network has no saliency map
    for `train.saliency_weight` to supervise, so its loss is off there."""
    overrides = [f"model.mask_factors={mode}"] + (["train.saliency_weight=0"] if mode == "shape" else [])
    return config_from_dict(config.to_dict(), overrides)


def trained_detectors(config, folder):
    """Trains one model per mode into `folder/<mode>` (finished runs are reused, unfinished
    ones resumed) and returns `{mode: (detector, evaluation folder)}`."""
    detectors = {}
    for mode in MODES:
        run, mode_config = os.path.join(folder, mode), with_factors(config, mode)
        if not Workdir(run).finished(mode_config):
            print(f"training {mode} ({TITLES[mode]}) into {run}")
            train(mode_config, run)
        detectors[mode] = (CenterMask.from_workdir(run), os.path.join(run, "eval"))
    return detectors


def inference_detectors(workdir, overrides, folder):
    """`{mode: (detector, evaluation folder)}`: the workdir's network, trained with both
    factors, assembling its masks in each mode (one network, three decoders)."""
    trained = trained_factors(workdir)
    if trained != "both":
        raise UserError(
            f"'{workdir}' was trained with model.mask_factors={trained}: it has one mask head, so it "
            "cannot assemble masks the three ways. Train one model per mode with --train --config C."
        )
    base = CenterMask.from_workdir(workdir, overrides=overrides)
    return {
        mode: (CenterMask(with_factors(base.config, mode), base.categories, base.network), os.path.join(folder, mode))
        for mode in MODES
    }


def ablate(workdir, config=None, train_models=False, overrides=(), images=4, evaluated=None):
    """Runs the experiment (see the module docstring) and writes its files.

    Args:
        workdir: a workdir trained with `mask_factors: both` (without `train_models`), or
            where the three runs go (with it).
        config: the `Config` to train (needed with `train_models`).
        train_models: train one model per mode instead of decoding one model three ways.
        overrides: "key=value" settings for the workdir's config (without `train_models`).
        images: validation images in the grid.
        evaluated: `{mode: metrics}` of modes already evaluated with the same settings (the
            demo's own evaluation of `both`): taken as they are, not evaluated again, and no
            `<mode>/` files are written for them.

    Returns:
        `{mode: {"bbox": {...}, "segm": {...}}}`.
    """
    folder = os.path.join(workdir, "ablate")
    if train_models:
        if config is None:
            raise UserError("ablate --train needs --config: the config each mode is trained with.")
        detectors = trained_detectors(config, folder)
    else:
        detectors = inference_detectors(workdir, overrides, folder)
    data = detectors["both"][0].config.data
    builder = prepare_dataset(data)
    metrics = {}
    for mode, (detector, output) in detectors.items():
        if evaluated and mode in evaluated:
            metrics[mode] = evaluated[mode]
            continue
        print(f"evaluating {TITLES[mode]}")
        metrics[mode] = evaluate_detector(detector.detect_canvases, builder, detector.config, output,
                                          detector.config.eval.max_images)
    how = "one model per mode (--train)" if train_models else "one model trained with both, three inference modes"
    write_json(os.path.join(folder, "ablation.json"), {"setting": how, "metrics": metrics})
    write_text(os.path.join(folder, "ablation.md"), ablation_table(metrics, how))
    grid = ablation_grid({mode: d for mode, (d, _) in detectors.items()}, grid_images(data.val, images))
    atomic_write(os.path.join(folder, "ablation.png"), lambda tmp: grid.save(tmp, format="PNG"), "ablation")
    return metrics


def ablation_table(metrics, setting):
    """Markdown: one row per mode (segm AP columns, then bbox AP), and how `both` compares."""
    lines = [
        f"Mask AP by what masks are made of ({setting}).",
        "",
        "| masks | " + " | ".join(f"segm {m}" for m in METRICS) + " | bbox AP |",
        "| --- |" + " ---: |" * (len(METRICS) + 1),
    ]
    for mode in MODES:
        segm = metrics[mode]["segm"]
        lines.append(f"| {TITLES[mode]} | " + " | ".join(f"{segm[m]:.3f}" for m in METRICS)
                     + f" | {metrics[mode]['bbox']['AP']:.3f} |")
    both = metrics["both"]["segm"]["AP"]
    lines.append("")
    for mode in ("shape", "saliency"):
        gain = both - metrics[mode]["segm"]["AP"]
        if round(gain, 3) > 0:
            lines.append(f"- both beats {TITLES[mode]} by {gain:+.3f} segm AP.")
        elif round(gain, 3) == 0:
            lines.append(f"- both and {TITLES[mode]} have the same segm AP ({both:.3f}).")
        else:
            lines.append(f"- both does not beat {TITLES[mode]}: {gain:+.3f} segm AP.")
    return "\n".join(lines) + "\n"


def grid_images(split, count):
    """Paths of `count` validation images for the grid: the first ones (in file-name order)
    with at least two annotated objects, where masks can collide; others if there are too few."""
    with open(split.annotations, encoding="utf-8") as f:
        coco = json.load(f)
    objects = collections.Counter(a.get("image_id") for a in coco.get("annotations", []))
    names = sorted((image["file_name"], objects[image["id"]]) for image in coco["images"])
    chosen = [name for name, n in names if n >= 2][:count]
    chosen += [name for name, n in names if n < 2][: count - len(chosen)]
    return [os.path.join(split.images, name) for name in chosen]


def ablation_grid(detectors, paths):
    """One row per image (`paths`), one column per mode: masks, boxes and class names of the
    detections scoring at least 0.3."""
    header = 18
    font = ImageFont.load_default()
    rows = [load_image(path) for path in paths]
    grid = Image.new("RGB", (_CELL * len(MODES), header + _CELL * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for column, mode in enumerate(MODES):
        detector = detectors[mode]
        draw.text((column * _CELL + 4, 3), TITLES[mode], fill="black", font=font)
        for row, image in enumerate(rows):
            (result,) = detector.detect(image, score_threshold=_GRID_SCORE)
            picture = Image.fromarray(result.plot())
            scale = _CELL / max(picture.size)
            picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.NEAREST)
            grid.paste(picture, (column * _CELL, header + row * _CELL))
    return grid


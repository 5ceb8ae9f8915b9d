"""The `centermask` command line: thin sub-commands over the library.

    centermask demo
    centermask make-shapes --output work/shapes --train 600 --val 100 --seed 0
    centermask train    --config configs/shapes_tiny.yaml --workdir work/demo [--set key=value ...]
    centermask evaluate --config configs/shapes_tiny.yaml --workdir work/demo
                        [--weights FILE | --saved-model DIR | --tflite FILE]
    centermask predict  --workdir work/demo --input PATH_DIR_OR_GLOB... --output DIR [--score 0.3]
                        [--save overlays,coco,masks] [--tile 512] [--recursive]
                        [--weights FILE | --saved-model DIR | --tflite FILE]
    centermask export   --workdir work/demo --format saved_model|tflite --output PATH
                        [--quantize none|fp16|int8]
    centermask info     --config configs/coco_resnet18.yaml [--set model.input_size=256]
    centermask benchmark inference|efficiency|assembly|data|train|fcos-heads|all [--quick] [--config ...]
    centermask recipe   --config configs/shapes_tiny.yaml --workdir work/recipe/base
                        [--sets shapes occluded ...] [--seeds 0 1 2] [--set key=value ...] [--eval-set key=value ...]
"""

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
import warnings

from centermask_tf.errors import UserError


class _Parser(argparse.ArgumentParser):
    """Usage mistakes end as one line, as every other error does: `centermask <cmd>: error: ...`
    (exit 2); `--help` shows the usage."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, high=None, what=None):
    """An argparse type: `kind` (int or float), finite, within [low, high]."""

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = " and ".join(b for b in (low is not None and f">= {low}", high is not None and f"<= {high}") if b)
            raise argparse.ArgumentTypeError(f"must be {what or bounds}, got {text}")
        return value

    return parse


def _score(text):
    """An argparse type: a score in [0, 1], or "auto"."""
    return "auto" if text == "auto" else _number(float, 0, 1)(text)


def _save_list(text):
    """An argparse type: predict's comma-separated outputs."""
    from centermask_tf.predict import SAVE_CHOICES

    chosen = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in chosen if p not in SAVE_CHOICES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(SAVE_CHOICES)} (comma-separated)")
    return chosen


def _path(text):
    """An argparse type for a path: not empty (an empty path would mean the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty path; give a file or folder name")
    return text


def _add_set_arg(parser, example="model.backbone=resnet50"):
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config value, e.g. --set {example} (repeatable)",
    )


def _add_config_args(parser):
    parser.add_argument("--config", required=True, type=_path, help="YAML config file (see configs/).")
    _add_set_arg(parser)


# How a trained network decodes can change after training; its structure cannot.
_INFERENCE_SETTING = "model.mask_factors=shape (or eval.flip_test=true)"


def _add_model_source_args(parser):
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--weights", type=_path, help="weights file (default: best, else last checkpoint)")
    source.add_argument("--saved-model", type=_path, help="run an exported SavedModel version folder instead")
    source.add_argument("--tflite", type=_path, help="run an exported .tflite file instead")


def _load(args):
    from centermask_tf.config import load_config

    return load_config(args.config, args.overrides)


def cmd_info(args):
    """Prints parameter count and FLOPs of the network built from each config."""
    from centermask_tf.arch import build_network
    from centermask_tf.config import load_config
    from centermask_tf.tools.flops import model_flops

    rows = []
    for path in args.config:
        config = load_config(path, args.overrides)
        if args.no_weights:
            config.model.weights = None
        model = build_network(config)
        rows.append(
            (
                os.path.basename(path),
                config.model.backbone,
                config.model.input_size,
                model.count_params() / 1e6,
                model_flops(model) / 1e9,
            )
        )
    print(f"{'config':<26}{'backbone':<20}{'input':>6}{'params (M)':>12}{'GFLOPs':>10}")
    for name, backbone, size, params, flops in rows:
        print(f"{name:<26}{backbone:<20}{size:>6}{params:>12.2f}{flops:>10.2f}")


def cmd_make_shapes(args):
    from centermask_tf.data.shapes import PRESETS, Layout, make_shapes

    preset = dict(PRESETS[args.preset]) if args.preset else {}
    if preset and (args.occlusion is not None or args.object_size or args.image_size is not None
                   or args.train is not None or args.classes):
        raise UsageError(f"--preset {args.preset} fixes the layout; only --val, --seed and --output may change.")
    layout = preset.get("layout") or Layout(**({"sizes": tuple(args.object_size)} if args.object_size else {}))
    counts = make_shapes(
        args.output,
        preset.get("train", 600 if args.train is None else args.train),
        args.val if args.val is not None else preset.get("val", 100),
        args.seed,
        preset.get("image_size", 128 if args.image_size is None else args.image_size),
        args.occlusion,
        layout,
        args.classes,
    )
    for split, (images, annotations, occluded) in counts.items():
        print(f"{split}: {images} images, {annotations} annotations ({occluded} partly occluded)")
    print(f"written to {args.output}/annotations and {args.output}/{{{','.join(counts)}}}")
    if args.clip:
        from centermask_tf.data.shapes import CATEGORIES, SHAPES, make_clip

        clip = os.path.join(args.output, "clip.mp4")
        make_clip(clip, args.clip, seed=args.seed,
                  categories=[SHAPES[name] for name in args.classes] if args.classes else CATEGORIES)
        print(f"clip of {args.clip} frames written to {clip}")


def cmd_mosaic(args):
    """Large images from a split's small ones (`tools/mosaic.py`)."""
    from centermask_tf.tools.mosaic import make_mosaics

    images, annotations = make_mosaics(args.annotations, args.images, args.output, args.grid)
    print(f"{images} mosaics of {args.grid}x{args.grid} images with {annotations} annotations written to "
          f"{args.output}/val and {args.output}/annotations/instances_val.json")


class UsageError(UserError):
    """A command that cannot run as asked; the message says what to do."""


def cmd_benchmark(args):
    """Runs one benchmark (or all) per config; prints tables, appends to --results."""
    from centermask_tf.tools import benchmark

    if args.plots and importlib.util.find_spec("matplotlib") is None:  # fail before, not after, the run
        raise UsageError("--plots needs matplotlib: .venv/bin/pip install -e '.[plots]'")
    if args.peer and not args.peer.endswith(".onnx"):
        raise UsageError(f"--peer takes an .onnx model, got '{args.peer}'.")
    if args.peer and not os.path.isfile(args.peer):
        raise UsageError(f"--peer '{args.peer}' does not exist.")
    if args.peer and importlib.util.find_spec("onnxruntime") is None:
        raise UsageError("--peer needs onnxruntime: .venv/bin/pip install -e '.[bench]'")
    benchmark.run(args.what, args.config, args.overrides, quick=args.quick, runs=args.runs,
                  results=args.results, plots=args.plots, cache=args.cache, workdir=args.workdir, peer=args.peer)


def cmd_train(args):
    from centermask_tf.training.train import train

    train(_load(args), args.workdir, args.strategy, overwrite=args.overwrite)


def _detector(config, categories, workdir, weights):
    """The `CenterMask` detector of `config` with the workdir's (or the given) weights."""
    from centermask_tf.detector import CenterMask, trained_factors
    from centermask_tf.workdir import weights_path

    path = weights_path(workdir, weights)
    logging.info("weights: %s", path)
    # The network's mask heads are the ones it was trained with; `config` picks the assembly.
    trained = trained_factors(workdir) if os.path.exists(os.path.join(workdir, "config.yaml")) else None
    return CenterMask.with_weights(config, categories, path, trained)


def _detect_for(args, config, categories):
    """What `evaluate`/`predict` run on letterboxed canvases: the workdir's `CenterMask`, or the
    exported SavedModel / TFLite file given with --saved-model / --tflite."""
    from centermask_tf.export import runtime

    size = config.model.input_size
    if args.saved_model:
        return runtime.saved_model_detector(args.saved_model, size, categories)
    if args.tflite:
        return runtime.tflite_detector(args.tflite, size, categories)
    return _detector(config, categories, args.workdir, args.weights).detect_canvases


def artifact_eval_dir(eval_dir, artifact):
    """The result folder of one exported artifact: its last two path parts (`shapes_tiny_1`,
    `model.tflite`) for reading, and a digest of its absolute path, so that two artifacts (say
    `A/1` and `B/1`) never share one."""
    import hashlib

    path = os.path.realpath(artifact)
    label = "_".join(path.split(os.sep)[-2:])
    return os.path.join(eval_dir, f"{label}-{hashlib.sha256(path.encode()).hexdigest()[:8]}")


def cmd_evaluate(args):
    from centermask_tf.data.tfds_builder import prepare_dataset
    from centermask_tf.evaluation import IOU_TYPES, METRIC_NAMES, evaluate_detector, per_category_table
    from centermask_tf.workdir import load_workdir

    config = _load(args) if args.config else load_workdir(args.workdir, args.overrides)[0]
    builder = prepare_dataset(config.data)
    detect = _detect_for(args, config, builder.info.metadata["categories"])
    output = os.path.join(args.workdir, "eval")
    if args.saved_model or args.tflite:  # keep the Keras model's metrics.json
        output = artifact_eval_dir(output, args.saved_model or args.tflite)
    metrics = evaluate_detector(detect, builder, config, output, config.eval.max_images)
    print(per_category_table(metrics))
    for iou_type in IOU_TYPES:
        print(f"{iou_type:5s} " + "  ".join(f"{k} {metrics[iou_type][k]:.3f}" for k in METRIC_NAMES))
    if metrics["best_f1_score_threshold"] is not None:
        print(f"best F1 at score {metrics['best_f1_score_threshold']:.2f} (predict --score auto uses it)")
    plots = os.path.join(output, "plots")
    print(f"wrote {output}/metrics.json and {output}/detections.json"
          + (f", plots in {plots}/" if os.path.isdir(plots) else ""))


def cmd_predict(args):
    from centermask_tf.evaluation import best_f1_threshold
    from centermask_tf.images import DEFAULT_MAX_MEGABYTES, DEFAULT_MAX_PIXELS, input_files
    from centermask_tf.inference import ImageDetector
    from centermask_tf.predict import predict_files
    from centermask_tf.tiling import check_tiling
    from centermask_tf.workdir import load_workdir

    config, categories = load_workdir(args.workdir, args.overrides)
    check_tiling(args.tile, args.tile_overlap, config.model.input_size, ("--tile", "--tile-overlap"))
    files = input_files(args.input, args.recursive)
    score = best_f1_threshold(args.workdir) if args.score == "auto" else args.score
    if args.score == "auto":
        print(f"--score auto: {score:.2f}, the best-F1 threshold of {args.workdir}/eval/metrics.json")
    model = config.model
    detector = ImageDetector(_detect_for(args, config, categories), model.input_size, categories, score,
                             model.mask_threshold)
    predictions = predict_files(
        detector, files, args.output, save=args.save, tile=args.tile, tile_overlap=args.tile_overlap,
        max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels,
        max_megabytes=DEFAULT_MAX_MEGABYTES if args.max_megabytes is None else args.max_megabytes,
        batch_size=args.batch_size,
    )
    skipped = sum("error" in p for p in predictions)
    wrote = {"overlays": "overlays (*.overlay.png)", "coco": "predictions_coco.json",
             "masks": "instance masks (masks/)"}
    videos = sum("frames" in p for p in predictions)
    images = len(predictions) - skipped - videos
    done = ([f"{', '.join(wrote[s] for s in args.save)} for {images} images"] if images else []) + (
        [f"an overlay .mp4 and a .jsonl of detections per frame for {videos} videos"] if videos else [])
    print("wrote predictions.json" + "".join(f", {d}" for d in done) + f" to {args.output}"
          + (f"; skipped {skipped} unusable files, listed in predictions.json with the reason" if skipped else ""))


def cmd_demo(args):
    """The main job end to end on the built-in shapes set (`tools/demo.py`)."""
    from centermask_tf.tools.demo import demo

    demo(args.config, args.workdir, args.data, args.overrides, args.overwrite)


def cmd_ablate(args):
    """The Local Shape / Global Saliency experiment (see centermask_tf/tools/ablation.py)."""
    from centermask_tf.tools.ablation import ablate

    if args.config and not args.train:
        raise UsageError("ablate without --train decodes the workdir's own model; drop --config "
                         "(use --set to change its evaluation settings).")
    config = _load(args) if args.config else None  # ablate() refuses --train without one
    ablate(args.workdir, config, args.train, () if args.train else args.overrides, args.images)
    folder = os.path.join(args.workdir, "ablate")
    with open(os.path.join(folder, "ablation.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {folder}/ablation.json, ablation.md and ablation.png")


def cmd_recipe(args):
    """One config on several generated sets and seeds (see centermask_tf/tools/recipe.py)."""
    from centermask_tf.tools.recipe import SEEDS, SETS, recipe

    recipe(_load(args), args.workdir, args.sets or tuple(SETS), args.seeds or SEEDS, args.data,
           eval_overrides=args.eval_overrides)
    print(f"wrote {args.workdir}/recipe*.json and recipe*.md")


def cmd_data_service(args):
    """Runs a tf.data service dispatcher or worker until interrupted (see data/service.py)."""
    import socket

    from centermask_tf.data.service import bound_port, start_dispatcher, start_worker

    if args.role == "dispatcher":
        if not args.workers:
            raise UsageError("data-service dispatcher needs --workers host:port[,host:port...]: "
                             "the workers that will prepare batches.")
        server = start_dispatcher(args.port, args.workers.split(","))
        port = bound_port(server)
        print(f"tf.data service dispatcher on port {port} for workers {args.workers}; train with "
              f"--set data.service=grpc://{socket.gethostname()}:{port}", flush=True)
    else:
        if not args.dispatcher:
            raise UsageError("data-service worker needs --dispatcher host:port.")
        if not args.port:
            raise UsageError("data-service worker needs a fixed --port: the dispatcher's --workers lists it.")
        server = start_worker(args.dispatcher, args.port, args.address)
        print(f"tf.data service worker on port {args.port}, dispatcher {args.dispatcher}", flush=True)
    server.join()


def cmd_export(args):
    from centermask_tf.export.serving import export_saved_model
    from centermask_tf.export.tflite import config_calibration, export_tflite
    from centermask_tf.workdir import load_workdir

    config, categories = load_workdir(args.workdir, args.overrides)
    if config.model.assembly == "native":
        print("note: exports carry fixed-size box masks (model.mask_size per box); model.assembly=native "
              "applies to evaluate, predict and CenterMask.detect")
        config.model.assembly = "box"
    if args.format == "tflite" and os.path.isdir(args.output):
        raise UsageError(f"--output '{args.output}' is a folder; a TFLite export is a file (FILE.tflite).")
    detector = _detector(config, categories, args.workdir, args.weights)
    if args.format == "saved_model":
        path = export_saved_model(detector, args.output, args.version)
        print(f"SavedModel (TF Serving layout) written to {path}")
        return
    quantize = args.quantize or config.export.quantize
    calibration = None
    if quantize == "int8":
        print(f"calibrating int8 on {config.export.representative_images} training images of {config.data.train.images}")
        calibration = config_calibration(config)
    size = export_tflite(detector, args.output, quantize, calibration)
    print(f"TFLite ({quantize}, builtin ops only) written to {args.output}: {size / 1e6:.2f} MB")


def build_parser():
    parser = _Parser(
        prog="centermask", description="CenterMask instance segmentation (TensorFlow/Keras)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    common = _Parser(add_help=False)
    common.add_argument("--verbose", action="store_true", help="keep TensorFlow's start-up log lines")
    common.add_argument("--debug", action="store_true", help="show the traceback of a user error")

    def command(name, **kwargs):
        return commands.add_parser(name, parents=[common], **kwargs)

    info = command("info", help="parameters and FLOPs of configs' networks")
    info.add_argument("--config", nargs="+", required=True, type=_path, help="one or more YAML configs")
    _add_set_arg(info, "model.input_size=256")
    info.add_argument(
        "--no-weights",
        action="store_true",
        help="build with model.weights=null (no ImageNet download needed; same cost)",
    )
    info.set_defaults(handler=cmd_info)

    train = command("train", help="train a config into a workdir (resumes if rerun)")
    _add_config_args(train)
    train.add_argument("--workdir", required=True, type=_path, help="checkpoints, logs and results go here")
    train.add_argument(
        "--overwrite", action="store_true",
        help="start over in a workdir that holds a run (the old run is moved into WORKDIR/previous/)",
    )
    train.add_argument(
        "--strategy", default="mirrored", choices=["mirrored", "one_device", "multi_worker"],
        help="mirrored: all local GPUs (else CPU); multi_worker: hosts from TF_CONFIG",
    )
    train.set_defaults(handler=cmd_train)

    evaluate = command("evaluate", help="COCO bbox/segm AP on the validation split")
    evaluate.add_argument("--config", type=_path, help="YAML config (default: the workdir's own config.yaml)")
    _add_set_arg(evaluate, "eval.flip_test=true")
    evaluate.add_argument("--workdir", required=True, type=_path, help="the training workdir")
    _add_model_source_args(evaluate)
    evaluate.set_defaults(handler=cmd_evaluate)

    predict = command("predict", help="overlay PNGs + predictions.json for images")
    predict.add_argument("--workdir", required=True, type=_path, help="the training workdir")
    predict.add_argument("--input", required=True, nargs="+", type=_path,
                         help="image files, folders of images, or glob patterns ('photos/*.tif')")
    predict.add_argument("--recursive", action="store_true", help="also read sub-folders (and let ** cross folders)")
    predict.add_argument("--output", required=True, type=_path, help="folder for the outputs and predictions.json")
    predict.add_argument("--save", type=_save_list, default=("overlays",),
                         help="comma-separated outputs: overlays (default), coco (predictions_coco.json, "
                              "polygons), masks (one PNG per instance)")
    predict.add_argument("--tile", type=_number(int, 1),
                         help="cut images larger than this into overlapping tiles (>= model.input_size) "
                              "and merge detections across seams")
    predict.add_argument("--tile-overlap", type=_number(float, what="in [0, 0.9]", low=0, high=0.9), default=0.25,
                         help="overlap of neighbouring tiles, as a fraction of the tile (default 0.25)")
    predict.add_argument("--batch-size", type=_number(int, 1), help="images (tiles) per network call (default 1 (8))")
    predict.add_argument("--score", type=_score, default=0.3,
                         help="minimum detection score, or 'auto': the best-F1 threshold `evaluate` found")
    predict.add_argument("--max-pixels", type=_number(int, 1),
                         help="skip images that declare more pixels (default: PIL's limit, 89.5 M)")
    predict.add_argument("--max-megabytes", type=_number(float, what="> 0", low=1e-9), help="skip larger files (default 200)")
    _add_set_arg(predict, _INFERENCE_SETTING)
    _add_model_source_args(predict)
    predict.set_defaults(handler=cmd_predict)

    demo = command("demo", help="shapes set -> train -> evaluate -> overlays, in one go")
    demo.add_argument("--config", default="configs/shapes_tiny.yaml", type=_path)
    demo.add_argument("--workdir", default="work/demo", type=_path)
    demo.add_argument("--data", default="work/shapes", type=_path, help="where the shapes set is (or goes)")
    _add_set_arg(demo, "train.epochs=10")
    demo.add_argument("--overwrite", action="store_true", help="retrain even if --workdir holds a finished run")
    demo.set_defaults(handler=cmd_demo)

    export = command("export", help="SavedModel for TF Serving, or TFLite")
    export.add_argument("--workdir", required=True, type=_path, help="the training workdir")
    export.add_argument("--format", required=True, choices=["saved_model", "tflite"])
    export.add_argument("--output", required=True, type=_path, help="saved_models/NAME, or FILE.tflite")
    export.add_argument("--version", type=_number(int, 1), default=1, help="TF Serving model version")
    export.add_argument(
        "--quantize", choices=["none", "fp16", "int8"], help="default: the config's export.quantize"
    )
    export.add_argument("--weights", type=_path, help="weights file (default: best, else last checkpoint)")
    _add_set_arg(export, _INFERENCE_SETTING)
    export.set_defaults(handler=cmd_export)

    ablation = command("ablate", help="mask AP with Local Shape only, Global Saliency only, and both")
    ablation.add_argument("--workdir", required=True, type=_path,
                          help="a workdir trained with both factors; with --train, where the three runs go")
    ablation.add_argument("--train", action="store_true", help="train one model per mode (needs --config)")
    ablation.add_argument("--config", type=_path, help="with --train: the config each mode is trained with")
    _add_set_arg(ablation, "eval.max_images=50")
    ablation.add_argument("--images", type=_number(int, 1), default=4, help="validation images in ablation.png")
    ablation.set_defaults(handler=cmd_ablate)

    protocol = command("recipe", help="train a config on several generated sets x seeds: AP mean, std, range")
    protocol.add_argument("--config", required=True, type=_path)
    protocol.add_argument("--workdir", required=True, type=_path,
                          help="WORKDIR/<set>/seed<k>/ runs; recipe.json, recipe.md summarise every run there")
    _add_set_arg(protocol)
    protocol.add_argument("--sets", nargs="+", metavar="SET",
                          help="of shapes, occluded, large, small, classes (default: all)")
    protocol.add_argument("--seeds", nargs="+", type=_number(int, 0), help="train.seed values (default: 0 1 2)")
    protocol.add_argument("--data", default="work/recipe_data", type=_path,
                          help="where the sets are generated once (default work/recipe_data)")
    protocol.add_argument("--eval-set", dest="eval_overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="decode the trained runs with this (e.g. eval.flip_test=true), no retraining (repeatable)")
    protocol.set_defaults(handler=cmd_recipe)

    service = command("data-service", help="run a tf.data service dispatcher or worker (data.service)")
    service.add_argument("role", choices=["dispatcher", "worker"])
    service.add_argument("--port", type=_number(int, 0, 65535), default=5050,
                         help="port to serve on (default 5050; 0: any free port, printed)")
    service.add_argument("--workers", help="dispatcher: the workers, host:port,host:port,...")
    service.add_argument("--dispatcher", help="worker: the dispatcher's host:port")
    service.add_argument("--address", help="worker: its host:port as the dispatcher lists it (default: hostname:port)")
    service.set_defaults(handler=cmd_data_service)

    shapes = command("make-shapes", help="write the synthetic COCO-format shapes set")
    shapes.add_argument("--output", required=True, type=_path, help="dataset folder to create")
    shapes.add_argument("--train", type=_number(int, 0), help="training images (default 600)")
    shapes.add_argument("--val", type=_number(int, 0), help="validation images (default 100)")
    shapes.add_argument("--seed", type=_number(int, 0), default=0)
    shapes.add_argument("--image-size", type=_number(int, 32), help="longest image side (default 128)")
    shapes.add_argument("--preset", choices=["coco-val"],
                        help="coco-val: 5,000 validation images shaped like COCO val2017 (640 px, ~7 objects, crowd)")
    shapes.add_argument("--occlusion", type=_number(float, 0, 1), metavar="P",
                        help="fraction of objects placed over an earlier one (0-1; default: uniform positions)")
    shapes.add_argument("--object-size", type=float, nargs=2, metavar=("MIN", "MAX"),
                        help="object size range as fractions of the image side (default 0.12 0.55)")
    shapes.add_argument("--classes", type=lambda text: text.split(","), metavar="A,B",
                        help="shapes to draw, of circle, rectangle, triangle, star, hexagon "
                             "(default circle,rectangle,triangle); each keeps its category id")
    shapes.add_argument("--clip", type=_number(int, 1), metavar="FRAMES",
                        help="also write OUTPUT/clip.mp4, shapes moving over FRAMES frames (the video extra)")
    shapes.set_defaults(handler=cmd_make_shapes)

    mosaic = command("mosaic", help="grid x grid mosaics of a split's images, annotations moved along")
    mosaic.add_argument("--annotations", required=True, type=_path, help="the split's COCO instances JSON")
    mosaic.add_argument("--images", required=True, type=_path, help="the folder its file names are relative to")
    mosaic.add_argument("--output", required=True, type=_path, help="writes OUTPUT/val/ and OUTPUT/annotations/")
    mosaic.add_argument("--grid", type=_number(int, 2), default=4, help="images per mosaic side (default 4)")
    mosaic.set_defaults(handler=cmd_mosaic)

    bench = command("benchmark", help="speed benchmarks (tables + benchmarks/results.json)")
    bench.add_argument(
        "what", choices=["inference", "efficiency", "assembly", "data", "train", "scale", "video", "tiling", "fcos-heads",
                         "all"],
        help="inference: end-to-end latency per format; efficiency: GFLOP/s vs the matmul "
        "ceiling; assembly: mask assembly vs K; data: pipeline vs training step; train: step "
        "images/s; scale: TFDS build and evaluation on 5,000 COCO-sized images; video: frames/s "
        "of a 512-px clip; tiling: a 512-px image whole vs tiled; fcos-heads: CenterMask-FCOS's Shape head dense "
        "vs at the kept detections, saliency at stride 4 vs on P3; all: every one but scale, video, tiling, fcos-heads",
    )
    bench.add_argument("--config", nargs="+", type=_path, help="configs (default: the four COCO/edge configs)")
    _add_set_arg(bench)
    bench.add_argument("--quick", action="store_true", help="two configs, few runs: minutes, not an hour")
    bench.add_argument("--runs", type=_number(int, 1), help="timed runs (default 20, 5 with --quick)")
    bench.add_argument("--results", default="benchmarks/results.json", type=_path, help="JSON file appended to")
    bench.add_argument("--plots", action="store_true", help="also draw PNG plots next to --results (matplotlib)")
    bench.add_argument("--workdir", type=_path,
                       help="inference, video, tiling: a trained workdir of the config, timed (and for int8 "
                       "calibrated) as `centermask export` ships it (default: random weights)")
    bench.add_argument("--peer", type=_path,
                       help="inference: an .onnx model (e.g. YOLOv8n-seg) timed by ONNX Runtime in the same "
                       "alternating rounds as the TFLite files; rows get peer_over_this (needs the bench extra)")
    bench.add_argument("--cache", type=_path, help="scale: where the generated set is kept between runs (~/.cache/centermask_tf)")
    bench.set_defaults(handler=cmd_benchmark)
    return parser


def _import_tensorflow_quietly():
    """Imports TensorFlow with its C++ start-up lines discarded: on a CPU-only machine they
    include an `E0000 ... failed call to cuInit` error line that users read as a failure. These
    lines bypass TF_CPP_MIN_LOG_LEVEL, so stderr itself is redirected while TF starts."""
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.buffer.write(sink.read())
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    import absl.logging

    tf.get_logger().setLevel(logging.ERROR)
    absl.logging.set_verbosity(absl.logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def _one_line(error):
    """`(message on one line, exit code)`: 2 for what the user can fix, 1 for the rest."""
    from centermask_tf.files import disk_full

    if isinstance(error, UserError):
        return " ".join(str(error).split()), 2
    if disk_full(error):
        where = f" in '{error.filename}'" if isinstance(error, OSError) and error.filename else ""
        return f"the disk is full{where}; free some space and rerun the same command (earlier files are intact).", 2
    if isinstance(error, MemoryError) or "bad_alloc" in str(error) or type(error).__name__ == "ResourceExhaustedError":
        return (f"out of memory ({type(error).__name__}); lower train.batch_size, eval.batch_size or "
                "model.input_size, or free memory, and rerun the same command."), 2
    if isinstance(error, OSError) and error.filename:
        return f"{error.strerror}: '{error.filename}'. Check the path and its permissions.", 2
    first = " ".join(str(error).split())[:300] or "no message"
    return (f"{type(error).__name__}: {first} (not an error we expected: rerun with --debug for the "
            "traceback and report it)"), 1


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0")
    else:
        # 3 also hides C++ ERROR lines such as oneDNN's "supports DT_UINT8 only on platforms
        # with AVX-512" notice; real failures still raise Python exceptions.
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        _import_tensorflow_quietly()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        args.handler(args)
    except KeyboardInterrupt:
        print(f"centermask {args.command}: interrupted; rerun the same command to continue.", file=sys.stderr)
        return 130
    except Exception as e:
        # The one place an error becomes a line: every error a user can cause is a UserError,
        # an OSError names the path it hit, a full disk or memory says what to free; anything
        # else is a bug or a library's failure, still one line (exit 1) and the traceback with
        # --debug.
        if args.debug:
            raise
        message, code = _one_line(e)
        print(f"centermask {args.command}: error: {message}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

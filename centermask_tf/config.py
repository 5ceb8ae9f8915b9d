"""Typed experiment configuration read from YAML, with dotted command-line overrides.

One `Config` holds five sections (model, data, train, eval, export). Every field is typed and
validated when the YAML is read; an unknown key or a wrong type raises `ConfigError` naming the
dotted key and, for typos, the closest valid key.

Example:

    config = load_config("configs/shapes_tiny.yaml", overrides=["model.backbone=resnet50"])
    config.model.input_size  # 128
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import yaml

from centermask_tf.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key, type or value that cannot be used; the message says which and why."""


BACKBONES = (
    "resnet18",
    "resnet50",
    "resnet101",
    "dla34",
    "hourglass104",
    "mobilenetv3_large",
    "mobilenetv3_large_minimalistic",
    "mobilenetv3_small",
    "keras_hub",
)


def _choice(default, choices):
    return field(default=default, metadata={"choices": tuple(choices)})


def _bounded(default, low=None, above=None, high=None):
    """A numeric field checked when read: `>= low`, `> above`, `<= high` (None: unbounded)."""
    return field(default=default, metadata={"low": low, "above": above, "high": high})


def _check_range(value, meta, dotted):
    low, above, high = meta.get("low"), meta.get("above"), meta.get("high")
    if (low is None or value >= low) and (above is None or value > above) and (high is None or value <= high):
        return
    bounds = [f">= {low}" if low is not None else None, f"> {above}" if above is not None else None,
              f"<= {high}" if high is not None else None]
    raise ConfigError(f"Config key '{dotted}' must be {' and '.join(b for b in bounds if b)}, got {value!r}.")


# === Sections ===


@dataclass
class ModelConfig:
    """The network and its decoding.

    Attributes:
        type: "centernet" (CenterMask: five heads at stride 4, peaks decoded without NMS) or
            "fcos" (CenterMask-FCOS: an FPN P3-P7 with FCOS's heads shared over the levels, the
            Shape on its box tower, the saliency from P3 upsampled to stride 4, and class-wise
            NMS; ResNet backbones, box assembly).
        backbone: one of `BACKBONES`; "keras_hub" is the keras-hub backbone of
            `backbone_preset` (one with a P2-P5 feature pyramid, e.g. ResNetBackbone;
            needs the `keras-hub` extra).
        backbone_preset: backbone keras_hub: a keras-hub preset handle (e.g.
            "resnet_18_imagenet", "kaggle://...", "hf://..."; needs network access once) or a
            local preset folder. Its image converter's scale and offset normalise the input.
        weights: backbone initialisation: null (random), "imagenet" (keras.applications
            backbones only; needs the Keras weight cache or network access), "preset" (keras_hub:
            the preset's weights) or a path to a weights file for the backbone.
        width_multiplier: scales every channel count of the backbone and neck (tiny test models
            use 0.125-0.25; keras.applications MobileNetV3 accepts its own alpha values).
        neck: ResNet backbones: "deconv" (CenterNet's three transposed convs from stride 32) or
            "skip" (the same, adding 1x1 projections of the stride-16/8/4 stages: better
            localisation for small inputs and objects at little cost).
        num_classes: number of object categories C (heatmap channels).
        input_size: square training/inference input size in pixels (a multiple of 32).
        head_conv: channels of each head's 3x3 conv (256 in the paper's DLA-34 setting); for
            fcos also the width of the FPN and of its towers (256 in FCOS).
        head_type: "conv" (the paper's 3x3 conv) or "separable" (depthwise 3x3 + pointwise 1x1:
            about 1/8 of the cost at 96 input channels; for the edge config, whose four dense
            heads at stride 4 otherwise cost twice its backbone).
        shape_size: S, the side of the Local Shape; the Shape head has S*S channels.
        mask_size: M, the side of box-relative masks (loss targets and exports).
        saliency: "agnostic" (one channel) or "specific" (C channels, one per class).
        mask_factors: what a mask is made of (the paper's ablation): "both" (Local Shape times
            Global Saliency), "shape" (Local Shape alone) or "saliency" (the saliency crop
            alone). At training it also picks the heads: a "shape" network has no Saliency head,
            a "saliency" one no Shape head. A network trained with "both" can be evaluated,
            run and exported with any of the three.
        assembly: "box" (each mask on an M x M grid over its box: fixed-size outputs, what the
            exports carry) or "native" (each mask at output-map resolution inside its box, the
            paper's h x w Local Shape times the saliency crop), in the loss and in evaluation.
        max_detections: K, peaks (fcos: detections after NMS) kept by decoding.
        score_threshold: detections below this score are dropped.
        mask_threshold: mask probability above which a pixel belongs to the instance.
        tower_convs: fcos: 3x3 conv + GroupNorm + ReLU layers in each head tower (4 in FCOS).
        pre_nms_top_k: fcos: candidates kept per pyramid level before NMS (1000 in FCOS).
        nms_iou_threshold: fcos: class-wise NMS IoU threshold (0.6 in FCOS).
        mask_samples: fcos: positive locations per image the mask loss assembles masks at
            (those with the highest centerness targets); the CenterNet variant uses one per
            object, its centre.
        saliency_stride: fcos: where the saliency head runs: 4 (P3 upsampled x2, then the head;
            the paper-faithful reading) or 8 (the head on P3, its logits upsampled x2: a quarter
            of its work, 49 -> 12 GFLOPs at 800 px with 256 channels and 80 classes). Masks are
            assembled at stride 4 either way.
    """

    # Upper bounds on sizes and counts that multiply work: a typo there (mask_samples=1000000)
    # otherwise passes and ends in a segfault or an out-of-memory abort mid-run.
    type: str = _choice("centernet", ("centernet", "fcos"))
    backbone: str = _choice("resnet18", BACKBONES)
    backbone_preset: Optional[str] = None
    weights: Optional[str] = None
    width_multiplier: float = _bounded(1.0, above=0)
    neck: str = _choice("deconv", ("deconv", "skip"))
    num_classes: int = _bounded(80, low=1)
    input_size: int = _bounded(512, low=32, high=4096)
    head_conv: int = _bounded(256, low=1, high=4096)
    head_type: str = _choice("conv", ("conv", "separable"))
    shape_size: int = _bounded(32, low=1, high=128)
    mask_size: int = _bounded(32, low=1, high=256)
    saliency: str = _choice("agnostic", ("agnostic", "specific"))
    mask_factors: str = _choice("both", ("both", "shape", "saliency"))
    assembly: str = _choice("box", ("box", "native"))
    max_detections: int = _bounded(100, low=1, high=1000)
    score_threshold: float = _bounded(0.05, low=0, high=1)
    mask_threshold: float = _bounded(0.4, low=0, high=1)
    tower_convs: int = _bounded(4, low=0, high=16)
    pre_nms_top_k: int = _bounded(1000, low=1, high=10000)
    nms_iou_threshold: float = _bounded(0.6, above=0, high=1)
    mask_samples: int = _bounded(64, low=1, high=1024)
    saliency_stride: int = _choice(4, (4, 8))

    def validate(self):
        # What only one architecture needs is checked by it (`arch.architecture`).
        if self.input_size % 32:
            raise ConfigError(
                f"model.input_size={self.input_size} must be a multiple of 32 "
                "(every backbone downsamples by 32 before upsampling to stride 4)."
            )
        if self.backbone == "hourglass104" and self.input_size % 128:
            raise ConfigError(
                f"model.input_size={self.input_size} must be a multiple of 128 for hourglass104 "
                "(five stride-2 levels below its stride-4 stem)."
            )
        if self.neck == "skip" and not self.backbone.startswith(("resnet", "keras_hub")):
            raise ConfigError(
                f"model.neck=skip applies to the ResNet and keras_hub backbones; {self.backbone} fuses "
                "its stages in its own neck. Remove model.neck or set it to deconv."
            )
        if (self.backbone == "keras_hub") != (self.backbone_preset is not None):
            raise ConfigError(
                "model.backbone_preset names the keras-hub preset of model.backbone=keras_hub: set both "
                f"or neither (got backbone={self.backbone}, backbone_preset={self.backbone_preset!r})."
            )
        if (self.weights == "preset") != (self.backbone == "keras_hub" and self.weights is not None):
            raise ConfigError(
                f"model.weights={self.weights!r}: a keras_hub backbone takes null (random) or preset (the "
                "preset's weights), and 'preset' applies to keras_hub only."
            )


@dataclass
class SplitConfig:
    """One COCO-format split.

    Attributes:
        annotations: path to the COCO instances JSON file.
        images: folder that the JSON's `file_name`s are relative to.
    """

    annotations: Optional[str] = None
    images: Optional[str] = None


@dataclass
class DataConfig:
    """Where the data is and how it is read.

    Attributes:
        train: the training split.
        val: the validation split.
        tfds_data_dir: where the TFDS builder writes prepared datasets.
        max_instances: target slots per image; objects beyond it are counted and dropped.
        strict: raise on the first bad sample instead of skipping it with a warning.
        deterministic: keep element order fixed (slower; for reproducible runs).
        shuffle_buffer: shuffle buffer size in images.
        scale_range: random scale augmentation (min, max).
        large_scale_jitter: probability that an image's scale factor is drawn from 0.1-2.0
            (Ghiasi et al.'s large-scale jitter) instead of `scale_range` (0 disables).
        flip: random horizontal flip.
        color_jitter: brightness/contrast/saturation jitter strength (0 disables).
        mosaic: probability that a training image is replaced by a mosaic of it and the next
            three (the canvas split at a random centre, a corner of each in a quadrant; 0
            disables).
        copy_paste: probability that a random half of the objects of its neighbour in the
            stream is pasted onto a training image (Ghiasi et al., CVPR 2021); covered objects
            lose the covered pixels, and are dropped when less than a quarter stays visible
            (0 disables).
        service: "grpc://host:port" of a tf.data service dispatcher (`centermask data-service`):
            the training pipeline's decoding, augmentation and target encoding run on its
            workers and training only reads batches. null (default) runs them in-process.
        build_workers: processes that read the images and decode the masks when the TFDS
            dataset is built (1, the default: this process alone).
        beam_options: Apache Beam pipeline flags (the `beam` extra), e.g.
            `["--runner=FlinkRunner", ...]`: build through TFDS's Beam support instead, on a
            cluster. [] (default): no Beam. The dataset is the same however it was built.
    """

    train: SplitConfig = field(default_factory=SplitConfig)
    val: SplitConfig = field(default_factory=SplitConfig)
    tfds_data_dir: str = "work/tfds"
    max_instances: int = _bounded(128, low=1, high=1000)
    strict: bool = False
    deterministic: bool = False
    shuffle_buffer: int = _bounded(512, low=1)
    scale_range: list[float] = field(default_factory=lambda: [0.6, 1.3])
    large_scale_jitter: float = _bounded(0.0, low=0, high=1)
    flip: bool = True
    color_jitter: float = _bounded(0.4, low=0, high=1)
    mosaic: float = _bounded(0.0, low=0, high=1)
    copy_paste: float = _bounded(0.0, low=0, high=1)
    service: Optional[str] = None
    build_workers: int = _bounded(1, low=1)
    beam_options: list[str] = field(default_factory=list)

    def validate(self):
        port = re.fullmatch(r"grpc://[^:/\s]+:(\d+)", self.service or "")
        if self.service is not None and not (port and 1 <= int(port.group(1)) <= 65535):
            raise ConfigError(
                "data.service must look like grpc://host:port with a port in 1-65535 (a tf.data "
                f"service dispatcher), got {self.service!r}."
            )
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(
                f"data.scale_range must be [min, max] with 0 < min <= max, got {self.scale_range}."
            )


@dataclass
class TrainConfig:
    """Optimisation.

    Attributes:
        batch_size: global batch size (split across replicas).
        epochs: number of epochs.
        steps_per_epoch: steps per epoch; null = one pass over the training set.
        optimizer: "adam", "adamw" or "sgd" (momentum 0.9, as FCOS trains).
        learning_rate: base learning rate (reached after warmup).
        weight_decay: AdamW decoupled weight decay; SGD weight decay.
        warmup_steps: linear warmup length.
        schedule: "step" (x0.1 at each of `decay_epochs`) or "cosine".
        decay_epochs: epochs at which the step schedule divides the rate by 10.
        clipnorm: global gradient-norm clipping; null disables.
        ema_decay: exponential moving average of weights; null disables.
        mixed_precision: null, "mixed_float16" (GPUs) or "mixed_bfloat16" (CPUs with AVX-512
            BF16 / AMX: coco_resnet18's training step at 512 ran 2.1-2.3x faster on a 2-core AMX
            host; the tiny demo network 1.0-1.1x, at the same AP; BENCHMARKS.md).
        heatmap_weight: centernet: lambda_p.
        offset_weight: centernet: lambda_off.
        size_weight: centernet: lambda_size.
        mask_weight: lambda_mask.
        classification_weight: fcos: the sigmoid focal loss (alpha 0.25, gamma 2) weight.
        centerness_weight: fcos: the centerness BCE weight.
        box_weight: fcos: the GIoU box loss weight.
        saliency_weight: weight of a per-pixel BCE of the saliency map against the union of
            the instance masks (per class for class-specific saliency); the paper reports
            +0.5 AP from this supervision. 0 (default) trains the saliency through the mask
            loss only.
        seed: random seed for weights and data order.
        init_from: start from trained weights: a training workdir (its best checkpoint), a
            preset folder, a `.keras` file or a `.weights.h5` file. Every layer whose name and
            weight shapes match is loaded; the others (e.g. the class-specific heads of a model
            with other classes) keep their fresh initialisation. Ignored when a run resumes
            from its own checkpoints. null (default): train from `model.weights`.
        freeze_backbone_epochs: the backbone's own layers (not the neck) are not trained in the
            first N epochs, their BatchNorm in inference mode; then every layer trains. 0
            (default): nothing is frozen.
        intra_op_threads: threads one TensorFlow op may use in the training process; null
            (default): TensorFlow's choice, every core. 1 lets ops of a small network run side
            by side, one core each, instead of splitting each small op over all cores: the
            demo network's step ran 1.1-1.5x faster so on 2 cores (BENCHMARKS.md). Takes effect
            only before TensorFlow starts in the process: `train`, `demo` and `recipe` set it
            before any TensorFlow work.
    """

    batch_size: int = _bounded(16, low=1)
    epochs: int = _bounded(140, low=1)
    steps_per_epoch: Optional[int] = _bounded(None, low=1)
    optimizer: str = _choice("adam", ("adam", "adamw", "sgd"))
    learning_rate: float = _bounded(2.5e-4, above=0)
    weight_decay: float = _bounded(1e-4, low=0)
    warmup_steps: int = _bounded(500, low=0)
    schedule: str = _choice("step", ("step", "cosine"))
    decay_epochs: list[int] = field(default_factory=lambda: [90, 120])
    clipnorm: Optional[float] = _bounded(None, above=0)
    ema_decay: Optional[float] = _bounded(None, above=0, high=1)
    mixed_precision: Optional[str] = None
    heatmap_weight: float = _bounded(1.0, low=0)
    offset_weight: float = _bounded(1.0, low=0)
    size_weight: float = _bounded(0.1, low=0)
    mask_weight: float = _bounded(1.0, low=0)
    saliency_weight: float = _bounded(0.0, low=0)
    classification_weight: float = _bounded(1.0, low=0)
    centerness_weight: float = _bounded(1.0, low=0)
    box_weight: float = _bounded(1.0, low=0)
    seed: int = _bounded(0, low=0)
    init_from: Optional[str] = None
    freeze_backbone_epochs: int = _bounded(0, low=0)
    intra_op_threads: Optional[int] = _bounded(None, low=1)

    def validate(self):
        if self.freeze_backbone_epochs > self.epochs:
            raise ConfigError(
                f"train.freeze_backbone_epochs={self.freeze_backbone_epochs} is more than "
                f"train.epochs={self.epochs}; freeze at most as many epochs as the run trains."
            )
        if self.mixed_precision not in (None, "mixed_float16", "mixed_bfloat16"):
            raise ConfigError(
                "train.mixed_precision must be null, 'mixed_float16' or 'mixed_bfloat16', "
                f"got {self.mixed_precision!r}."
            )
        if any(epoch < 1 for epoch in self.decay_epochs):
            raise ConfigError(f"train.decay_epochs must hold epochs >= 1, got {self.decay_epochs}.")


@dataclass
class EvalConfig:
    """COCO evaluation.

    Attributes:
        batch_size: images per evaluation batch.
        every_epochs: run COCO evaluation during training every N epochs (0 disables).
        max_images: evaluate on at most this many validation images; null = all.
        backend: the COCO evaluation library: "pycocotools" (the reference) or
            "faster_coco_eval" (the same metrics, tested to 1e-6, faster; needs
            `pip install -e '.[fast-eval]'`).
        flip_test: average the head outputs over each image and its mirror image before
            decoding (CenterNet's flip test): about 2x the network cost. Also applies to
            `predict`, `detect` and exports.
        tile: evaluate images larger than this many pixels in overlapping tiles of this size
            (at least model.input_size), detections merged across seams, as `predict --tile`;
            null (default): each image shrunk whole into the input.
        tile_overlap: overlap of neighbouring tiles, as a fraction of the tile.
    """

    batch_size: int = _bounded(8, low=1)
    every_epochs: int = _bounded(10, low=0)
    max_images: Optional[int] = _bounded(None, low=1)
    backend: str = _choice("pycocotools", ("pycocotools", "faster_coco_eval"))
    flip_test: bool = False
    tile: Optional[int] = _bounded(None, low=1)
    tile_overlap: float = _bounded(0.25, low=0, high=0.9)


@dataclass
class ExportConfig:
    """Exported artifacts.

    Attributes:
        quantize: default TFLite quantisation: "none", "fp16" or "int8".
        representative_images: training images used to calibrate int8.
        float_score_heads: int8 keeps the heads that score detections (CenterNet's heatmap,
            FCOS's classification and centerness) float32; false quantises them too.
    """

    quantize: str = _choice("none", ("none", "fp16", "int8"))
    representative_images: int = _bounded(100, low=1)
    float_score_heads: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def validate(self) -> "Config":
        for section in (self.model, self.data, self.train):
            section.validate()
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# === Reading and overriding ===


def _unknown_key(dotted: str, valid: list[str]) -> ConfigError:
    key = dotted.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f" Did you mean '{close[0]}'?" if close else f" Valid keys: {', '.join(sorted(valid))}."
    return ConfigError(f"Unknown config key '{dotted}'.{hint}")


def _coerce(value: Any, hint: Any, dotted: str, meta=None) -> Any:
    """Checks `value` against the type hint `hint` (converting only int -> float) and against
    the field's `meta`data: its choices or its numeric range."""
    meta = meta or {}
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], dotted, meta)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"Config key '{dotted}' must be a mapping, got {value!r}.")
        return _build(hint, value, dotted)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"Config key '{dotted}' must be a list, got {value!r}.")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{dotted}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string.
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"Config key '{dotted}' must be true or false, got {value!r}.")
    if hint is int and isinstance(value, bool):
        raise ConfigError(f"Config key '{dotted}' must be an integer, got {value!r}.")
    if not isinstance(value, hint):
        raise ConfigError(
            f"Config key '{dotted}' must be of type {hint.__name__}, got {value!r} "
            f"({type(value).__name__})."
        )
    choices = meta.get("choices")
    if hint in (int, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"Config key '{dotted}' must be a finite number, got {value!r}.")
        _check_range(value, meta, dotted)
    if choices and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint_text = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"Config key '{dotted}' must be one of {', '.join(choices)}; got {value!r}.{hint_text}"
        )
    return value


def _build(cls, values: dict, prefix: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise _unknown_key(dotted, list(fields))
        kwargs[key] = _coerce(value, hints[key], dotted, fields[key].metadata)
    return cls(**kwargs)


def _apply_override(raw: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"Override '{override}' must look like section.key=value.")
    dotted, text = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"Override '{dotted}': '{part}' is not a section.")
    node[parts[-1]] = _override_value(parts, text)


def _override_value(parts, text):
    """A string field keeps the text verbatim (YAML would drop what follows ` #` and turn
    `a: b` into a mapping: wrong for paths); `null`, `~` or nothing unsets an optional one.
    Other fields are parsed as YAML, so numbers, booleans, null and lists mean what they mean in
    the file."""
    hint = Config
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(hint)} if dataclasses.is_dataclass(hint) else {}
        if part not in fields:
            hint = None  # an unknown key: reported with a suggestion when the config is built
            break
        hint = typing.get_type_hints(hint)[part]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    if hint is str or (optional and str in typing.get_args(hint)):  # not list[str]: a list is YAML
        return None if optional and text.strip() in ("", "null", "~") else text
    return yaml.safe_load(text) if text.strip() else None


def config_from_dict(raw: dict, overrides: tuple[str, ...] | list[str] = ()) -> Config:
    """Builds and validates a `Config` from a plain dict plus `key=value` overrides."""
    raw = copy.deepcopy(raw or {})
    for override in overrides:
        _apply_override(raw, override)
    return _build(Config, raw, "").validate()


def load_config(path: str | os.PathLike, overrides=()) -> Config:
    """Reads a YAML config (PyYAML safe_load) and applies dotted overrides."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"Config file '{path}' does not exist; see configs/ for examples.") from None
    except IsADirectoryError:
        raise ConfigError(f"Config '{path}' is a folder; pass a YAML file such as configs/shapes_tiny.yaml.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"Config file '{path}' is not text (binary file?); pass a YAML config.") from None
    except yaml.YAMLError as e:
        first = " ".join(str(e).split())
        raise ConfigError(f"Config file '{path}' is not valid YAML: {first}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of sections at top level.")
    try:
        return config_from_dict(raw, overrides)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None

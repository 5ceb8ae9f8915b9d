"""A TFDS builder that turns any COCO-format folder into a versioned, prepared TFDS dataset.

TFDS's own `coco/2017` carries no instance masks, so COCO 2017 (and any user export) goes
through this builder: `prepare_dataset(config.data)` builds `data_dir/coco_folder/<key>/1.0.0`
once, fully offline, and reuses it on the next run. `<key>` is a hash of everything the build
reads: the annotation files' contents, the image roots, the name, size and modification time of
every image file the JSON lists, and `strict`. Editing the JSON, adding, replacing or removing an
image, or moving the root builds a new dataset; an unchanged folder is never rebuilt. Processes
that build the same dataset at once take turns (a lock file next to it): the second one waits
and then uses what the first built.

Each example stores the image file's original bytes (decoded in the tf.data pipeline) and, per
object, its box, contiguous label, crowd flag and mask as uncompressed COCO RLE counts (all
objects' counts concatenated in `rle`, each object's run count in `objects/runs`), which the
pipeline expands with `tf.repeat` - compact on disk and decodable without `py_function`.
Each object also keeps its annotation id: evaluation takes its ground truth from the JSON by
these ids, without decoding a mask. Bad samples are skipped while building (see
`coco.FAULT_KINDS`); their counts are kept in the dataset's metadata and reported again
whenever it is loaded.

`data.build_workers: N` reads the images and decodes the masks in N processes (TFDS writes in
this one); `data.beam_options` builds through TFDS's Apache Beam support instead, for a cluster
runner. Either way the examples (and their order) are the same, and a build that wrote fewer
examples than its workers produced is refused, not kept. An image whose EXIF orientation
turns or flips it (phone photos) is stored upright, re-encoded as PNG, so every reader sees the
orientation the annotations were drawn in.
"""

import collections
import contextlib
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from centermask_tf.config import ConfigError
from centermask_tf.data.coco import (
    Categories,
    DataError,
    FaultReport,
    image_record,
    load_annotations,
    open_coco,
)
from centermask_tf.files import DiskFullError, disk_full, locked
from centermask_tf.images import decode_image, exif_orientation, orient
from centermask_tf.processes import process_pool

logger = logging.getLogger("centermask_tf.data")

SPLITS = ("train", "val")


@dataclasses.dataclass(eq=False)
class CocoFolderConfig(tfds.core.BuilderConfig):
    """Which annotation files and image roots make the splits, keyed by their content."""

    splits: dict = dataclasses.field(default_factory=dict)  # split -> (annotations, images)
    strict: bool = False
    # How to build, not what: the same examples either way (`build_workers`, `beam_options`).
    build_workers: int = 1
    beam_options: tuple = ()


class CocoFolder(tfds.core.GeneratorBasedBuilder):
    """COCO-format instances (images, boxes, labels, crowd flags, RLE masks) from a folder."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {
        "1.0.0": "Images as encoded bytes; masks as uncompressed RLE counts.",
        "1.1.0": "Each object's annotation id (the evaluation's ground truth).",
    }

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            description="COCO-format instance segmentation folder (centermask_tf).",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(), dtype=np.bytes_),
                    "image_id": tfds.features.Scalar(dtype=np.int64),
                    "height": tfds.features.Scalar(dtype=np.int32),
                    "width": tfds.features.Scalar(dtype=np.int32),
                    "objects": tfds.features.Sequence(
                        {
                            "id": tfds.features.Scalar(dtype=np.int64),
                            "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                            "label": tfds.features.Scalar(dtype=np.int32),
                            "is_crowd": tfds.features.Scalar(dtype=np.bool_),
                            "runs": tfds.features.Scalar(dtype=np.int32),
                        }
                    ),
                    "rle": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                }
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        splits = self.builder_config.splits
        # Every split uses the training file's categories, so indices agree across splits.
        first = splits.get("train") or next(iter(splits.values()))
        categories = Categories.from_coco(load_annotations(first[0]).dataset["categories"])
        self.info.metadata["categories"] = categories.to_list()
        self._expected, self._json_faults = {}, {}
        generate = self._beam_examples if self.builder_config.beam_options else self._generate_examples
        return {
            name: generate(name, annotations, images, categories)
            for name, (annotations, images) in splits.items()
        }

    def _generate_examples(self, split, annotations, images, categories):
        """The split's examples: the annotation file is checked here, each image read and its
        masks decoded here or, with `build_workers` > 1, by a pool of processes (in order)."""
        report = FaultReport(strict=self.builder_config.strict)
        coco, _ = open_coco(annotations, categories, report)
        _OPENED[_file_key(annotations)] = coco  # this process reads with the one it checked
        read = functools.partial(
            _read_image, annotations=annotations, images=images, categories=categories,
            strict=self.builder_config.strict,
        )
        usable = 0
        try:
            with _mapped(self.builder_config.build_workers) as imap:
                for example, faults in imap(read, sorted(coco.imgs)):
                    report.counts.update(faults)
                    if example is not None:
                        usable += 1
                        yield example
        finally:
            _OPENED.clear()  # COCO train's index is gigabytes: not kept past the build
        self._expected[split] = usable
        self._record_faults(split, annotations, report.counts, usable)

    def _beam_examples(self, split, annotations, images, categories):
        """The same examples through Apache Beam: the annotation file is checked here, each
        image read by a Beam worker (faults and examples counted with Beam metrics, summed in
        `_process_pipeline_result`)."""
        import apache_beam as beam

        report = FaultReport(strict=self.builder_config.strict)
        coco, _ = open_coco(annotations, categories, report)
        self._json_faults[split] = (annotations, report.counts)
        if not coco.imgs:
            self._record_faults(split, annotations, report.counts, 0)
        read = functools.partial(
            _beam_read, split=split, annotations=annotations, images=images, categories=categories,
            strict=self.builder_config.strict,
        )
        return beam.Create(sorted(coco.imgs)) | beam.FlatMap(read)

    def _process_pipeline_result(self, pipeline_result):
        from apache_beam.metrics.metric import MetricsFilter

        _OPENED.clear()  # what an in-process runner loaded
        counts = {split: collections.Counter(faults) for split, (_, faults) in self._json_faults.items()}
        queried = pipeline_result.metrics().query(MetricsFilter().with_namespace(_BEAM_NAMESPACE))
        for counter in queried["counters"]:
            split, kind = counter.key.metric.name.split("/")
            if kind == "examples":
                self._expected[split] = counter.committed
            else:
                counts[split][kind] += counter.committed
        for split, (annotations, _) in self._json_faults.items():
            self._record_faults(split, annotations, counts[split], self._expected.get(split, 0))

    def _download_and_prepare(self, dl_manager, download_config):
        super()._download_and_prepare(dl_manager, download_config)
        # Beam's DirectRunner with several workers was seen to drop examples silently between
        # reading and writing (Beam 2.77, TFDS 4.9.10; 2,426-4,974 of 5,000). Raising here
        # leaves TFDS's incomplete folder unpublished: nothing half-built is ever reused.
        for split, expected in self._expected.items():
            written = self.info.splits[split].num_examples
            if written != expected:
                raise DataError(
                    f"The dataset build wrote {written} of the {expected} examples of split '{split}' that "
                    "its workers produced, so it was not kept. Beam's DirectRunner with several workers "
                    "loses examples at scale: build locally with data.beam_options: [] and "
                    "data.build_workers: N instead, or use a cluster runner."
                )

    def _record_faults(self, split, annotations, counts, usable=None):
        report = FaultReport()
        report.counts.update({kind: n for kind, n in counts.items() if n})
        self.info.metadata[f"{split}_faults"] = dict(report.counts)
        logger.warning("%s split '%s': %s", annotations, split, report.summary())
        if usable == 0:  # TFDS cannot write an empty split; say why there is nothing in it
            raise DataError(
                f"data.{split} ({annotations}) has 0 usable images ({report.summary()}); the warnings "
                "above name each one. Fix the paths or the files."
            )


_BEAM_NAMESPACE = "centermask_build"
_OPENED = {}  # (annotation path, mtime, size) -> COCO, loaded once per process


def _file_key(path):
    """The annotation file as it is now: an edited file is another key, never a stale COCO."""
    stat = os.stat(path)
    return path, stat.st_mtime_ns, stat.st_size


@contextlib.contextmanager
def _mapped(workers):
    """`map`, or an ordered map over `workers` fresh processes."""
    if workers <= 1:
        yield map
        return
    try:
        with process_pool(workers) as pool:
            yield functools.partial(pool.map, chunksize=8)
    except BrokenProcessPool:
        raise DataError(
            f"The {workers} dataset build workers (data.build_workers) stopped before finishing. A script "
            "that builds with data.build_workers > 1 must call centermask_tf under "
            "`if __name__ == \"__main__\":` (worker processes import the script); the CLI does."
        ) from None


def _read_image(image_id, annotations, images, categories, strict):
    """One image id -> ((key, example) or None when unusable, its fault counts). Each process
    loads the annotation file once."""
    key = _file_key(annotations)
    if key not in _OPENED:
        _OPENED[key] = load_annotations(annotations)
    report = FaultReport(strict=strict)
    record = image_record(_OPENED[key], image_id, images, categories, report, annotations)
    return (None if record is None else (record["image_id"], to_example(record))), dict(report.counts)


def _beam_read(image_id, split, **kwargs):
    """`_read_image` as a Beam FlatMap, counting faults and examples in Beam metrics."""
    import apache_beam as beam

    example, faults = _read_image(image_id, **kwargs)
    for kind, n in faults.items():
        beam.metrics.Metrics.counter(_BEAM_NAMESPACE, f"{split}/{kind}").inc(n)
    if example is not None:
        beam.metrics.Metrics.counter(_BEAM_NAMESPACE, f"{split}/examples").inc()
        yield example


def to_example(record):
    """A `read_coco` record -> the builder's feature dict."""
    image_bytes = upright_bytes(record["path"]) if record["transpose"] else _read(record["path"])
    objects = record["objects"]
    return {
        "image": image_bytes,
        "image_id": record["image_id"],
        "height": record["height"],
        "width": record["width"],
        "objects": {
            "id": np.asarray([o["id"] for o in objects], np.int64),
            "bbox": np.stack([o["bbox"] for o in objects]) if objects else np.zeros((0, 4), np.float32),
            "label": np.asarray([o["label"] for o in objects], np.int32),
            "is_crowd": np.asarray([o["is_crowd"] for o in objects], np.bool_),
            "runs": np.asarray([len(o["rle"]) for o in objects], np.int32),
        },
        "rle": np.concatenate([o["rle"] for o in objects]) if objects else np.zeros(0, np.int32),
    }


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def upright_bytes(path):
    """PNG bytes of the image as displayed (its EXIF orientation applied), decoded by the one
    image reader, so training sees the pixels `predict` and `detect` see."""
    return tf.io.encode_png(orient(decode_image(_read(path)), exif_orientation(path))).numpy()


def _image_stats(content, root):
    """`file_name:size:mtime` of every image the annotation JSON lists (unparsable JSON is left
    to the build, which reports it)."""
    try:
        images = json.loads(content).get("images")
    except (ValueError, AttributeError):
        return []
    stats = []
    for image in images if isinstance(images, list) else []:
        name = image.get("file_name") if isinstance(image, dict) else None
        if not isinstance(name, str):
            continue
        try:
            info = os.stat(os.path.join(root, name))
            stats.append(f"{name}:{info.st_size}:{info.st_mtime_ns}")
        except OSError:
            stats.append(f"{name}:missing")
    return stats


def _content_key(splits, strict):
    digest = hashlib.sha256(f"{CocoFolder.VERSION} strict={strict}".encode())
    for name in sorted(splits):
        annotations, images = splits[name]
        try:
            content = _read(annotations)
        except FileNotFoundError:
            raise DataError(
                f"Annotation file '{annotations}' (data.{name}.annotations) does not exist."
            ) from None
        except IsADirectoryError:
            raise DataError(f"data.{name}.annotations: '{annotations}' is a folder, not a JSON file.") from None
        digest.update(f"{name}\0{images}\0".encode())
        digest.update(content)
        digest.update("\n".join(_image_stats(content, images)).encode())
    return digest.hexdigest()[:16]


def prepare_dataset(data_config, splits=SPLITS):
    """Builds (once) and returns the TFDS builder for the configured COCO-format splits.

    Args:
        data_config: a `DataConfig` (paths in `train`/`val`, `tfds_data_dir`, `strict`).
        splits: which of the configured splits to include.

    Returns:
        The prepared `CocoFolder` builder; `builder.as_dataset(split=...)` reads it and
        `builder.info.metadata["categories"]` lists the categories in index order.
    """
    paths = {}
    for name in splits:
        split = getattr(data_config, name)
        if split.annotations is None and split.images is None:
            continue
        if not split.annotations or not split.images:
            raise DataError(f"data.{name} needs both 'annotations' and 'images' paths.")
        if not os.path.isdir(split.images):
            raise DataError(f"data.{name}.images: folder '{split.images}' does not exist.")
        paths[name] = (os.path.abspath(split.annotations), os.path.abspath(split.images))
    if not paths:
        raise DataError("No data split configured: set data.train.annotations and data.train.images.")

    if getattr(multiprocessing.current_process(), "_inheriting", False):
        # A build worker importing the user's script, which builds at import: waiting for the
        # parent's lock below would hang both.
        raise DataError(
            "prepare_dataset ran while a data.build_workers process was starting: call centermask_tf "
            "under `if __name__ == \"__main__\":` in scripts that build with data.build_workers > 1."
        )
    key = _content_key(paths, data_config.strict)
    config = CocoFolderConfig(
        name=key, splits=paths, strict=data_config.strict,
        build_workers=data_config.build_workers, beam_options=tuple(data_config.beam_options),
    )
    lock = os.path.join(data_config.tfds_data_dir, "coco_folder", f"{key}.lock")
    with locked(lock, f"the dataset {key}", wait=True):
        builder = CocoFolder(data_dir=data_config.tfds_data_dir, config=config)
        if builder.is_prepared():
            for name in paths:
                report = FaultReport()
                report.counts.update(builder.info.metadata.get(f"{name}_faults") or {})
                if report.counts:
                    logger.warning("split '%s', when it was built: %s", name, report.summary())
        else:
            # A build killed earlier left its TFDS scratch folder; under the lock none is in use.
            for stale in glob.glob(os.path.join(data_config.tfds_data_dir, "coco_folder", key, "incomplete.*")):
                shutil.rmtree(stale, ignore_errors=True)
            logger.info("building TFDS dataset %s in %s", config.name, data_config.tfds_data_dir)
            if not sys.stderr.isatty():  # progress bars in a log file are a line per update
                tfds.disable_progress_bar()
            try:
                builder.download_and_prepare(download_config=_download_config(config))
            except (OSError, tf.errors.OpError) as e:
                if not disk_full(e):
                    raise
                raise DiskFullError(
                    f"disk full while building the dataset in '{data_config.tfds_data_dir}' "
                    "(data.tfds_data_dir); free some space and rerun the same command (the partial "
                    "build is removed then)."
                ) from None
    return builder


def _download_config(config):
    """None, or Beam's settings when `beam_options` builds through Beam."""
    if not config.beam_options:
        return None
    try:
        from apache_beam.options.pipeline_options import PipelineOptions
    except ImportError:
        raise ConfigError(
            "data.beam_options builds through Apache Beam, which is not installed: "
            ".venv/bin/pip install -e '.[beam]' (or set data.beam_options: [] to build without Beam)."
        ) from None
    from apache_beam.options.pipeline_options import StandardOptions
    from apache_beam.runners.runner import create_runner

    options = PipelineOptions(list(config.beam_options))
    runner = options.view_as(StandardOptions).runner
    if runner:
        try:  # checked here: an unknown runner fails deep inside the build otherwise
            create_runner(runner)
        except ValueError as e:
            raise ConfigError(f"data.beam_options: {' '.join(str(e).split())[:300]}") from None
    return tfds.download.DownloadConfig(beam_options=options)

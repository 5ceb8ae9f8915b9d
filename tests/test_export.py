import base64
import http.server
import importlib.util
import json
import os
import re
import subprocess
import sys
import threading

import keras
import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from centermask_tf.cli import main
from centermask_tf.config import config_from_dict, load_config
from centermask_tf.data.shapes import make_shapes
from centermask_tf.data.tfds_builder import prepare_dataset
from centermask_tf.detector import CenterMask
from centermask_tf.export.tflite import non_builtin_ops, run_tflite
from centermask_tf.images import letterbox_image, load_image
from centermask_tf.tiling import tile_windows
from centermask_tf.training.setup import config_train_dataset
from centermask_tf.workdir import save_run_files

# The plain decoding (the flip test is one of the parametrised export options below).
# size_weight 0.1: the briefly trained network the fp16/int8 tolerances below were set on (it was
# lowered from 0.3 for a near-tie at the top-K cut, which test_exported_artifacts_... now avoids).
TINY = ["model.width_multiplier=0.125", "model.input_size=64", "model.head_conv=8",
        "model.shape_size=8", "model.mask_size=8", "model.max_detections=20", "eval.flip_test=false",
        "train.size_weight=0.1"]
CATEGORIES = [{"id": 3, "name": "a"}, {"id": 7, "name": "b"}, {"id": 12, "name": "c"}]
FILE_IDS = np.array([c["id"] for c in CATEGORIES])


# Every export test runs on both variants: the same signatures, outputs and tolerances.
CONFIGS = {"centernet": "configs/shapes_tiny.yaml", "fcos": "configs/shapes_fcos_tiny.yaml"}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def workdir(tmp_path_factory, request):
    data = tmp_path_factory.mktemp("shapes")
    make_shapes(str(data), train=16, val=10, seed=1, image_size=64)  # int8 calibrates on train
    config = load_config(CONFIGS[request.param], TINY + [
        f"data.train.annotations={data}/annotations/instances_train.json",
        f"data.train.images={data}/train",
        f"data.val.annotations={data}/annotations/instances_val.json",
        f"data.val.images={data}/val",
        f"data.tfds_data_dir={data}/tfds",
        "export.representative_images=16",
        "data.deterministic=true",
    ])
    root = tmp_path_factory.mktemp("export")
    save_run_files(config, str(root), CATEGORIES)
    # The same network every run: fp16 and int8 comparisons depend on how peaked its heatmaps
    # are, and a differently trained network each run made them flaky.
    keras.utils.set_random_seed(0)
    detector = CenterMask(config, CATEGORIES)
    # A briefly trained network: random heads give near-constant masks, on which the int8
    # quantisation error would be all there is to measure.
    detector.compile(optimizer=keras.optimizers.Adam(3e-3))
    dataset = config_train_dataset(config, prepare_dataset(config.data))
    detector.fit(dataset, epochs=1, steps_per_epoch=150, verbose=0)
    (root / "checkpoints").mkdir()
    detector.network.save_weights(str(root / "checkpoints" / "last.weights.h5"))
    return root, config, detector


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(3).integers(0, 255, (50, 70, 3), dtype=np.uint8)


def mask_iou(got, ref):
    """IoU of the masks thresholded at the reference's median probability: random weights give
    probabilities far below the usual 0.4, where every mask would be empty."""
    threshold = np.median(ref)
    mine, theirs = got >= threshold, ref >= threshold
    assert 0 < theirs.mean() < 1
    return (mine & theirs).sum() / (mine | theirs).sum()


def align(got, ref, n, same_class=True):
    """Indices that put exported detections in the order of the reference's first `n`. Near-tied
    scores may rank in either order after a lossy conversion, so each reference detection takes
    the unused exported one with the nearest box (of its class unless `same_class` is False:
    int8 may flip the class of a weak detection; several detections can share a box, one per
    class)."""
    boxes, classes = got["detection_boxes"][0], got["detection_classes"][0]
    free, order = set(range(int(got["num_detections"][0]))), []
    for box, cls in zip(ref["boxes"][0, :n], FILE_IDS[ref["classes"][0, :n]]):
        j = min((j for j in free if classes[j] == cls or not same_class), key=lambda j: np.abs(boxes[j] - box).max())
        free.remove(j)
        order.append(j)
    return np.array(order)


def keras_reference(detector, config, image):
    """The Keras path's detections, expressed like the export's (normalised, file ids)."""
    canvas, scale = letterbox_image(tf.constant(image), config.model.input_size)
    out = {k: v.numpy() for k, v in detector.detect_canvases(canvas[None]).items()}
    extents = np.array(image.shape[:2]) * scale
    out["boxes"] = np.clip(out["boxes"] / np.tile(extents, 2), 0, 1)
    return out


@pytest.fixture(scope="module")
def saved_model(workdir, tmp_path_factory):
    root, _, _ = workdir
    output = tmp_path_factory.mktemp("sm") / "shapes"
    assert main(["export", "--workdir", str(root), "--format", "saved_model", "--output", str(output)]) == 0
    return output / "1"


def test_saved_model_matches_keras(workdir, saved_model, image):
    _, config, detector = workdir
    loaded = tf.saved_model.load(str(saved_model))
    assert set(loaded.signatures) == {"serving_default", "image_tensor"}
    k, m = config.model.max_detections, config.model.mask_size
    for name, spec in (("serving_default", ([None], tf.string)), ("image_tensor", ([None, None, None, 3], tf.uint8))):
        signature = loaded.signatures[name]
        (given,) = signature.structured_input_signature[1].values()
        assert (given.shape.as_list(), given.dtype) == spec
        assert {key: value.shape.as_list() for key, value in signature.structured_outputs.items()} == {
            "num_detections": [None], "detection_boxes": [None, k, 4], "detection_scores": [None, k],
            "detection_classes": [None, k], "detection_masks": [None, k, m, m],
        }
    got = {k: v.numpy() for k, v in loaded.signatures["image_tensor"](image_tensor=tf.constant(image[None])).items()}
    ref = keras_reference(detector, config, image)
    n = int(ref["num_detections"][0])
    assert int(got["num_detections"][0]) == n > 0
    np.testing.assert_allclose(got["detection_boxes"][0, :n], ref["boxes"][0, :n], atol=1e-3)
    np.testing.assert_allclose(got["detection_scores"][0, :n], ref["scores"][0, :n], atol=1e-4)
    np.testing.assert_array_equal(got["detection_classes"][0, :n], FILE_IDS[ref["classes"][0, :n]])
    assert mask_iou(got["detection_masks"][0, :n], ref["masks"][0, :n]) >= 0.99
    by_bytes = loaded.signatures["serving_default"](image_bytes=tf.constant([tf.io.encode_png(image).numpy()]))
    np.testing.assert_allclose(by_bytes["detection_boxes"], got["detection_boxes"], atol=1e-6)


def test_exported_artifacts_return_the_results_of_the_keras_detector(workdir, saved_model, image, tmp_path):
    """`load_exported` runs a SavedModel or a TFLite file behind `detect`: the same `Results`,
    tiled too, up to the rounding of the letterboxed image to the artifacts' uint8 input (scores
    within 3e-3, boxes within 0.5 px, masks of IoU >= 0.9: a briefly trained network puts many
    mask pixels near the threshold)."""
    from centermask_tf.export.runtime import load_exported

    root, config, detector = workdir
    tflite = tmp_path / "model.tflite"
    assert main(["export", "--workdir", str(root), "--format", "tflite", "--output", str(tflite)]) == 0
    big = np.concatenate([np.concatenate([image] * 3, axis=1)] * 2)  # 100 x 210: 3 x 2 tiles of 70
    # The threshold clears every canvas's K-th score: where the network's top-K cuts, two
    # near-tied detections may swap between Keras and an export (as at the threshold, which the
    # matching below allows for), and the dropped one has no counterpart.
    views = [image, big] + [big[t : t + h, l : l + w] for t, l, h, w in tile_windows(*big.shape[:2], 70)]
    canvases = tf.stack([letterbox_image(tf.constant(v), config.model.input_size)[0] for v in views])
    threshold = float(detector.detect_canvases(canvases)["scores"][:, -1].numpy().max()) + 0.01
    for artifact in (saved_model, tflite):
        exported = load_exported(artifact, root)
        for kwargs in ({}, {"tile": 70}):
            for want, got in zip(detector.detect([image, big], score_threshold=threshold, **kwargs),
                                 exported.detect([image, big], score_threshold=threshold, **kwargs)):
                assert len(want) > 0 and abs(len(got) - len(want)) <= 1  # one may cross the threshold
                free = set(range(len(got)))
                for i in range(len(want)):  # near-tied scores may swap places: match by box and class
                    close = [j for j in free if got.class_ids[j] == want.class_ids[i]
                             and np.abs(got.boxes[j] - want.boxes[i]).max() <= 0.5]
                    if not close:
                        assert want.scores[i] < threshold + 3e-3, i  # the one that crossed the threshold
                        continue
                    j = min(close, key=lambda j: abs(got.scores[j] - want.scores[i]))
                    free.remove(j)
                    assert abs(got.scores[j] - want.scores[i]) <= 3e-3
                    a, b = got[j].masks[0], want[i].masks[0]
                    assert (a & b).sum() >= 0.9 * (a | b).sum()


def test_saved_model_loads_without_the_package(saved_model, image, tmp_path):
    png = tmp_path / "image.png"
    png.write_bytes(tf.io.encode_png(image).numpy())
    script = (
        "import json, sys, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(saved_model)!r})\n"
        f"out = m.signatures['serving_default'](image_bytes=tf.constant([open({str(png)!r}, 'rb').read()]))\n"
        "assert not any(name.startswith('centermask_tf') for name in sys.modules)\n"
        "print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert run.returncode == 0, run.stderr[-2000:]
    remote = json.loads(run.stdout.strip().splitlines()[-1])
    local = tf.saved_model.load(str(saved_model)).signatures["serving_default"](image_bytes=tf.constant([png.read_bytes()]))
    for key, value in local.items():
        np.testing.assert_allclose(np.array(remote[key]), value.numpy(), atol=1e-6)


def test_saved_model_rejects_wrong_dtype_and_rank(saved_model):
    signature = tf.saved_model.load(str(saved_model)).signatures["image_tensor"]
    rejected = (TypeError, ValueError, tf.errors.InvalidArgumentError)
    with pytest.raises(rejected, match="uint8"):
        signature(image_tensor=tf.zeros([1, 8, 8, 3], tf.float32))
    with pytest.raises(rejected):
        signature(image_tensor=tf.zeros([8, 8, 3], tf.uint8))


@pytest.mark.parametrize("quantize, min_iou, overrides", [
    ("none", 0.98, []),
    ("fp16", 0.95, []),
    # The flip test and single-factor masks are export options too.
    ("none", 0.98, ["eval.flip_test=true", "model.mask_factors=saliency"]),
])
def test_tflite_builtins_only_matches_keras(workdir, tmp_path, quantize, min_iou, overrides):
    root, config, detector = workdir
    if overrides:
        config = config_from_dict(config.to_dict(), overrides)
        detector = CenterMask(config, CATEGORIES, network=detector.network)
    path = tmp_path / f"model_{quantize}.tflite"
    args = ["export", "--workdir", str(root), "--format", "tflite", "--quantize", quantize, "--output", str(path)]
    for override in overrides:
        args += ["--set", override]
    assert main(args) == 0
    content = path.read_bytes()
    assert non_builtin_ops(content) == set()
    size = config.model.input_size
    canvas = np.random.default_rng(5).integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    got = run_tflite(content, {"image": canvas})
    ref = keras_reference(detector, config, canvas[0])
    n = int(ref["num_detections"][0])
    assert int(got["num_detections"][0]) == n > 0
    # All K slots may be full: a detection within the score tolerance of the last kept one can
    # trade places with the first one left out. The ones clear of it must all be there.
    scores = ref["scores"][0, :n]
    n = int(np.sum(scores > scores[-1] + 2e-3)) if n == config.model.max_detections else n
    assert n >= 5
    order = align(got, ref, n)
    np.testing.assert_allclose(got["detection_boxes"][0, order], ref["boxes"][0, :n], atol=1e-3)
    np.testing.assert_allclose(got["detection_scores"][0, order], ref["scores"][0, :n], atol=2e-3)
    assert mask_iou(got["detection_masks"][0, order], ref["masks"][0, :n]) >= min_iou


@pytest.mark.parametrize("float_scores", [True, False])
def test_tflite_int8_is_full_integer_and_close_to_keras(workdir, tmp_path, float_scores):
    """int8: uint8 input, the network's convolutions quantised but (`export.float_score_heads`,
    default true) those of the heads that score detections, post-processing float, mean mask
    IoU >= 0.80 over the top detections of the 10 validation images."""
    root, config, detector = workdir
    path = tmp_path / "model_int8.tflite"
    args = ["export", "--workdir", str(root), "--format", "tflite", "--quantize", "int8", "--output", str(path),
            "--set", f"export.float_score_heads={str(float_scores).lower()}"]
    assert main(args) == 0
    content = path.read_bytes()
    assert non_builtin_ops(content) == set()
    interpreter = Interpreter(model_content=content)
    assert interpreter.get_signature_runner().get_input_details()["image"]["dtype"] == np.uint8
    tensors = interpreter.get_tensor_details()
    score_head = re.compile(rf"/({'|'.join(detector.arch.score_heads)})(_\d+)?/")
    input_types, conv_types = {}, {True: set(), False: set()}
    for op in interpreter._get_ops_details():
        dtype = np.dtype(tensors[op["inputs"][0]]["dtype"]).name
        input_types.setdefault(op["op_name"], set()).add(dtype)
        if op["op_name"] == "CONV_2D":
            conv_types[bool(score_head.search(tensors[op["outputs"][0]]["name"]))].add(dtype)
    assert conv_types[False] == {"int8"}  # the network is integer
    assert conv_types[True] == {"float32" if float_scores else "int8"}
    # Post-processing stays float32: peaks (FCOS: candidates and NMS), box coordinates and mask
    # assembly (CenterNet: its Shape head at the peaks, a FULLY_CONNECTED).
    last = "NON_MAX_SUPPRESSION_V4" if config.model.type == "fcos" else "FULLY_CONNECTED"
    for name in ("TOPK_V2", "UNPACK", "BATCH_MATMUL", last):
        assert input_types[name] == {"float32"}, (name, input_types[name])
    ious = []
    for name in sorted(os.listdir(config.data.val.images)):
        image = load_image(os.path.join(config.data.val.images, name))
        canvas, _ = letterbox_image(tf.constant(image), config.model.input_size)
        canvas = np.round(canvas.numpy()).astype(np.uint8)[None]
        got = run_tflite(content, {"image": canvas})
        ref = keras_reference(detector, config, canvas[0])
        top = min(5, int(ref["num_detections"][0]))
        order = align(got, ref, top, same_class=False)
        ious.append(mask_iou(got["detection_masks"][0, order], ref["masks"][0, :top]))
    assert len(ious) == 10
    assert np.mean(ious) >= 0.80, ious


def test_image_bytes_that_are_not_an_image_name_the_input(saved_model):
    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="image_bytes"):
        signature(image_bytes=tf.constant([b"this is not an image"]))


def _serve_client():
    spec = importlib.util.spec_from_file_location("serve_client", "scripts/serve_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rest_and_grpc_requests_run_through_the_signature(saved_model, image):
    """The exact REST body and gRPC request serve_client.py sends, decoded as TF Serving does
    (b64 -> string tensor; TensorProto -> tensor), give the signature's direct outputs."""
    client = _serve_client()
    files = [tf.io.encode_png(image).numpy(), tf.io.encode_jpeg(image[:40]).numpy()]
    signature = tf.saved_model.load(str(saved_model)).signatures[client.SIGNATURE]
    direct = signature(image_bytes=tf.constant(files))

    body = json.loads(client.rest_body(files))
    assert body["signature_name"] == "serving_default"
    decoded = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
    from_rest = signature(**{client.INPUT: tf.constant(decoded)})

    request = client.grpc_request(files, "shapes", version=1)
    assert (request.model_spec.name, request.model_spec.version.value) == ("shapes", 1)
    from_grpc = signature(**{client.INPUT: tf.constant(tf.make_ndarray(request.inputs[client.INPUT]))})
    for key, value in direct.items():
        np.testing.assert_array_equal(from_rest[key].numpy(), value.numpy())
        np.testing.assert_array_equal(from_grpc[key].numpy(), value.numpy())
    assert direct["num_detections"].shape == (2,)


def test_rest_client_against_a_server_speaking_tf_servings_protocol(saved_model, image):
    """`rest_predict` end to end over HTTP against a stand-in that answers as TF Serving's REST
    API does (row format; 400 with {"error": ...} on a graph error)."""
    client = _serve_client()
    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            assert self.path == "/v1/models/shapes/versions/1:predict"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            data = [base64.b64decode(instance["b64"]) for instance in body["instances"]]
            try:
                out = signature(image_bytes=tf.constant(data))
                rows = [{k: v[i].numpy().tolist() for k, v in out.items()} for i in range(len(data))]
                status, answer = 200, {"predictions": rows}
            except tf.errors.InvalidArgumentError as e:
                status, answer = 400, {"error": e.message}
            payload = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        png = tf.io.encode_png(image).numpy()
        rows = client.rest_predict([png], "shapes", "127.0.0.1", server.server_port, version=1)
        direct = signature(image_bytes=tf.constant([png]))
        assert len(rows) == 1
        for key, value in direct.items():
            np.testing.assert_allclose(rows[0][key], value.numpy()[0], atol=1e-6)
        with pytest.raises(RuntimeError, match="400.*image_bytes"):
            client.rest_predict([b"not an image"], "shapes", "127.0.0.1", server.server_port, version=1)
    finally:
        server.shutdown()


def test_exports_carry_their_categories_and_a_mismatch_is_refused(workdir, saved_model, tmp_path):
    from centermask_tf.export import runtime
    from centermask_tf.export.tflite import tflite_categories, with_categories

    root, config, _ = workdir
    size = config.model.input_size
    assert json.loads((saved_model / "assets.extra" / "categories.json").read_text()) == CATEGORIES
    other = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    with pytest.raises(runtime.ArtifactError, match=r"exported with categories \[3:a, 7:b, 12:c\] but the workdir's data has \[1:a"):
        runtime.saved_model_detector(str(saved_model), size, other)
    runtime.saved_model_detector(str(saved_model), size, CATEGORIES)

    path = tmp_path / "model.tflite"
    assert main(["export", "--workdir", str(root), "--format", "tflite", "--output", str(path)]) == 0
    assert tflite_categories(path.read_bytes()) == CATEGORIES
    with pytest.raises(runtime.ArtifactError, match="exported with categories"):
        runtime.tflite_detector(str(path), size, other)
    # The metadata changes nothing the interpreter computes.
    plain = with_categories(path.read_bytes(), [])
    canvas = np.random.default_rng(2).integers(0, 255, (1, size, size, 3), dtype=np.uint8)
    for key, value in run_tflite(path.read_bytes(), {"image": canvas}).items():
        np.testing.assert_array_equal(value, run_tflite(plain, {"image": canvas})[key])


def test_an_artifact_without_categories_still_refuses_unknown_ids():
    from centermask_tf.export.runtime import ArtifactError, _from_exported

    outputs = {"num_detections": np.array([1.0]), "detection_boxes": np.zeros((1, 2, 4)),
               "detection_scores": np.array([[0.9, 0.0]]), "detection_classes": np.array([[5.0, 0.0]]),
               "detection_masks": np.zeros((1, 2, 4, 4))}
    with pytest.raises(ArtifactError, match=r"category ids \[5\].*\[3, 7, 12\]"):
        _from_exported(outputs, 64, FILE_IDS)
    outputs["detection_classes"] = np.array([[7.0, 0.0]])
    assert _from_exported(outputs, 64, FILE_IDS)["classes"].tolist() == [[1, 0]]


def test_a_saved_model_version_is_never_overwritten(workdir, saved_model, capsys):
    root, _, _ = workdir
    before = (saved_model / "saved_model.pb").read_bytes()
    args = ["export", "--workdir", str(root), "--format", "saved_model", "--output", str(saved_model.parent)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"'{saved_model}' exists: TF Serving treats a version as immutable" in err and "--version 2" in err
    assert (saved_model / "saved_model.pb").read_bytes() == before


def test_serve_client_sends_exif_rotated_photos_upright(tmp_path, image):
    from PIL import Image

    client = _serve_client()
    plain = tmp_path / "plain.png"
    plain.write_bytes(tf.io.encode_png(image).numpy())
    assert client.upright_bytes(str(plain)) == plain.read_bytes()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "phone.png", exif=exif.tobytes())
    sent = tf.io.decode_png(client.upright_bytes(str(tmp_path / "phone.png"))).numpy()
    np.testing.assert_array_equal(sent, image)


def test_a_16_bit_png_gives_the_detections_of_its_8_bit_version_everywhere(workdir, saved_model, tmp_path):
    """`detect`, `predict` and the SavedModel all read images with one decoder: a 16-bit grey
    PNG (PIL's RGB conversion clipped it to white) detects exactly as its 8-bit version."""
    from PIL import Image

    root, config, detector = workdir
    name = sorted(os.listdir(config.data.val.images))[0]
    grey = load_image(os.path.join(config.data.val.images, name)).mean(-1).round().astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(grey).save(folder / "a8.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(folder / "b16.png")
    with Image.open(folder / "b16.png") as check:
        assert check.mode == "I;16"
    # One image per call everywhere: in one batch the two would take different batch positions,
    # which round differently on some CPUs (4e-6 px on box corners on an AVX2-only host).
    (eight,) = detector.detect(str(folder / "a8.png"), score_threshold=0.0)
    (sixteen,) = detector.detect(str(folder / "b16.png"), score_threshold=0.0)
    assert len(eight["scores"]) > 0
    for key in ("boxes", "scores", "class_ids", "masks"):
        np.testing.assert_array_equal(eight[key], sixteen[key], err_msg=key)

    assert main(["predict", "--workdir", str(root), "--input", str(folder), "--output", str(tmp_path / "out"),
                 "--score", "0"]) == 0
    with open(tmp_path / "out" / "predictions.json") as f:
        by_file = {os.path.basename(p["file"]): p["detections"] for p in json.load(f)}
    assert by_file["a8.png"] and by_file["a8.png"] == by_file["b16.png"]

    serve = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    eight, sixteen = (serve(image_bytes=tf.constant([(folder / n).read_bytes()])) for n in ("a8.png", "b16.png"))
    for key, value in eight.items():
        np.testing.assert_array_equal(value, sixteen[key], err_msg=key)
    assert float(eight["num_detections"][0]) > 0

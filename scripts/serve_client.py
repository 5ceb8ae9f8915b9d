"""Client for a CenterMask SavedModel served by TF Serving, over REST or gRPC.

Stand-alone on purpose: a client machine needs numpy for REST, plus TensorFlow and
`tensorflow-serving-api` for gRPC, and never `centermask_tf`.

    docker run --rm -p 8500:8500 -p 8501:8501 \
        -v "$PWD/saved_models/shapes_tiny:/models/shapes_tiny" -e MODEL_NAME=shapes_tiny tensorflow/serving
    python scripts/serve_client.py rest --model shapes_tiny IMAGE [IMAGE ...]
    python scripts/serve_client.py grpc --model shapes_tiny IMAGE [IMAGE ...]

Both send the image files' bytes to the `serving_default` signature (decoding happens in the
served graph) and print each image's detections above `--score`; `--output FILE` also writes the
raw outputs as JSON. The served graph does not read EXIF: a photo whose Orientation tag turns or
flips it (phones store them sideways) is sent upright, re-encoded as PNG with Pillow; other files
go as they are.
"""

import argparse
import base64
import io
import json
import sys
import urllib.error
import urllib.request

import numpy as np
from PIL import Image, ImageOps

SIGNATURE = "serving_default"
INPUT = "image_bytes"


def rest_body(images, signature=SIGNATURE):
    """The JSON body of a REST predict request: one `{"b64": ...}` instance per image's bytes."""
    instances = [{"b64": base64.b64encode(data).decode("ascii")} for data in images]
    return json.dumps({"signature_name": signature, "instances": instances})


def rest_predict(images, model, host="localhost", port=8501, version=None, timeout=60):
    """POSTs to `/v1/models/<model>[/versions/<version>]:predict`; returns a list of per-image
    dicts of numpy arrays (the `predictions` of TF Serving's row format)."""
    path = f"/v1/models/{model}" + (f"/versions/{version}" if version else "") + ":predict"
    request = urllib.request.Request(
        f"http://{host}:{port}{path}",
        data=rest_body(images).encode("utf-8"),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            predictions = json.load(response)["predictions"]
    except urllib.error.HTTPError as e:  # TF Serving puts the graph's error message in the body
        raise RuntimeError(f"TF Serving answered {e.code}: {e.read().decode('utf-8', 'replace')}") from None
    return [{k: np.asarray(v) for k, v in row.items()} for row in predictions]


def grpc_request(images, model, version=None, signature=SIGNATURE):
    """A `PredictRequest` carrying the images' bytes as a string `[B]` tensor."""
    import tensorflow as tf
    from tensorflow_serving.apis import predict_pb2

    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version:
        request.model_spec.version.value = int(version)
    request.inputs[INPUT].CopyFrom(tf.make_tensor_proto(list(images), dtype=tf.string))
    return request


def grpc_predict(images, model, host="localhost", port=8500, version=None, timeout=60):
    """Calls `PredictionService/Predict`; returns per-image dicts like `rest_predict`."""
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import prediction_service_pb2_grpc

    # Masks of a full batch exceed gRPC's 4 MB default message size.
    options = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
    with grpc.insecure_channel(f"{host}:{port}", options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        response = stub.Predict(grpc_request(images, model, version), timeout)
    outputs = {k: tf.make_ndarray(v) for k, v in response.outputs.items()}
    return [{k: v[i] for k, v in outputs.items()} for i in range(len(images))]


def summarise(name, row, score):
    lines = [f"{name}: {int(row['num_detections'])} detections"]
    for box, cls, s in zip(row["detection_boxes"], row["detection_classes"], row["detection_scores"]):
        if s >= score:
            ymin, xmin, ymax, xmax = (float(v) for v in box)
            lines.append(f"  class {int(cls):>3d}  score {s:.3f}  box (ymin, xmin, ymax, xmax) "
                         f"({ymin:.3f}, {xmin:.3f}, {ymax:.3f}, {xmax:.3f})")
    return "\n".join(lines)


def upright_bytes(path):
    """The file's bytes, or PNG bytes of it turned upright when its EXIF orientation says so."""
    with open(path, "rb") as f:
        data = f.read()
    with Image.open(io.BytesIO(data)) as image:
        if image.getexif().get(0x0112, 1) in (0, 1):
            return data
        buffer = io.BytesIO()
        ImageOps.exif_transpose(image).save(buffer, format="PNG")
    return buffer.getvalue()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=["rest", "grpc"])
    parser.add_argument("images", nargs="+", help="JPEG/PNG files")
    parser.add_argument("--model", required=True, help="MODEL_NAME the server was started with")
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, help="default: 8501 (REST) or 8500 (gRPC)")
    parser.add_argument("--version", type=int, help="model version (default: the newest)")
    parser.add_argument("--score", type=float, default=0.3, help="print detections above this score")
    parser.add_argument("--output", help="write all outputs to this JSON file")
    args = parser.parse_args(argv)

    images = [upright_bytes(path) for path in args.images]
    if args.protocol == "rest":
        rows = rest_predict(images, args.model, args.host, args.port or 8501, args.version)
    else:
        rows = grpc_predict(images, args.model, args.host, args.port or 8500, args.version)
    for path, row in zip(args.images, rows):
        print(summarise(path, row, args.score))
    if args.output:
        with open(args.output, "w") as f:
            json.dump([{k: v.tolist() for k, v in row.items()} for row in rows], f)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""centermask_tf: CenterMask instance segmentation for TensorFlow / Keras 3."""

from setuptools import find_packages, setup

setup(
    name="centermask_tf",
    version="0.1.0",
    description=(
        "CenterMask (CVPR 2020) single-shot instance segmentation in TensorFlow/Keras: "
        "train with model.fit, serve with TF Serving, ship with TFLite."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.13",
    packages=find_packages(include=["centermask_tf", "centermask_tf.*"]),
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "keras>=3.15,<4",
        "tensorflow-datasets>=4.9.10,<5",
        # tfds imports importlib_resources on its download/build path under Python 3.11.
        "importlib-resources>=6",
        "pycocotools>=2.0.11,<3",
        "numpy>=1.26,<3",
        "pyyaml>=6.0,<7",
        "ai-edge-litert>=2.3,<3",
        "tqdm>=4.66,<5",
        # TensorBoard logging in training (tf.summary needs it since TF 2.20).
        "tensorboard>=2.20,<3",
        # Overlay drawing (masks, boxes, class names) in `centermask predict`.
        "pillow>=10,<14",
        # Mask contours for Results.polygons and COCO polygon files (the headless build: no GUI libs).
        "opencv-python-headless>=4.10,<6",
        # PredictRequest protos for the gRPC path of scripts/serve_client.py.
        "tensorflow-serving-api>=2.21,<2.22",
    ],
    extras_require={
        # The test extra includes every optional feature the tests check: fast-eval (its metrics
        # equal pycocotools'), Beam (its dataset build equals the single-process one), the
        # evaluation plots, the keras-hub backbones, video and ONNX timing (onnx writes the test's
        # model); xdist runs the suite in 2 processes.
        "test": ["pytest>=8,<10", "pytest-xdist>=3.6,<4", "faster-coco-eval>=1.8.0,<1.9", "apache-beam>=2.77,<3",
                 "matplotlib>=3.8,<4", "keras-hub>=0.32,<0.33", "av>=14,<19", "onnxruntime>=1.20,<2",
                 "onnx>=1.17,<2"],
        # `benchmark inference --peer model.onnx`: a peer model timed by ONNX Runtime.
        "bench": ["onnxruntime>=1.20,<2"],
        # Video in `predict` and `CenterMask.detect_video`: PyAV, whose wheels carry FFmpeg with
        # its H.264 encoder (libx264).
        "video": ["av>=14,<19"],
        # `evaluate`'s precision-recall, F1 and confusion-matrix plots in WORKDIR/eval/plots/.
        "plots": ["matplotlib>=3.8,<4"],
        # model.backbone: keras_hub (a keras-hub backbone preset with a feature pyramid).
        "keras-hub": ["keras-hub>=0.32,<0.33"],
        # eval.backend: faster_coco_eval (same COCO metrics, faster).
        "fast-eval": ["faster-coco-eval>=1.8.0,<1.9"],
        # data.build_workers > 1 / data.beam_options: the TFDS build through Apache Beam.
        "beam": ["apache-beam>=2.77,<3"],
    },
    entry_points={"console_scripts": ["centermask=centermask_tf.cli:main"]},
)

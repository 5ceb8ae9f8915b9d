"""centermask_tf: CenterMask instance segmentation for TensorFlow / Keras 3.

    from centermask_tf import CenterMask
    detector = CenterMask.from_workdir("work/demo")
    results = detector.detect(images)
"""

__all__ = ["CenterMask"]


def __getattr__(name):
    # Imported on first use: the CLI must start TensorFlow itself (quietly), and
    # `centermask_tf.timing` must run without TensorFlow at all.
    if name == "CenterMask":
        from centermask_tf.detector import CenterMask

        return CenterMask
    raise AttributeError(f"module 'centermask_tf' has no attribute {name!r}")

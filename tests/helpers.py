"""One helper per concern, used by every layer and model test (keras-hub's test_case habit)."""

import json

import keras
import numpy as np
import tensorflow as tf


def _as_list(outputs):
    if isinstance(outputs, dict):
        return [np.asarray(outputs[k]) for k in sorted(outputs)]
    if isinstance(outputs, (list, tuple)):
        return [np.asarray(o) for o in outputs]
    return [np.asarray(outputs)]


def assert_outputs_close(actual, expected, atol=1e-6):
    for a, e in zip(_as_list(actual), _as_list(expected), strict=True):
        np.testing.assert_allclose(a, e, atol=atol, rtol=0)


def run_layer_test(layer, inputs, tmp_path, expected_shape=None, atol=1e-6):
    """Checks a layer: JSON config round trip, symbolic vs eager shapes, XLA vs eager, and a
    `.keras` save -> `load_model(safe_mode=True)` round trip with identical outputs.

    Args:
        layer: a built or unbuilt layer instance.
        inputs: list of numpy arrays passed positionally.
        tmp_path: a pytest tmp_path.
        expected_shape: the eager output shape, if it should be checked.
    """
    eager = layer(*inputs)
    if expected_shape is not None:
        assert tuple(eager.shape) == tuple(expected_shape)

    config = layer.get_config()
    clone = layer.__class__.from_config(json.loads(json.dumps(config)))
    assert json.dumps(clone.get_config(), sort_keys=True) == json.dumps(config, sort_keys=True)

    symbolic_inputs = [keras.Input(batch_shape=x.shape, dtype=str(x.dtype)) for x in inputs]
    symbolic = layer(*symbolic_inputs)
    assert tuple(symbolic.shape) == tuple(eager.shape)

    compiled = tf.function(lambda *xs: layer(*xs), jit_compile=True)(*inputs)
    assert_outputs_close(compiled, eager, atol=atol)

    model = keras.Model(symbolic_inputs if len(inputs) > 1 else symbolic_inputs[0], symbolic)
    run_model_saving_test(model, inputs, tmp_path, atol=atol)
    return eager


def run_model_saving_test(model, inputs, tmp_path, atol=1e-6):
    """Saves `.keras`, reloads with safe_mode=True, compares outputs; also the config JSON."""
    expected = model(inputs if len(inputs) > 1 else inputs[0])
    config = model.get_config()
    assert json.loads(json.dumps(config)) == json.loads(json.dumps(config, sort_keys=True))
    path = tmp_path / f"{model.name}.keras"
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    json_config = lambda m: json.dumps(m.get_config(), sort_keys=True)  # noqa: E731
    assert json_config(restored) == json_config(model)
    actual = restored(inputs if len(inputs) > 1 else inputs[0])
    assert_outputs_close(actual, expected, atol=atol)


def train_args(shapes, workdir, *extra, config="configs/shapes_tiny.yaml"):
    """`centermask train` arguments for the tiny run of `config` on the `shapes` fixture's set."""
    _, overrides = shapes
    args = ["train", "--config", config, "--workdir", str(workdir)]
    for override in [*overrides, *extra]:
        args += ["--set", override]
    return args

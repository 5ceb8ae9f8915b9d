"""Starting from trained weights: the layers of another model that match by name and weight
shapes are copied into a network; the others keep their fresh initialisation.

Layers are named by their path in the network (`resnet18_backbone/stem_conv`, `heatmap`): the
names this package gives its layers, the same in every build of a config. A model with other
classes matches everywhere except its class-specific heads, whose fresh initialisation (the
heatmap's focal-loss bias prior included) is what training them from scratch needs.
"""

import dataclasses
import os
import warnings

import keras
import numpy as np

from centermask_tf.errors import UserError

# How many re-initialised layers the summary names before it counts the rest.
_NAMED = 6
MISSING = "not in the source"


@dataclasses.dataclass
class TransferReport:
    """What `transfer_weights` did.

    Attributes:
        source: where the weights came from.
        loaded: the paths of the layers whose weights were copied.
        reinitialised: path -> why a layer kept its fresh weights ("3 -> 2 classes", "not in
            the source", or the two weight shapes).
    """

    source: str
    loaded: list
    reinitialised: dict

    def summary(self):
        """One line: how many layers were loaded and which were re-initialised, and why."""
        total = len(self.loaded) + len(self.reinitialised)
        line = f"init_from {self.source}: loaded {len(self.loaded)} of {total} layers"
        if not self.reinitialised:
            return line + "."
        named = [f"{name}: {why}" for name, why in self.reinitialised.items() if why != MISSING]
        missing = [name for name, why in self.reinitialised.items() if why == MISSING]
        parts = named[:_NAMED]
        if len(named) > _NAMED:
            parts.append(f"{len(named) - _NAMED} more of other shapes")
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            parts.append(f"{len(missing)} not in the source ({shown})")
        return f"{line}; re-initialised {'; '.join(parts)}."


def _layers(network):
    """`{path: layer}` of every layer with weights, nested models walked into."""
    found = {}

    def walk(model, prefix):
        for layer in model.layers:
            if isinstance(layer, keras.Model):
                walk(layer, f"{prefix}{layer.name}/")
            elif layer.weights:
                found[prefix + layer.name] = layer

    walk(network, "")
    return found


def layer_weights(network, loaded_only=False):
    """`{path: [arrays]}` of every layer with weights. `loaded_only`: leave out layers holding a
    NaN (the mark `weights_file_layers` gives what a file lacked)."""
    found = {}
    for path, layer in _layers(network).items():
        arrays = [np.asarray(w) for w in layer.get_weights()]
        if not (loaded_only and any(np.isnan(a).any() for a in arrays if a.dtype.kind == "f")):
            found[path] = arrays
    return found


def weights_file_layers(reader, path):
    """The layers a `.weights.h5` file holds, read into `reader` (a network of the layout the
    file was saved from): `{path: [arrays]}` of the layers that loaded. The file names its
    layers by position, so a layer of another shape or one it lacks is skipped; filling
    `reader` with NaN first tells those apart from the loaded ones."""
    for variable in reader.weights:
        if variable.dtype in ("float16", "float32", "float64", "bfloat16"):
            variable.assign(np.full(variable.shape, np.nan, variable.dtype))
    with warnings.catch_warnings():  # Keras lists what it skipped; the report says it better
        warnings.simplefilter("ignore", UserWarning)
        reader.load_weights(path, skip_mismatch=True)
    return layer_weights(reader, loaded_only=True)


def _why(source_arrays, target_arrays, num_classes):
    """Why a layer of the same name does not load, or None when it does."""
    source_shapes = [tuple(a.shape) for a in source_arrays]
    target_shapes = [tuple(a.shape) for a in target_arrays]
    if source_shapes == target_shapes:
        return None
    # A head whose only difference is its output channels, and the target's are its classes.
    same_but_last = len(source_shapes) == len(target_shapes) and all(
        s[:-1] == t[:-1] for s, t in zip(source_shapes, target_shapes)
    )
    if same_but_last and target_shapes[-1][-1] == num_classes:
        return f"{source_shapes[-1][-1]} -> {num_classes} classes"
    return f"weights {source_shapes} -> {target_shapes}"


def transfer_weights(network, source, source_name, num_classes, apply=True):
    """Copies the layers of `source` (`{path: [arrays]}`) whose path and weight shapes match
    into `network` (`apply=False`: only says what it would do).

    Raises:
        UserError: not one layer matches (a model of another architecture or backbone).
    """
    report = TransferReport(source_name, [], {})
    targets = _layers(network)
    for path, layer in targets.items():
        if path not in source:
            report.reinitialised[path] = MISSING
            continue
        why = _why(source[path], layer.get_weights(), num_classes)
        if why:
            report.reinitialised[path] = why
        else:
            report.loaded.append(path)
    if not report.loaded:
        raise UserError(
            f"train.init_from '{source_name}': none of this network's {len(targets)} layers matches one "
            f"of its {len(source)} by name and weight shapes (a model of another architecture or "
            "backbone?). Pass a model with this config's model.type and model.backbone, or remove init_from."
        )
    if apply:
        for path in report.loaded:
            targets[path].set_weights(source[path])
    return report


def check_source_path(path):
    """Refuses, in one line, a `init_from` that is no workdir, preset, `.keras` or `.weights.h5`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(
            f"train.init_from: '{path}' does not exist; pass a training workdir, a preset folder, "
            "a .keras file or a .weights.h5 file."
        )
    if os.path.isfile(path) and not path.endswith((".keras", ".h5")):
        raise UserError(
            f"train.init_from: '{path}' is not a model (a workdir, a preset folder, a .keras or a "
            ".weights.h5 file is)."
        )
    return path

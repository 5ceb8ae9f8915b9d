"""The package's import graph, counting imports inside functions: no circle, imports point one
way (leaves -> model -> arch/data -> ... -> tools -> cli), architectures are independent of each
other, and only `arch/` reads `model.type`."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "centermask_tf"
# May import the package lazily: the CLI starts TensorFlow itself (quietly), and the package's
# `__init__` must import nothing until `CenterMask` is asked for.
LAZY = {"centermask_tf.cli", "centermask_tf"}


def module_name(path):
    return ".".join(("centermask_tf", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(name):
    """The package module an imported name lives in (`a.b.func` -> `a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports(path):
    """`(module, inside a function)` for every package module `path` imports."""
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("centermask_tf"):
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names if alias.name.startswith("centermask_tf")]
        else:
            continue
        found.update((imported(name), id(node) not in top) for name in names)
    return found


def graph():
    return {name: {module for module, _ in imports(path)} - {name} for name, path in MODULES.items()}


def find_circle(edges):
    """One import circle of `edges` as a list of modules, or None."""
    visiting, done = [], set()

    def visit(name):
        if name in visiting:
            return visiting[visiting.index(name):] + [name]
        if name in done:
            return None
        visiting.append(name)
        for other in sorted(edges.get(name, ())):
            circle = visit(other)
            if circle:
                return circle
        visiting.pop()
        done.add(name)
        return None

    for name in sorted(edges):
        circle = visit(name)
        if circle:
            return circle
    return None


def test_the_circle_finder_finds_circles():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_import_graph_counting_imports_inside_functions_has_no_circle():
    edges = graph()
    assert len(edges) > 40 and "centermask_tf.detector" in edges["centermask_tf.training.setup"]
    assert find_circle(edges) is None, " -> ".join(find_circle(edges))


def test_only_the_cli_and_the_package_import_lazily():
    lazy = sorted(
        f"{name} imports {module} inside a function"
        for name, path in MODULES.items() if name not in LAZY
        for module, inside in imports(path) if inside
    )
    assert not lazy, lazy


def test_imports_point_one_way():
    edges = graph()

    def under(name, *prefixes):
        return any(name == p or name.startswith(p + ".") for p in prefixes)

    upward = []
    for name, modules in edges.items():
        for module in modules:
            if under(module, "centermask_tf.tools", "centermask_tf.cli") and not under(name, "centermask_tf.tools", "centermask_tf.cli"):
                upward.append(f"{name} -> {module} (the library never imports tools/ or the CLI)")
            if under(name, "centermask_tf.model") and not under(module, "centermask_tf.model", "centermask_tf.ops", "centermask_tf.errors"):
                upward.append(f"{name} -> {module} (model/ holds parts with no architecture or data knowledge)")
            if under(name, "centermask_tf.arch", "centermask_tf.data") and under(
                    module, "centermask_tf.detector", "centermask_tf.training", "centermask_tf.export",
                    "centermask_tf.evaluation", "centermask_tf.predict", "centermask_tf.postprocess"):
                upward.append(f"{name} -> {module}")
            if under(name, "centermask_tf.data") and under(module, "centermask_tf.arch"):
                upward.append(f"{name} -> {module} (the pipeline takes the architecture's encoder)")
    assert not upward, upward


def test_architectures_do_not_import_each_other_and_shared_parts_import_none():
    edges = graph()
    names = sorted(path.name for path in (PACKAGE / "arch").iterdir() if (path / "__init__.py").exists())
    assert {"centernet", "fcos"} <= set(names)
    for name in names:
        inside = {m for m in MODULES if m.startswith(f"centermask_tf.arch.{name}")}
        others = [f"centermask_tf.arch.{other}" for other in names if other != name]
        crossing = {(a, b) for a in inside for b in edges[a] if any(b.startswith(o) for o in others)}
        assert not crossing, crossing
    for shared in ("centermask_tf.arch.base", "centermask_tf.arch.shared_losses"):
        assert not {m for m in edges[shared] if any(m.startswith(f"centermask_tf.arch.{n}") for n in names)}


def test_decoders_do_not_import_the_losses():
    edges = graph()
    for name in ("centernet", "fcos"):
        decoder = edges[f"centermask_tf.arch.{name}.decoder"]
        assert not {m for m in decoder if "losses" in m}, decoder
        assert "centermask_tf.ops" in decoder


def test_only_arch_reads_the_model_type():
    """A variant chosen anywhere else (by `model.type`, or by which outputs a network has) is
    what a new architecture would have to find and change."""
    readers = []
    for name, path in MODULES.items():
        if name.startswith("centermask_tf.arch") or name == "centermask_tf.config":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "type":
                readers.append(f"{name}:{node.lineno}")
            if isinstance(node, ast.Compare) and any(
                    isinstance(c, ast.Constant) and c.value in ("fcos", "centernet", "classification")
                    for c in (node.left, *node.comparators)):
                readers.append(f"{name}:{node.lineno}")
    assert not readers, readers


def test_every_package_folder_is_a_regular_package():
    """`find_packages` (setup.py) installs only folders with an `__init__.py`."""
    folders = {path.parent for path in PACKAGE.rglob("*.py") if "__pycache__" not in path.parts}
    assert not [str(f) for f in folders if not (f / "__init__.py").is_file()]

"""The package's module-level import graph has no cycles, and decoding does not depend on the
losses (a decoder must not need training code)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "centermask_tf"


def module_imports(path, everywhere=False):
    """The `centermask_tf` modules a file imports (at module level, or `everywhere`)."""
    tree = ast.parse(path.read_text())
    nodes = ast.walk(tree) if everywhere else tree.body
    names = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("centermask_tf"):
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("centermask_tf"))
    return names


def test_module_level_imports_have_no_cycle():
    modules = {
        ".".join(("centermask_tf", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__"): path
        for path in PACKAGE.rglob("*.py")
    }
    graph = {name: module_imports(path) & set(modules) - {name} for name, path in modules.items()}
    assert len(graph) > 20 and graph["centermask_tf.training"]
    visiting, done = set(), set()

    def visit(name, trail):
        assert name not in visiting, " -> ".join([*trail, name])
        if name in done:
            return
        visiting.add(name)
        for other in graph[name]:
            visit(other, [*trail, name])
        visiting.discard(name)
        done.add(name)

    for name in graph:
        visit(name, [])


def test_decoder_does_not_import_the_losses():
    assert not any("losses" in name for name in module_imports(PACKAGE / "decode.py", everywhere=True))
    assert "centermask_tf.ops" in module_imports(PACKAGE / "decode.py")

"""The package's import graph: imports point down the layers (ARCHITECTURE.md)
and never in a cycle, function-level imports included."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_paligemma2"


def _modules():
    """{dotted module name: path} of every module of the package."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _root_names(modules):
    """{name the package root re-exports: the module defining it} (its
    `_EXPORTS` table, which the root imports from)."""
    for node in ast.parse(modules["keras_paligemma2"].read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "_EXPORTS":
            table = ast.literal_eval(node.value)
            return {
                name: f"{module}.{attribute}" if f"{module}.{attribute}" in modules else module
                for name, (module, attribute) in table.items()
            }
    raise AssertionError("keras_paligemma2/__init__.py has no _EXPORTS table")


def _imports(modules):
    """{module: set of package modules it imports anywhere in its code}.

    `from keras_paligemma2 import X` counts as importing the module that
    defines X (the root only re-exports it)."""
    root_names = _root_names(modules)
    edges = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
                if base == "keras_paligemma2":
                    names += [root_names[a.name] for a in node.names if a.name in root_names]
            else:
                continue
            for imported in names:
                # The longest module the name is or lies in; the package root
                # (`from keras_paligemma2 import x`) counts as `x` alone.
                hits = [m for m in modules if imported == m or imported.startswith(m + ".")]
                hit = max(hits, key=len, default=None)
                if hit and hit != name and not name.startswith(hit + "."):
                    targets.add(hit)
        edges[name] = targets
    return edges


def _cycle(edges):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                return trail[trail.index(target) :] + [target]
            if target not in state:
                found = visit(target, trail + [target])
                if found:
                    return found
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            found = visit(module, [module])
            if found:
                return found
    return None


def test_no_import_cycles_even_through_function_level_imports():
    cycle = _cycle(_imports(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The layers, lowest first: a module may import its own subpackage's modules
# and those of the layers below it, never one above.
LAYERS = (
    "utils",
    "layers",
    "preprocessing",
    "checkpoints",
    "training",
    "models",
    "distribution",
    "apps",
)
# The package root and `python -m keras_paligemma2` sit above every layer.
TOP = ("keras_paligemma2", "keras_paligemma2.__main__")


def _layer(module):
    if module in TOP:
        return len(LAYERS)
    return LAYERS.index(module.split(".")[1])


def _upward(edges):
    """[(module, imported)] for every import of a higher layer (the root included)."""
    return sorted(
        (module, target)
        for module, targets in edges.items()
        for target in targets
        if _layer(target) > _layer(module) or (target in TOP and module not in TOP)
    )


def test_every_module_lies_in_a_layer():
    for module in _modules():
        assert module in TOP or module.split(".")[1] in LAYERS, module


def test_imports_only_point_down_the_layers():
    assert _upward(_imports(_modules())) == []


def test_the_checker_sees_an_upward_import():
    edges = {
        "keras_paligemma2.layers.gemma": {"keras_paligemma2.models.backbone"},
        "keras_paligemma2.models.backbone": {"keras_paligemma2.layers.gemma"},
        "keras_paligemma2.apps.cli": {"keras_paligemma2"},
    }
    assert _upward(edges) == [
        ("keras_paligemma2.apps.cli", "keras_paligemma2"),
        ("keras_paligemma2.layers.gemma", "keras_paligemma2.models.backbone"),
    ]


@pytest.mark.parametrize(
    "leaf",
    [
        "keras_paligemma2.layers.exact_attention",
        "keras_paligemma2.checkpoints.presets",
        "keras_paligemma2.utils.backend",
        "keras_paligemma2.utils.errors",
        "keras_paligemma2.utils.files",
        "keras_paligemma2.utils.jsonl",
        "keras_paligemma2.utils.keras_internals",
    ],
)
def test_leaf_modules_import_nothing_of_the_package(leaf):
    # The package's error class is the one thing a leaf may raise.
    assert _imports(_modules())[leaf] <= {"keras_paligemma2.utils.errors"} - {leaf}


def test_keras_internals_are_touched_in_one_module():
    """Private Keras / keras-hub names (`keras.src`, `keras_hub.src`, private
    attributes of variables and models) appear only in utils.keras_internals."""
    private = (
        "keras.src",
        "keras_hub.src",
        "._initialize",
        "__func__",
        "._initial_epoch",
        "._value",
    )
    offenders = [
        f"{name}: {word}"
        for name, path in _modules().items()
        if name != "keras_paligemma2.utils.keras_internals"
        for word in private
        if word in path.read_text()
    ]
    assert offenders == []


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(edges) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

"""The package's import graph: no cycles, function-level imports included."""

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
    """{name the package root re-exports: the module defining it}."""
    names = {}
    for node in ast.walk(ast.parse(modules["keras_paligemma2"].read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.module.startswith("keras_paligemma2")
        ):
            names.update({alias.asname or alias.name: node.module for alias in node.names})
    return names


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


@pytest.mark.parametrize(
    "leaf",
    [
        "keras_paligemma2.exact_attention",
        "keras_paligemma2.layouts",
        "keras_paligemma2.presets",
        "keras_paligemma2.jsonl",
    ],
)
def test_leaf_modules_import_nothing_of_the_package(leaf):
    assert _imports(_modules())[leaf] == set()


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path):
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert _cycle(edges) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None

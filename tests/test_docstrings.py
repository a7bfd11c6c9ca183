"""Every public class and function documents each of its arguments on a line
of its own (`name: ...` under `Args:`), and layers document `call` too."""

import ast
import pathlib
import re

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "keras_paligemma2"
# Methods whose arguments Keras defines and documents.
KERAS_HOOKS = {
    "get_config",
    "from_config",
    "build",
    "compute_output_spec",
    "compute_output_shape",
}


def _parameters(function):
    arguments = function.args
    names = [a.arg for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs]
    names += [a.arg for a in (arguments.vararg, arguments.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def _documents(docstring, name):
    return re.search(rf"^\s*\**{re.escape(name)}\b[^:\n]*:", docstring or "", re.M) is not None


def undocumented(source):
    """[(qualified name, [arguments without their own line])] of one module's source."""
    found = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
            missing = [p for p in _parameters(node) if not _documents(ast.get_docstring(node), p)]
            if missing:
                found.append((node.name, missing))
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            class_doc = ast.get_docstring(node)
            for item in node.body:
                if not isinstance(item, ast.FunctionDef) or item.name in KERAS_HOOKS:
                    continue
                if item.name.startswith("_") and item.name != "__init__":
                    continue
                # The constructor's arguments are documented on the class.
                doc = class_doc if item.name == "__init__" else ast.get_docstring(item)
                missing = [p for p in _parameters(item) if not _documents(doc, p)]
                if missing:
                    found.append((f"{node.name}.{item.name}", missing))
    return found


def test_every_public_argument_is_documented():
    report = [
        f"{path.relative_to(PACKAGE.parent)}: {name} {missing}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for name, missing in undocumented(path.read_text())
    ]
    assert report == [], "\n".join(report)


def test_the_check_sees_a_missing_argument():
    source = '''
def f(a, b, **kwargs):
    """Does f.

    Args:
        a: int, the first.
        **kwargs: passed on.
    """

class Layer:
    """A layer.

    Args:
        width: int.
    """
    def __init__(self, width, depth): ...
    def call(self, x):
        """Applies it."""
'''
    assert undocumented(source) == [
        ("f", ["b"]),
        ("Layer.__init__", ["depth"]),
        ("Layer.call", ["x"]),
    ]

"""The wheel holds every module and shipped preset, and each module imports
from it (no subpackage can be left out of `pyproject.toml`)."""

import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "keras_paligemma2"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy of what the wheel is made of: setuptools writes build/
    # and egg-info beside the sources, which must not land in the checkout.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(PACKAGE, source / PACKAGE.name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation"]
        + ["-q", "-w", str(out)],
        check=True,
        cwd=out,
    )
    (path,) = out.glob("keras_paligemma2-*.whl")
    return path


def _source_files():
    return sorted(
        str(p.relative_to(REPO))
        for p in PACKAGE.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def test_the_wheel_holds_every_module_and_preset_file(wheel):
    with zipfile.ZipFile(wheel) as archive:
        inside = set(archive.namelist())
    missing = [f for f in _source_files() if f not in inside]
    assert missing == []


def test_the_console_script_names_a_function_the_wheel_has(wheel):
    with zipfile.ZipFile(wheel) as archive:
        (entry_points,) = [n for n in archive.namelist() if n.endswith("entry_points.txt")]
        text = archive.read(entry_points).decode()
    (line,) = [line for line in text.splitlines() if line.startswith("keras-paligemma2")]
    module, function = line.split("=")[1].strip().split(":")
    # The module is in the wheel and defines the function.
    with zipfile.ZipFile(wheel) as archive:
        source = archive.read(module.replace(".", "/") + ".py").decode()
    assert f"def {function}(" in source


def test_every_module_imports_from_the_installed_wheel(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "-q",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    modules = [
        ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        for p in PACKAGE.rglob("*.py")
    ]
    script = (
        "import importlib, sys\n"
        f"for name in {sorted(modules)!r}:\n"
        "    module = importlib.import_module(name)\n"
        f"    assert module.__file__.startswith({str(target)!r}), module.__file__\n"
        "import keras_paligemma2 as kp\n"
        "assert kp.checkpoints.presets.embedded_preset_dir('pg2_tiny_shapes').startswith("
        f"{str(target)!r})\n"
        "print(len(sys.modules))\n"
    )
    # The installed copy comes first on the path, before the editable checkout.
    subprocess.run(
        [sys.executable, "-c", script],
        check=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target), "TF_CPP_MIN_LOG_LEVEL": "3"},
    )

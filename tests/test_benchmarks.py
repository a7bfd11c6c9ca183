"""Benchmarks are a package: each module imports as `benchmarks.NAME` from the
repository root, with no `sys.path` edits (they run by hand, not here)."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__")


def test_no_benchmark_edits_sys_path():
    edits = [
        name for name in MODULES if "sys.path" in (REPO / "benchmarks" / f"{name}.py").read_text()
    ]
    assert edits == []


def test_every_benchmark_module_imports_as_part_of_the_package():
    script = "import importlib\n" + "".join(
        f"importlib.import_module('benchmarks.{name}')\n" for name in MODULES
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=REPO)

"""The tree keeps its format and lint rules (ruff, configured in pyproject.toml)."""

import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _ruff(*args):
    command = [shutil.which("ruff")] if shutil.which("ruff") else [sys.executable, "-m", "ruff"]
    return subprocess.run(
        command + list(args), cwd=ROOT, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args", [("format", "--check", "."), ("check", ".")], ids=["format", "lint"]
)
def test_ruff_passes(args):
    result = _ruff(*args)
    assert result.returncode == 0, (
        f"`ruff {' '.join(args)}` found problems (fix with `ruff format .` / "
        f"`ruff check --fix .`):\n{result.stdout}{result.stderr}"
    )

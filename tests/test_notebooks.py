"""The notebooks in examples/ run from top to bottom on the embedded preset."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

EXAMPLES = pathlib.Path(__file__).parents[1] / "examples"
# Shortened where the notebook reads these; the cells are otherwise as users run them.
SHORTER = {"NOTEBOOK_TRAIN_EXAMPLES": "256", "NOTEBOOK_EPOCHS": "2"}


@pytest.mark.parametrize("name", ["inference.ipynb", "finetune_lora.ipynb", "sharding.ipynb"])
def test_notebook_runs(name, monkeypatch):
    for key, value in SHORTER.items():
        monkeypatch.setenv(key, value)
    notebook = nbformat.read(EXAMPLES / name, as_version=4)
    # The kernel inherits this process's environment: JAX, 8 simulated CPU devices.
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(EXAMPLES)}},
    )
    client.execute()
    errors = [
        o
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if o.get("output_type") == "error"
    ]
    assert not errors
    # No warnings in the cells' output (tqdm's "IProgress not found" widget
    # warning, TensorFlow's CUDA probes on a CPU machine).
    stderr = "".join(
        o.get("text", "")
        for cell in notebook.cells
        for o in cell.get("outputs", [])
        if o.get("name") == "stderr"
    )
    assert "Warning" not in stderr and "cuInit" not in stderr, stderr

"""Benchmarks are a package: each module imports as `benchmarks.NAME` from the
repository root, with no `sys.path` edits (they run by hand, not here)."""

import pathlib
import subprocess
import sys

import numpy as np
from keras.src.backend.common import global_state

from benchmarks.gpu_train import quantised_backbone

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


def test_gpu_train_builds_qlora_shapes_without_a_float_decoder(tiny_config):
    # The GPU run's 10B int4 step builds the decoder straight in Keras'
    # quantised form: no float kernel there, the ViT float, values drawn.
    # The valueless probe it reads layer paths from stays off Keras' list of
    # variables to initialise (a later scope's exit would draw them).
    pending = len(global_state.get_global_attribute("uninitialized_variables") or [])
    backbone = quantised_backbone(tiny_config, "int4")
    assert len(global_state.get_global_attribute("uninitialized_variables") or []) == pending
    modes = {layer.path: layer.quantization_mode for layer in backbone._flatten_layers()}
    assert modes["decoder_block_0/attention/query"] == "int4"
    assert modes["decoder_block_1/mlp/down"] == "int4"
    assert modes["vision_encoder/block_0/attention/query"] is None
    decoder = [v for v in backbone.weights if v.path.startswith("decoder_block")]
    kernels = [v for v in decoder if v.path.endswith("/kernel")]
    assert kernels and {str(v.dtype) for v in kernels} == {"int8"}
    assert all(np.asarray(v.value).std() > 10 for v in kernels)

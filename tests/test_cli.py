"""`python -m keras_paligemma2 convert`, end to end."""

import subprocess
import sys

import numpy as np

from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.checkpoints.common import read_npz_lazily
from keras_paligemma2.cli import main


def test_convert_writes_a_preset_that_loads_bit_exactly(fixtures_dir, tmp_path, capsys):
    source = fixtures_dir / "bv_tiny" / "tiny.b16.npz"
    destination = tmp_path / "preset"
    assert main(["convert", str(source), str(destination), "--dtype", "bfloat16"]) == 0
    assert "Wrote" in capsys.readouterr().out
    lm = PaliGemma2CausalLM.from_preset(destination)
    embedding = np.asarray(lm.backbone.token_embedding.embeddings)
    want = read_npz_lazily(source)["params/llm/embedder/input_embedding"].read()
    np.testing.assert_array_equal(embedding.view(np.uint16), np.asarray(want).view(np.uint16))


def test_convert_refuses_to_overwrite_and_keeps_the_old_preset(fixtures_dir, tmp_path, capsys):
    destination = tmp_path / "preset"
    destination.mkdir()
    (destination / "precious.txt").write_text("mine")
    source = str(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
    assert main(["convert", source, str(destination)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (destination / "precious.txt").read_text() == "mine"
    # A failing conversion with --overwrite leaves the old directory alone.
    assert main(["convert", str(tmp_path / "missing.npz"), str(destination), "--overwrite"]) == 2
    assert (destination / "precious.txt").exists()
    assert main(["convert", source, str(destination), "--overwrite"]) == 0
    assert not (destination / "precious.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".preset.")]


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_paligemma2", "convert", "pg2_3b_22", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: Unknown preset 'pg2_3b_22'" in result.stderr
    assert "Did you mean 'pg2_3b_224'" in result.stderr
    assert not (tmp_path / "x").exists()

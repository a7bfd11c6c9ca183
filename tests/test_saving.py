"""Presets are written to a staging directory and swapped in only when complete."""

import pytest

from keras_paligemma2.saving import atomic_directory


def test_failure_keeps_the_old_directory_and_cleans_up(tmp_path):
    target = tmp_path / "preset"
    target.mkdir()
    (target / "model.weights.h5").write_text("old weights")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (tmp_path / staging / "model.weights.h5").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "model.weights.h5").read_text() == "old weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]


def test_success_replaces_the_directory(tmp_path):
    target = tmp_path / "preset"
    target.mkdir()
    (target / "stale.txt").write_text("x")
    with atomic_directory(target) as staging:
        (tmp_path / staging / "config.json").write_text("{}")
    assert sorted(p.name for p in target.iterdir()) == ["config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preset"]

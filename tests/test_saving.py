"""Presets are written to a staging directory and swapped in only when complete."""

import pytest

from keras_paligemma2.utils.files import atomic_directory


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


def test_written_files_and_directories_get_the_usual_permissions(tmp_path):
    import os

    from keras_paligemma2.utils.files import atomic_file

    old = os.umask(0o022)
    try:
        with atomic_directory(tmp_path / "preset") as staging:
            with atomic_file(os.path.join(staging, "accuracy.json"), "w") as f:
                f.write("{}")
    finally:
        os.umask(old)
    # Not mkstemp's 0600 / mkdtemp's 0700: others can read a saved preset.
    assert (tmp_path / "preset").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "preset" / "accuracy.json").stat().st_mode & 0o777 == 0o644

"""How checkpoints are loaded: no initializers, nothing left pending, sharded placement."""

import jax
import keras
import numpy as np
import pytest
from helpers import assert_close
from helpers import bv_tiny_text_logits
from keras.src.backend.common import global_state

from keras_paligemma2 import CheckpointError
from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM


def _pending():
    """Ids of the variables on Keras' list to initialise (other tests' leftovers
    included: each test compares what its own load changed)."""
    return [id(v) for v in global_state.get_global_attribute("uninitialized_variables") or []]


@pytest.fixture
def bv_f32(fixtures_dir):
    return fixtures_dir / "bv_tiny" / "tiny_f32.npz"


def test_load_leaves_nothing_to_initialize(bv_f32):
    before = _pending()
    backbone = PaliGemma2Backbone.from_preset(bv_f32)
    assert _pending() == before
    assert all(v._value is not None for v in backbone.variables)
    with keras.StatelessScope():  # Its exit initializes pending variables.
        pass


def test_failed_load_leaves_nothing_pending(bv_f32):
    before = _pending()
    with pytest.raises(CheckpointError):
        PaliGemma2Backbone.from_preset(bv_f32, intermediate_dim=96)
    assert _pending() == before


def test_initializers_never_compute_values(bv_f32, monkeypatch):
    # Keras traces the layers symbolically (under jax.eval_shape), where an
    # uninitialized variable's initializer gives an abstract placeholder;
    # no initializer may ever produce a concrete array while loading.
    concrete = []
    for name in ("GlorotUniform", "VarianceScaling", "RandomNormal", "Zeros", "Ones"):
        cls = getattr(keras.initializers, name)

        def traced_only(self, *args, _original=cls.__call__, **kwargs):
            out = _original(self, *args, **kwargs)
            if not isinstance(out, jax.core.Tracer):
                concrete.append(type(self).__name__)
            return out

        monkeypatch.setattr(cls, "__call__", traced_only)
    PaliGemma2Backbone.from_preset(bv_f32)
    assert concrete == []


def test_load_under_model_parallel_places_shards(fixtures_dir, bv_f32):
    devices = jax.devices()
    assert len(devices) == 8, "tests run with 8 simulated CPU devices"
    reference = np.load(fixtures_dir / "bv_tiny" / "reference_outputs.npz")
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), devices)
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map["decoder_block_.*/mlp/(gate|up)/kernel"] = (None, "model")
    layout_map["decoder_block_.*/mlp/down/kernel"] = ("model", None)
    distribution = keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")
    with distribution.scope():
        lm = PaliGemma2CausalLM.from_preset(bv_f32)
    embedding = lm.backbone.token_embedding.embeddings.value
    assert len(embedding.sharding.device_set) == 8
    assert embedding.addressable_shards[0].data.shape == (1200 // 4, 48)
    gate = lm.backbone.decoder_blocks[0].mlp.gate.kernel.value
    assert gate.addressable_shards[0].data.shape == (48, 80 // 4)
    logits = bv_tiny_text_logits(lm, reference)
    # bv_tiny (2-layer ViT + 2-layer Gemma) in float32, sharded, against
    # big_vision's run: two programs summing in other orders (measured 16
    # ulps of the largest logit, ~17).
    assert_close(logits, reference["text_logits"], ulps=64)


def _direct_io_supported(directory):
    import os

    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return True
    except OSError:
        return False


def _count_direct_reads(monkeypatch):
    """Lets `_FileReader._read_direct` run, noting each call in the list returned."""
    from keras_paligemma2.checkpoints import assignment

    calls = []
    real = assignment._FileReader._read_direct
    monkeypatch.setattr(
        assignment._FileReader, "_read_direct", lambda self, *a: calls.append(a) or real(self, *a)
    )
    return calls


def test_direct_reads_give_the_file_bytes_at_any_offset(tmp_path, monkeypatch):
    from keras_paligemma2.checkpoints import assignment

    if not _direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(assignment, "_DIRECT_MIN_BYTES", 1024)
    data = np.random.default_rng(0).integers(0, 256, 3 * 65536 + 123, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())
    reader = assignment._FileReader()
    try:
        assert reader.reads_directly(str(path), 4096)
        assert not reader.reads_directly(str(path), 1000)  # small: through the cache
        for offset, count in [
            (0, 4096),
            (1, 5000),
            (4095, 70001),
            (4096, 8192),
            (12345, 2 * 65536),
            (len(data) - 3001, 3001),
        ]:
            got = reader.read_array(str(path), offset, np.uint8, (count,))
            np.testing.assert_array_equal(got, data[offset : offset + count])
            assert got.ctypes.data % 64 == 0  # jax.device_put adopts it without a copy
        with pytest.raises(OSError, match="ended while reading"):
            reader.read_array(str(path), len(data) - 2000, np.uint8, (4000,))
    finally:
        reader.close()


def test_refused_direct_reads_fall_back_to_the_page_cache(tmp_path, monkeypatch):
    import errno
    import os

    from keras_paligemma2.checkpoints import assignment

    if not _direct_io_supported(tmp_path):
        pytest.skip("this file system refuses O_DIRECT")
    monkeypatch.setattr(assignment, "_DIRECT_MIN_BYTES", 1024)
    data = np.arange(20000, dtype=np.uint8)
    path = tmp_path / "blob"
    path.write_bytes(data.tobytes())
    real_preadv = os.preadv
    direct = set()

    def preadv(descriptor, buffers, offset):
        if descriptor in direct:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_preadv(descriptor, buffers, offset)

    monkeypatch.setattr(assignment.os, "preadv", preadv)
    reader = assignment._FileReader()
    try:
        direct.add(reader._direct_descriptor(str(path)))
        got = reader.read_array(str(path), 7, np.uint8, (9000,))
        np.testing.assert_array_equal(got, data[7:9007])
        assert not reader.reads_directly(str(path), 9000)  # this file: cached reads from now on
    finally:
        reader.close()


def test_direct_and_cached_reads_load_the_same_model(bv_f32, monkeypatch, tmp_path):
    import shutil

    from keras_paligemma2.checkpoints import assignment

    local = tmp_path / bv_f32.name  # the fixture's file system may refuse O_DIRECT
    shutil.copy(bv_f32, local)
    monkeypatch.setattr(assignment, "_DIRECT_MIN_BYTES", 1 << 62)
    cached = PaliGemma2Backbone.from_preset(local)
    monkeypatch.setattr(assignment, "_DIRECT_MIN_BYTES", 1)
    calls = _count_direct_reads(monkeypatch)
    direct = PaliGemma2Backbone.from_preset(local)
    if _direct_io_supported(tmp_path):
        assert len(calls) > 10
    for a, b in zip(cached.variables, direct.variables):
        assert a.path == b.path
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=a.path)


def test_direct_reads_under_a_distribution_place_the_same_values(bv_f32, monkeypatch, tmp_path):
    import shutil

    from keras_paligemma2.checkpoints import assignment

    local = tmp_path / bv_f32.name
    shutil.copy(bv_f32, local)
    plain = PaliGemma2Backbone.from_preset(local)
    monkeypatch.setattr(assignment, "_DIRECT_MIN_BYTES", 1)
    calls = _count_direct_reads(monkeypatch)
    mesh = keras.distribution.DeviceMesh((2, 4), ("batch", "model"), jax.devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map["decoder_block_.*/attention/query/kernel"] = ("model", None, None)
    with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
        sharded = PaliGemma2Backbone.from_preset(local)
    if _direct_io_supported(tmp_path):
        assert len(calls) > 10
    assert len(sharded.token_embedding.embeddings.value.sharding.device_set) == 8
    for a, b in zip(plain.variables, sharded.variables):
        np.testing.assert_array_equal(np.asarray(a.value), np.asarray(b.value), err_msg=a.path)

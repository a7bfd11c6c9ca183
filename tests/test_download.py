"""Registered names download from the Hub: the network is replaced at its
boundary (`huggingface_hub.hf_hub_download` / `snapshot_download`) by a local
directory laid out as the real repositories are; the rest runs for real."""

import os
import shutil

import httpx2
import huggingface_hub
import huggingface_hub.constants  # A submodule: not an attribute until imported.
import numpy as np
import pytest
from helpers import bv_tiny_text_logits
from huggingface_hub import errors as hub_errors

from keras_paligemma2 import PaliGemma2Backbone
from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.checkpoints import big_vision
from keras_paligemma2.checkpoints import download
from keras_paligemma2.checkpoints import hf
from keras_paligemma2.checkpoints import presets
from keras_paligemma2.preprocessing.tokenizer import train_tiny_sentencepiece
from keras_paligemma2.utils.tensor_files import read_npz_lazily

STEM = "paligemma2-tiny-pt-42"


def _http_error(cls, status):
    request = httpx2.Request("GET", "https://huggingface.co/google/x")
    return cls("refused", response=httpx2.Response(status, request=request))


@pytest.fixture
def fake_hub(tmp_path, fixtures_dir, monkeypatch):
    """google/<stem>-jax with the .b16.npz, google/<stem> with HF files."""
    root = tmp_path / "hub"
    jax_repo = root / "google" / f"{STEM}-jax"
    jax_repo.mkdir(parents=True)
    shutil.copy(fixtures_dir / "bv_tiny" / "tiny.b16.npz", jax_repo / f"{STEM}.b16.npz")
    hf_repo = root / "google" / STEM
    shutil.copytree(fixtures_dir / "hf_tiny", hf_repo)
    (hf_repo / "reference_outputs.npz").unlink()
    (hf_repo / "tokenizer.model").write_bytes(train_tiny_sentencepiece(["caption en", "a cat"]))
    calls = []

    def hf_hub_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename))
        path = root / repo_id / filename
        if not path.exists():
            raise _http_error(hub_errors.RemoteEntryNotFoundError, 404)
        return str(path)

    def snapshot_download(repo_id, allow_patterns=None, revision=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns)))
        if not (root / repo_id).is_dir():
            raise _http_error(hub_errors.RepositoryNotFoundError, 404)
        return str(root / repo_id)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)

    bv_config = big_vision.infer_config(
        big_vision.strip_prefix(read_npz_lazily(jax_repo / f"{STEM}.b16.npz")), "x"
    )
    monkeypatch.setitem(
        presets.PRESETS,
        "pg2_tiny_42",
        {
            "description": "test",
            "config": bv_config,
            "sources": {
                "big_vision": {"repo_id": f"google/{STEM}-jax", "filename": f"{STEM}.b16.npz"},
                "transformers": {"repo_id": f"google/{STEM}"},
                "tokenizer": {"repo_id": f"google/{STEM}", "filename": "tokenizer.model"},
                "keras_hub": "kaggle://keras/none/keras/none/1",
            },
        },
    )
    return root, calls


def test_registered_name_downloads_big_vision_and_runs(fake_hub, fixtures_dir):
    _, calls = fake_hub
    lm = PaliGemma2CausalLM.from_preset("pg2_tiny_42")
    assert calls == [
        (f"google/{STEM}-jax", f"{STEM}.b16.npz"),
        (f"google/{STEM}", "tokenizer.model"),  # From the matching HF repository.
    ]
    assert lm.preprocessor.tokenizer.location_token_start > 0
    assert lm.preprocessor.image_converter.side == 42
    reference = np.load(fixtures_dir / "bv_tiny" / "reference_outputs.npz")
    logits = bv_tiny_text_logits(lm, reference)
    assert np.abs(np.asarray(logits) - reference["text_logits_b16_params"]).max() < 0.1
    assert lm.backbone.final_logit_soft_cap is None  # big_vision semantics.


def test_transformers_source(fake_hub, fixtures_dir, monkeypatch):
    root, calls = fake_hub
    # The HF fixture's architecture differs from the bv one: register it.
    with open(root / "google" / STEM / "config.json") as f:
        import json

        config = hf.infer_config(json.load(f), "x")
    monkeypatch.setitem(presets.PRESETS["pg2_tiny_42"], "config", config)
    backbone = PaliGemma2Backbone.from_preset("pg2_tiny_42", source="transformers")
    assert calls[-1][0] == f"google/{STEM}"
    assert "*.safetensors" in calls[-1][1]
    assert backbone.sliding_window_size == 20  # HF semantics from config.json.


def test_download_that_is_not_the_preset_is_refused(fake_hub, monkeypatch):
    config = dict(presets.PRESETS["pg2_tiny_42"]["config"], num_layers=3)
    monkeypatch.setitem(presets.PRESETS["pg2_tiny_42"], "config", config)
    with pytest.raises(
        download.CheckpointError,
        match="does not match preset 'pg2_tiny_42': num_layers 2 \\(preset: 3\\)",
    ):
        PaliGemma2Backbone.from_preset("pg2_tiny_42")


def test_gated_repository_says_accept_licence_and_never_shows_the_token(fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_123")

    def gated(**kwargs):
        raise _http_error(hub_errors.GatedRepoError, 403)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", gated)
    with pytest.raises(download.DownloadError) as error:
        PaliGemma2Backbone.from_preset("pg2_tiny_42")
    message = str(error.value)
    assert "accept the Gemma licence on https://huggingface.co/google/" in message
    assert "HF_TOKEN" in message and "hf auth login" in message
    assert "hf_secret_value_123" not in message


def test_interrupted_download_says_run_again(fake_hub, monkeypatch):
    def cut(**kwargs):
        raise ConnectionResetError("connection reset by peer")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cut)
    with pytest.raises(download.DownloadError, match="Run the same call again"):
        PaliGemma2Backbone.from_preset("pg2_tiny_42")


def test_missing_file(fake_hub):
    root, _ = fake_hub
    os.remove(root / "google" / f"{STEM}-jax" / f"{STEM}.b16.npz")
    with pytest.raises(download.DownloadError, match=f"has no file {STEM}.b16.npz"):
        PaliGemma2Backbone.from_preset("pg2_tiny_42")


def test_offline_with_the_real_client_names_the_file(tmp_path, monkeypatch):
    # The real huggingface_hub, offline, with an empty cache: no network use.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(download.DownloadError) as error:
        download.download_file("google/paligemma2-3b-pt-224-jax", "paligemma2-3b-pt-224.b16.npz")
    message = str(error.value)
    assert "no network" in message
    assert "hf download google/paligemma2-3b-pt-224-jax paligemma2-3b-pt-224.b16.npz" in message


def test_without_network_a_registered_name_fails_at_once(tmp_path, monkeypatch):
    # No HF_HUB_OFFLINE: the network is just not there (the TCP connect, the
    # boundary, refuses). The real client then reads the cache only, instead
    # of retrying with backoff for half a minute.
    def refuse(address, timeout=None, **kwargs):
        raise ConnectionRefusedError(f"no route to {address}")

    monkeypatch.setattr(download.socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    sent = []
    real = huggingface_hub.hf_hub_download

    def recorded(*args, **kwargs):
        sent.append(kwargs.get("local_files_only"))
        return real(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorded)
    with pytest.raises(download.DownloadError, match="no network"):
        download.download_file("google/paligemma2-3b-pt-224-jax", "paligemma2-3b-pt-224.b16.npz")
    assert sent == [True]


def test_with_network_downloads_are_not_limited_to_the_cache(fake_hub, monkeypatch):
    class Connection:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(download.socket, "create_connection", lambda *a, **k: Connection())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    sent = []
    fake = huggingface_hub.hf_hub_download

    def recorded(*args, **kwargs):
        sent.append(kwargs.get("local_files_only"))
        return fake(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorded)
    download.download_file(f"google/{STEM}", "config.json")
    assert sent == [False]

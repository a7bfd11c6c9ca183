"""Where `from_preset` goes: registered names, checkpoint files and directories.

One module per foreign format (`big_vision.py`, `hf.py`), each a table from
its tensor names to our variable paths; `assignment.py` checks a table
against the file and assigns it.
"""

import inspect
import json
import os
import zipfile

import keras
import keras_hub

from keras_paligemma2.checkpoints import big_vision
from keras_paligemma2.checkpoints import download
from keras_paligemma2.checkpoints import hf
from keras_paligemma2.checkpoints import keras_hub_preset
from keras_paligemma2.checkpoints import presets
from keras_paligemma2.checkpoints.assignment import load_model
from keras_paligemma2.layers.projections import check_quantization
from keras_paligemma2.preprocessing.image_converter import PaliGemma2ImageConverter
from keras_paligemma2.preprocessing.preprocessor import PaliGemma2CausalLMPreprocessor
from keras_paligemma2.preprocessing.tokenizer import PaliGemma2Tokenizer
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import forget_pending_initialization
from keras_paligemma2.utils.keras_internals import has_value
from keras_paligemma2.utils.keras_internals import initialize_layout
from keras_paligemma2.utils.keras_internals import keras_hub_backbone_from_preset
from keras_paligemma2.utils.keras_internals import load_preset_preprocessor
from keras_paligemma2.utils.keras_internals import load_preset_weights
from keras_paligemma2.utils.keras_internals import preset_file
from keras_paligemma2.utils.keras_internals import preset_file_exists
from keras_paligemma2.utils.keras_internals import read_preset_config
from keras_paligemma2.utils.tensor_files import CheckpointError
from keras_paligemma2.utils.tensor_files import read_npz_lazily


def load_backbone(
    cls,
    preset,
    load_weights=True,
    source=None,
    quantization=None,
    quantize_vision=False,
    **overrides,
):
    """`PaliGemma2Backbone.from_preset`: see its docstring.

    Args:
        cls: the class to build (`PaliGemma2Backbone` or a subclass).
        preset: str or path-like, a preset name, checkpoint file, directory or
            `kaggle://` handle.
        load_weights: bool; False builds the architecture only.
        source: None, "big_vision", "transformers" or "keras_hub"; for
            registered names only.
        quantization: None, "int8" or "int4": each projection kernel
            quantised as it is read (see `assignment.load_model`).
        quantize_vision: bool; the ViT's and image projection's kernels too.
        **overrides: constructor arguments replacing the checkpoint's config.
    """
    check_quantization(quantization)
    preset = _embedded(os.fspath(preset), source)
    _check_overrides(cls, overrides)
    if not load_weights:
        backbone = _load_backbone(cls, preset, False, source, overrides, {})
        if quantization is not None:
            backbone.quantize(quantization, quantize_vision=quantize_vision)
        return backbone
    quantize = {"quantization": quantization, "quantize_vision": quantize_vision}
    return _load_backbone(cls, preset, True, source, overrides, quantize)


def _load_backbone(cls, preset, load_weights, source, overrides, quantize):
    if preset in presets.PRESETS:
        return _load_registered(cls, preset, load_weights, source, overrides, quantize)
    if source is not None:
        raise InputError(f"`source` applies to registered preset names only, not {preset!r}.")
    if os.path.isfile(preset):
        if not zipfile.is_zipfile(preset):
            with open(preset, "rb") as f:
                if f.read(4) == b"PK\x03\x04":
                    raise CheckpointError(
                        f"{preset!r} starts like an .npz (zip) file but its "
                        "directory is missing: the file is truncated or "
                        "corrupt. Download it again."
                    )
            raise CheckpointError(
                f"{preset!r} is not a big_vision checkpoint (an .npz zip of "
                ".npy arrays). Supported: a big_vision .npz file, an HF "
                "transformers directory (config.json + *.safetensors) or a "
                "directory written by save_to_preset."
            )
        tensors = big_vision.strip_prefix(read_npz_lazily(preset))
        config = {**big_vision.infer_config(tensors, preset), **overrides}
        return _build_and_assign(
            cls, config, big_vision.rules, tensors, preset, load_weights, quantize=quantize
        )
    if os.path.isdir(preset):
        if hf.is_hf_directory(preset):
            with open(os.path.join(preset, "config.json")) as f:
                hf_config = json.load(f)
            config = {**hf.infer_config(hf_config, preset), **overrides}
            tensors = hf.read_tensors(preset) if load_weights else {}
            return _build_and_assign(
                cls, config, hf.rules, tensors, preset, load_weights, hf.TIED_OUTPUT, quantize
            )
        if _is_keras_preset(preset):
            return _load_keras_preset(cls, preset, load_weights, overrides, quantize)
        raise CheckpointError(
            f"{preset!r} is a directory but neither an HF transformers "
            "PaliGemma checkpoint (config.json with model_type 'paligemma' "
            "and *.safetensors) nor a Keras preset written by save_to_preset "
            "(config.json + metadata.json)."
        )
    if "://" in preset:
        return _load_keras_preset(cls, preset, load_weights, overrides, quantize)
    raise InputError(presets.unknown_preset_message(preset))


def _embedded(name, source):
    """A shipped preset's name to its directory; anything else unchanged."""
    if name not in presets.EMBEDDED:
        return name
    if source is not None:
        raise InputError(f"{name!r} ships with the package; it takes no `source`.")
    directory = presets.embedded_preset_dir(name)
    if directory is None:
        raise CheckpointError(
            f"The shipped preset {name!r} is missing from this installation "
            "(keras_paligemma2/embedded_presets/). Reinstall keras-paligemma2, or "
            "train it with examples/train_tiny_shapes.py --export "
            "keras_paligemma2/embedded_presets/" + name + "."
        )
    return directory


def _keras_preset_class(preset):
    """The registered class name in a Keras preset's config.json."""
    # keras-hub's own file access: local directories, kaggle://, hf://, gs://.

    return read_preset_config(preset).get("class_name")


def _keep_saved_dtype(preset, overrides):
    """keras-hub loads presets in the default float type; we keep the saved
    one (a bfloat16 preset stays bfloat16) unless `dtype` is overridden."""

    saved = read_preset_config(preset)["config"].get("dtype")
    if "dtype" in overrides or saved is None:
        return overrides
    return {**overrides, "dtype": keras.dtype_policies.deserialize(saved)}


def _load_keras_preset(cls, preset, load_weights, overrides, quantize):
    class_name = _keras_preset_class(preset)
    if class_name == cls.__name__:
        overrides = _keep_saved_dtype(preset, overrides)
        if not load_weights:
            return keras_hub_backbone_from_preset(cls, preset, load_weights=False, **overrides)
        with keras.StatelessScope(initialize_variables=False):
            model = keras_hub_backbone_from_preset(cls, preset, load_weights=False, **overrides)
        model = _fill_from_keras_preset(model, preset)
        if quantize.get("quantization"):
            # Keras' own weight files load whole (its loader, not ours):
            # quantised after loading, so the float model is held once.
            model.quantize(quantize["quantization"], quantize_vision=quantize["quantize_vision"])
        return model
    if class_name != "PaliGemmaBackbone":
        raise CheckpointError(
            f"{preset!r} holds a keras-hub {class_name}, not a PaliGemma backbone."
        )

    # The config is keras-hub's `get_config()` as saved: no need to build
    # keras-hub's model to read it.
    config = {
        **keras_hub_preset.infer_config(read_preset_config(preset)["config"], preset),
        **overrides,
    }
    if not load_weights:
        return cls(**config)
    # keras-hub's model, filled from its file without random initialization,
    # in the file's dtype (keras-hub would widen bfloat16 to float32: twice
    # the memory); each of its tensors is released once converted into ours,
    # so that the host holds about one model, not two.
    with keras.StatelessScope(initialize_variables=False):
        source = keras_hub.models.PaliGemmaBackbone.from_preset(
            preset, load_weights=False, **_keep_saved_dtype(preset, {})
        )
    _fill_from_keras_preset(source, preset)
    tensors = keras_hub_preset.read_tensors(source, keras_hub_preset.rules(config))
    return _build_and_assign(
        cls, config, keras_hub_preset.rules, tensors, preset, load_weights, quantize=quantize
    )


def _fill_from_keras_preset(model, preset):
    """Fills `model`, built in a `StatelessScope(initialize_variables=False)`,
    from the Keras preset directory that describes it (written by our
    `save_to_preset`, or keras-hub's); returns it.

    keras-hub would build the model with random weights, then load the file
    over them: the random initialization alone peaks at twice the model's
    size (measured: 7.3 GiB for a 3.4 GiB model). Here the variables hold
    nothing until Keras' own weight loader assigns each its value from the
    file, one tensor at a time (into its shards under a distribution).
    """

    try:
        for variable in model.variables:
            # What Keras' first-value path does: under a distribution, the
            # assignment then places each value straight into its shards.
            initialize_layout(variable)
        load_preset_weights(model, preset)
        empty = [v.path for v in model.variables if not has_value(v)]
        if empty:
            raise CheckpointError(
                f"Preset {preset!r} has no values for {len(empty)} variables: {', '.join(empty)}."
            )
    finally:
        forget_pending_initialization(model.variables)
    return model


def _load_registered(cls, name, load_weights, source, overrides, quantize):
    """A registered name: the architecture, or the released weights."""
    entry = presets.PRESETS[name]
    if not load_weights:
        return cls(**{**entry["config"], **overrides})
    source = source or "big_vision"
    if source not in presets.SOURCES:
        raise InputError(
            f"Unknown source {source!r} for {name!r}; choose one of "
            f"{list(presets.SOURCES)} (default 'big_vision')."
        )
    sources = entry["sources"]
    if source == "keras_hub":
        return _load_keras_preset(cls, sources["keras_hub"], True, overrides, quantize)
    if source == "transformers":
        repo = sources["transformers"]["repo_id"]
        directory = download.download_repository(
            repo,
            ["config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.model"],
        )
        with open(os.path.join(directory, "config.json")) as f:
            config = hf.infer_config(json.load(f), repo)
        _check_matches_preset(config, entry["config"], repo, name)
        tensors = hf.read_tensors(directory)
        return load_model(
            cls, {**config, **overrides}, hf.rules, tensors, repo, hf.TIED_OUTPUT, **quantize
        )
    path = download.download_file(**sources["big_vision"])
    tensors = big_vision.strip_prefix(read_npz_lazily(path))
    config = big_vision.infer_config(tensors, path)
    _check_matches_preset(config, entry["config"], path, name)
    return load_model(cls, {**config, **overrides}, big_vision.rules, tensors, path, **quantize)


def _check_matches_preset(config, expected, source_name, preset):
    differences = [
        f"{k} {config[k]} (preset: {expected[k]})"
        for k in presets.SHAPE_FIELDS
        if config.get(k) != expected.get(k)
    ]
    if config.get("vocabulary_size", 0) < expected["vocabulary_size"]:
        differences.append(
            f"vocabulary_size {config.get('vocabulary_size')} (preset: "
            f"{expected['vocabulary_size']})"
        )
    if differences:
        raise CheckpointError(
            f"{source_name!r} does not match preset {preset!r}: "
            f"{'; '.join(differences)}. The download may be of another model; "
            "delete it from the cache and try again."
        )


def load_task(cls, preset, load_weights=True, source=None, **overrides):
    """`PaliGemma2CausalLM.from_preset`: see its docstring.

    Args:
        cls: the task class to build (`PaliGemma2CausalLM` or a subclass).
        preset: str or path-like, as `load_backbone` takes.
        load_weights: bool; False builds the architecture only.
        source: None, "big_vision", "transformers" or "keras_hub"; for
            registered names only.
        **overrides: backbone constructor arguments replacing the checkpoint's
            config, `quantization` and `quantize_vision` (as `load_backbone`
            takes them), and `preprocessor` (a preprocessor, or None)
            replacing the one the checkpoint brings, as keras-hub's
            `from_preset` takes it.
    """
    given = {"preprocessor": overrides.pop("preprocessor")} if "preprocessor" in overrides else {}
    path = _embedded(os.fspath(preset), source)
    keras_preset = os.path.isdir(path) and _is_keras_preset(path) or "://" in path
    if keras_preset and _keras_preset_class(path) == cls.backbone_cls.__name__:
        if given:
            preprocessor = given["preprocessor"]
        elif preset_file_exists(path, "tokenizer.json"):
            preprocessor = load_preset_preprocessor(path, cls.preprocessor_cls)
        else:
            preprocessor = None  # Saved without one.
        backbone = load_backbone(cls.backbone_cls, path, load_weights, source, **overrides)
        return cls(backbone=backbone, preprocessor=preprocessor)
    backbone = load_backbone(cls.backbone_cls, path, load_weights, source, **overrides)
    if given:
        return cls(backbone=backbone, preprocessor=given["preprocessor"])
    tokenizer = _find_tokenizer(path, source)
    preprocessor = None
    if tokenizer is not None:
        preprocessor = PaliGemma2CausalLMPreprocessor(
            tokenizer, PaliGemma2ImageConverter(backbone.image_size)
        )
    return cls(backbone=backbone, preprocessor=preprocessor)


def _find_tokenizer(path, source):
    """The SentencePiece model that comes with a checkpoint, or None.

    Registered names: `tokenizer.model` of the matching HF repository (the
    JAX repositories carry none). HF directories: their `tokenizer.model`.
    keras-hub presets: `assets/tokenizer/vocabulary.spm`. A big_vision
    `.npz` carries no tokenizer.
    """
    if path in presets.PRESETS:
        entry = presets.PRESETS[path]["sources"]
        if (source or "big_vision") == "keras_hub":
            return _find_tokenizer(entry["keras_hub"], None)
        return PaliGemma2Tokenizer(download.download_file(**entry["tokenizer"]))
    if "://" in path:
        vocabulary = "assets/tokenizer/vocabulary.spm"
        if preset_file_exists(path, vocabulary):
            return PaliGemma2Tokenizer(preset_file(path, vocabulary))
        return None
    for candidate in ("tokenizer.model", os.path.join("assets", "tokenizer", "vocabulary.spm")):
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, candidate)):
            return PaliGemma2Tokenizer(os.path.join(path, candidate))
    return None


def _build_and_assign(
    cls, config, rules_for, tensors, source, load_weights, ignored=(), quantize=None
):
    if not load_weights:
        return cls(**config)
    return load_model(cls, config, rules_for, tensors, source, ignored, **(quantize or {}))


def _check_overrides(cls, overrides):
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "kwargs"}
    accepted |= {"name", "trainable"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise InputError(
            f"Unknown config overrides {unknown} for {cls.__name__}. Accepted: {sorted(accepted)}."
        )


def _is_keras_preset(path):
    return os.path.isfile(os.path.join(path, "config.json")) and os.path.isfile(
        os.path.join(path, "metadata.json")
    )

"""keras-paligemma2: PaliGemma 2 in Keras 3 on JAX, faithful to big_vision.

Runs on the JAX backend only (the attention path uses JAX directly). Set
`KERAS_BACKEND=jax` before importing Keras; under another backend, importing
this package raises an ImportError saying so.

The public names: the model classes, their losses and optimizer, and the
modules `distribution`, `training`, `lora`, `presets`, `evaluation` and
`shapes` (each lives in its layer's subpackage; see ARCHITECTURE.md).

`import keras_paligemma2` imports them all (so Keras finds the registered
classes when loading saved models), except while the command line starts
(`python -m keras_paligemma2`, the `keras-paligemma2` script): then each
is imported when first used, and `--help` answers without loading Keras.
"""

import importlib
import os
import sys
import warnings

os.environ.setdefault("KERAS_BACKEND", "jax")
# keras-hub imports kagglehub, which imports `tqdm.auto`: in a notebook without
# ipywidgets that warns "IProgress not found" although nothing here draws a
# widget. Only that message is silenced.
warnings.filterwarnings("ignore", message="IProgress not found", module="tqdm")

# Each public name: (the module defining it, its name there); None for a
# module re-exported whole.
_EXPORTS = {
    "CheckpointError": ("keras_paligemma2.utils.tensor_files", "CheckpointError"),
    "InputError": ("keras_paligemma2.utils.errors", "InputError"),
    "MaskDecoder": ("keras_paligemma2.layers.vq_vae", "MaskDecoder"),
    "PaliGemma2Backbone": ("keras_paligemma2.models.backbone", "PaliGemma2Backbone"),
    "PaliGemma2CausalLM": ("keras_paligemma2.models.causal_lm", "PaliGemma2CausalLM"),
    "PaliGemma2CausalLMPreprocessor": (
        "keras_paligemma2.preprocessing.preprocessor",
        "PaliGemma2CausalLMPreprocessor",
    ),
    "PaliGemma2ImageConverter": (
        "keras_paligemma2.preprocessing.image_converter",
        "PaliGemma2ImageConverter",
    ),
    "PaliGemma2Tokenizer": ("keras_paligemma2.preprocessing.tokenizer", "PaliGemma2Tokenizer"),
    "ResponseAccuracy": ("keras_paligemma2.training.losses", "ResponseAccuracy"),
    "ResponseCrossEntropy": ("keras_paligemma2.training.losses", "ResponseCrossEntropy"),
    "TrainingCheckpoint": ("keras_paligemma2.training.callbacks", "TrainingCheckpoint"),
    "attention_implementation": (
        "keras_paligemma2.layers.attention",
        "attention_implementation",
    ),
    "big_vision_optimizer": ("keras_paligemma2.training.optimizers", "big_vision_optimizer"),
    "distribution": ("keras_paligemma2.distribution", None),
    "evaluation": ("keras_paligemma2.apps.evaluation", None),
    "list_presets": ("keras_paligemma2.checkpoints.presets", "list_presets"),
    "lora": ("keras_paligemma2.training.lora", None),
    "parse_detections": ("keras_paligemma2.models.task_outputs", "parse_detections"),
    "presets": ("keras_paligemma2.checkpoints.presets", None),
    "set_attention_implementation": (
        "keras_paligemma2.layers.attention",
        "set_attention_implementation",
    ),
    "shapes": ("keras_paligemma2.apps.shapes", None),
    "training": ("keras_paligemma2.training", None),
}

__version__ = "0.1.0"

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'keras_paligemma2' has no attribute {name!r}")
    from keras_paligemma2.utils.backend import require_jax

    require_jax()
    module, attribute = _EXPORTS[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


def _starting_the_command_line():
    """True while `python -m keras_paligemma2` starts (argv[0] is "-m" while
    the package is located, as Python documents) or the console script."""
    return sys.argv[:1] == ["-m"] or os.path.basename(sys.argv[0]) == "keras-paligemma2"


if not _starting_the_command_line():
    for _name in _EXPORTS:
        __getattr__(_name)

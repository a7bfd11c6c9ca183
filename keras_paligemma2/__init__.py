"""keras-paligemma2: PaliGemma 2 in Keras 3 on JAX, faithful to big_vision.

Runs on the JAX backend only (the attention path uses JAX directly). Set
`KERAS_BACKEND=jax` before importing Keras; under another backend, importing
this package raises an ImportError saying so.

The public names: the model classes, their losses and optimizer, and the
modules `distribution`, `training`, `lora`, `presets`, `evaluation` and
`shapes` (each lives in its layer's subpackage; see ARCHITECTURE.md).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402

if keras.config.backend() != "jax":
    raise ImportError(
        "keras_paligemma2 runs on the JAX backend only, but Keras is using "
        f"the {keras.config.backend()!r} backend. Set the environment variable "
        "KERAS_BACKEND=jax before Keras is first imported (or in "
        "~/.keras/keras.json), then restart Python."
    )

from keras_paligemma2 import distribution  # noqa: E402
from keras_paligemma2 import training  # noqa: E402
from keras_paligemma2.apps import evaluation  # noqa: E402
from keras_paligemma2.apps import shapes  # noqa: E402
from keras_paligemma2.checkpoints import presets  # noqa: E402
from keras_paligemma2.checkpoints.presets import list_presets  # noqa: E402
from keras_paligemma2.layers.attention import attention_implementation  # noqa: E402
from keras_paligemma2.layers.attention import set_attention_implementation  # noqa: E402
from keras_paligemma2.layers.vq_vae import MaskDecoder  # noqa: E402
from keras_paligemma2.models.backbone import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2.models.causal_lm import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.models.task_outputs import parse_detections  # noqa: E402
from keras_paligemma2.preprocessing.image_converter import PaliGemma2ImageConverter  # noqa: E402
from keras_paligemma2.preprocessing.preprocessor import PaliGemma2CausalLMPreprocessor  # noqa: E402
from keras_paligemma2.preprocessing.tokenizer import PaliGemma2Tokenizer  # noqa: E402
from keras_paligemma2.training import lora  # noqa: E402
from keras_paligemma2.training.callbacks import TrainingCheckpoint  # noqa: E402
from keras_paligemma2.training.losses import ResponseAccuracy  # noqa: E402
from keras_paligemma2.training.losses import ResponseCrossEntropy  # noqa: E402
from keras_paligemma2.training.optimizers import big_vision_optimizer  # noqa: E402
from keras_paligemma2.utils.tensor_files import CheckpointError  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "PaliGemma2Backbone",
    "PaliGemma2CausalLM",
    "PaliGemma2CausalLMPreprocessor",
    "PaliGemma2ImageConverter",
    "PaliGemma2Tokenizer",
    "MaskDecoder",
    "ResponseAccuracy",
    "ResponseCrossEntropy",
    "TrainingCheckpoint",
    "attention_implementation",
    "big_vision_optimizer",
    "distribution",
    "evaluation",
    "list_presets",
    "lora",
    "parse_detections",
    "presets",
    "set_attention_implementation",
    "shapes",
    "training",
]

"""keras-paligemma2: PaliGemma 2 in Keras 3 on JAX, faithful to big_vision.

Runs on the JAX backend only (the attention path uses JAX directly). Set
`KERAS_BACKEND=jax` before importing Keras; under another backend, importing
this package raises an ImportError saying so.
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

from keras_paligemma2.attention import attention_implementation  # noqa: E402
from keras_paligemma2.attention import set_attention_implementation  # noqa: E402
from keras_paligemma2.backbone import PaliGemma2Backbone  # noqa: E402
from keras_paligemma2.causal_lm import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.checkpoints.common import CheckpointError  # noqa: E402
from keras_paligemma2.image_converter import PaliGemma2ImageConverter  # noqa: E402
from keras_paligemma2.preprocessor import PaliGemma2CausalLMPreprocessor  # noqa: E402
from keras_paligemma2.presets import list_presets  # noqa: E402
from keras_paligemma2.task_outputs import MaskDecoder  # noqa: E402
from keras_paligemma2.task_outputs import parse_detections  # noqa: E402
from keras_paligemma2.tokenizer import PaliGemma2Tokenizer  # noqa: E402
from keras_paligemma2.training import ResponseAccuracy  # noqa: E402
from keras_paligemma2.training import ResponseCrossEntropy  # noqa: E402
from keras_paligemma2.training import TrainingCheckpoint  # noqa: E402
from keras_paligemma2.training import big_vision_optimizer  # noqa: E402

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
    "list_presets",
    "parse_detections",
    "set_attention_implementation",
]

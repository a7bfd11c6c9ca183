"""Fine-tuning pieces: losses and metrics, big_vision's optimizer, data,
callbacks and LoRA."""

from keras_paligemma2.training.callbacks import EpochOrder
from keras_paligemma2.training.callbacks import StopOnNonFiniteLoss
from keras_paligemma2.training.callbacks import TrainingCheckpoint
from keras_paligemma2.training.data import RawBatches
from keras_paligemma2.training.data import preprocessed_dataset
from keras_paligemma2.training.losses import LOSS_NORMALIZATIONS
from keras_paligemma2.training.losses import ResponseAccuracy
from keras_paligemma2.training.losses import ResponseCrossEntropy
from keras_paligemma2.training.losses import reduce_over_responses
from keras_paligemma2.training.optimizers import BIG_VISION_DECAY_MULTS
from keras_paligemma2.training.optimizers import BigVisionAdam
from keras_paligemma2.training.optimizers import BigVisionSchedule
from keras_paligemma2.training.optimizers import big_vision_optimizer
from keras_paligemma2.training.optimizers import big_vision_schedule
from keras_paligemma2.training.optimizers import big_vision_warmup_steps

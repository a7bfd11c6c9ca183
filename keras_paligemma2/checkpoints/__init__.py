"""Checkpoints in and out: one module per foreign format (`big_vision`, `hf`,
`keras_hub_preset`), each a table from its tensor names to our variable
paths; `assignment` checks such a table against a file and fills the model
from it; `loader` is where `from_preset` goes; `presets` names the released
checkpoints and `download` fetches them."""

from keras_paligemma2.checkpoints.loader import load_backbone
from keras_paligemma2.checkpoints.loader import load_task

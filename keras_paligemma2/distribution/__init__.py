"""Sharding PaliGemma 2 over a device mesh with `keras.distribution`: layouts
for a config or preset, the memory planner and `auto_distribution`.

The layout rules themselves (which dimension each weight shards over) are in
`keras_paligemma2.models.layouts`, which the backbone uses too.
"""

from keras_paligemma2.distribution.meshes import layout_map
from keras_paligemma2.distribution.meshes import meshes
from keras_paligemma2.distribution.meshes import model_parallel
from keras_paligemma2.distribution.meshes import model_weights
from keras_paligemma2.distribution.planner import MODES
from keras_paligemma2.distribution.planner import Plan
from keras_paligemma2.distribution.planner import auto_distribution
from keras_paligemma2.distribution.planner import plan
from keras_paligemma2.models.layouts import FSDP_MIN_SIZE
from keras_paligemma2.models.layouts import MODEL_PREFERENCES
from keras_paligemma2.models.layouts import PathLayoutMap
from keras_paligemma2.models.layouts import element_count
from keras_paligemma2.models.layouts import variable_layout

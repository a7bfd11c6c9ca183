"""One process of a multi-process `predict` (tests/test_prediction.py starts two).

    python tests/workers/predict_process.py PORT PROCESS_ID NUM_PROCESSES REQUESTS OUTPUT

XLA_FLAGS (simulated devices per process), KERAS_BACKEND and JAX_PLATFORMS come
from the environment. Prints predict's summary as JSON.
"""

import json
import sys

import jax

port, process_id, processes, requests, output = sys.argv[1:6]
jax.distributed.initialize(f"localhost:{port}", int(processes), int(process_id))

import keras  # noqa: E402

from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.apps import prediction  # noqa: E402

with keras.distribution.DataParallel(devices=jax.local_devices()).scope():
    lm = PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")
    summary = prediction.predict(
        lm, prediction.read_requests(requests), output, batch_size=4, max_new_tokens=24
    )
print(json.dumps({**summary, "devices": len(jax.devices()), "local": len(jax.local_devices())}))

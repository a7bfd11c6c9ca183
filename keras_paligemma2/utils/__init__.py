"""The package's foundation: file IO (atomic writes, safetensors and npz
tensors, JSONL), its errors, and the one module that touches Keras' and
keras-hub's private internals (`keras_internals`)."""

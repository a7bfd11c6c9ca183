"""The package runs on Keras' JAX backend only: the check, in one place."""


def require_jax():
    """Raises an ImportError saying how to fix it unless Keras uses JAX."""
    import keras

    if keras.config.backend() != "jax":
        raise ImportError(
            "keras_paligemma2 runs on the JAX backend only, but Keras is using "
            f"the {keras.config.backend()!r} backend. Set the environment variable "
            "KERAS_BACKEND=jax before Keras is first imported (or in "
            "~/.keras/keras.json), then restart Python."
        )

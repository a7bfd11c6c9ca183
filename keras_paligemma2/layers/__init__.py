"""Model layers: attention (dispatch, the exact reference, the flash kernel,
RoPE and masks), Gemma 2 decoder blocks, the SigLIP vision encoder and
big_vision's VQ-VAE mask decoder."""

from keras_paligemma2.utils.backend import require_jax

require_jax()

"""SigLIP encoder against numpy_reference (big_vision `vit.py` semantics)."""

import numpy as np
import numpy_reference as ref
from helpers import assert_close
from helpers import randomize

from keras_paligemma2.layers.siglip import VisionEncoder

rng = None  # Reseeded from each test's id (conftest).


def _np(x):
    return np.asarray(x, np.float64)


def _vit_reference(encoder, images):
    p = encoder.patch_size
    b, s, _, _ = images.shape
    g = s // p
    # Patchify: non-overlapping p x p patches, row-major, (kh, kw, c) order.
    patches = images.reshape(b, g, p, g, p, 3).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, p * p * 3)
    kernel = _np(encoder.patch_embedding.kernel).reshape(p * p * 3, -1)
    x = patches @ kernel + _np(encoder.patch_embedding.bias)
    x = x + _np(encoder.position_embedding)
    for block in encoder.blocks:
        att = block.attention
        h = ref.layer_norm(x, _np(block.attention_norm.gamma), _np(block.attention_norm.beta))

        def proj(layer):
            return np.einsum("btw,wnh->btnh", h, _np(layer.kernel)) + _np(layer.bias)

        q = proj(att.query) / np.sqrt(att.head_dim)
        o = ref.attention(q, proj(att.key), proj(att.value))
        o = np.einsum("btnh,nhw->btw", o, _np(att.output_projection.kernel))
        x = x + o + _np(att.output_projection.bias)
        h = ref.layer_norm(x, _np(block.mlp_norm.gamma), _np(block.mlp_norm.beta))
        h = ref.gelu_tanh(h @ _np(block.mlp_in.kernel) + _np(block.mlp_in.bias))
        x = x + h @ _np(block.mlp_out.kernel) + _np(block.mlp_out.bias)
    return ref.layer_norm(x, _np(encoder.encoder_norm.gamma), _np(encoder.encoder_norm.beta))


def test_vision_encoder_matches_reference():
    encoder = VisionEncoder(28, 14, hidden_dim=12, num_layers=2, num_heads=3, intermediate_dim=20)
    encoder.build()
    randomize(encoder, rng)
    images = rng.uniform(-1, 1, size=(2, 28, 28, 3)).astype("float32")
    got = np.asarray(encoder(images))
    assert got.shape == (2, 4, 12)
    # float32 against float64: 588-term patch sums, 2 blocks, 5 LayerNorms, on
    # outputs below 1 (ulps of 1). Measured 5.
    assert_close(got, _vit_reference(encoder, images.astype(np.float64)), ulps=32)

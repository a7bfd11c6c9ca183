"""Plain numpy reference computations, written from the papers and big_vision.

Deliberately naive (explicit loops over heads, no grouping tricks) so that
they check the package's vectorised code rather than repeat it.
"""

import numpy as np


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def rms_norm(x, scale, eps=1e-6):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * (1 + scale)


def layer_norm(x, gamma, beta, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def rope(x, positions, base=10_000):
    """x (B, T, N, H); rotate pairs (i, i + H/2) by position / base^(2i/H)."""
    out = np.empty_like(x, dtype=np.float64)
    half = x.shape[-1] // 2
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(half):
                angle = positions[b, t] / base ** (2 * i / x.shape[-1])
                c, s = np.cos(angle), np.sin(angle)
                a, bb = x[b, t, :, i], x[b, t, :, i + half]
                out[b, t, :, i] = a * c - bb * s
                out[b, t, :, i + half] = bb * c + a * s
    return out


def prefix_lm_mask(valid, mask_ar):
    """big_vision `make_attn_mask`, one pair at a time."""
    batch, length = valid.shape
    blocks = np.cumsum(mask_ar, axis=1)
    mask = np.zeros((batch, length, length), bool)
    for b in range(batch):
        for i in range(length):
            for j in range(length):
                mask[b, i, j] = blocks[b, j] <= blocks[b, i] and valid[b, i] and valid[b, j]
    return mask


def hf_sliding_mask(valid, mask_ar, window):
    """HF's Gemma 2 local-layer mask with PaliGemma's bidirectional prefix."""
    mask = prefix_lm_mask(valid, mask_ar)
    blocks = np.cumsum(mask_ar, axis=1)
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            for j in range(mask.shape[2]):
                in_prefix = blocks[b, i] == 0 and blocks[b, j] == 0
                if i - j >= window and not in_prefix:
                    mask[b, i, j] = False
    return mask


def attention(q, k, v, mask=None, soft_cap=None):
    """q (B,T,N,H) pre-scaled, k/v (B,S,K,H); query head n uses kv head n // (N/K)."""
    batch, t_len, num_heads, _ = q.shape
    group = num_heads // k.shape[2]
    out = np.zeros(q.shape, np.float64)
    for b in range(batch):
        for n in range(num_heads):
            logits = q[b, :, n] @ k[b, :, n // group].T
            if soft_cap:
                logits = soft_cap * np.tanh(logits / soft_cap)
            if mask is not None:
                logits = np.where(mask[b], logits, -1e30)
            probs = np.exp(logits - logits.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            out[b, :, n] = probs @ v[b, :, n // group]
    return out

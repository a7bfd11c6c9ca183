"""Post-training GPTQ of the backbone on image + text batches, through
Keras' own GPTQ solver.

Keras' `Model.quantize("gptq")` feeds windows of token ids to a text
model's blocks (`gptq_quantize`), each block called with one tensor; the
blocks here need images, positions and the prefix-LM mask, so the
calibration batches are the backbone's own inputs. The stages are
calibrated in the order the forward pass runs them (with the ViT: each ViT
block, then the image projection; then each decoder block), each on the
outputs of the stages before it, already quantised, as GPTQ does. Only real
tokens enter a layer's Hessian: padding rows say nothing about the inputs
the layer will see.

The column solve is Keras' `gptq_quantize_matrix` computed as one jitted
program (`gptq_matrix`, tested equal to Keras' output): Keras runs it
eagerly, one Python step per column, each step's slices new XLA programs
(measured on CPU: 40 s for a 128 x 512 kernel, 0.03 s jitted).
"""

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from keras import ops

from keras_paligemma2.utils import keras_internals

BATCH_KEYS = ("images", "token_ids", "padding_mask", "response_mask")


def is_pending(layer):
    """Whether `layer` was put in GPTQ mode and not calibrated yet.

    Args:
        layer: any Keras layer.
    """
    return layer.quantization_mode == "gptq" and not getattr(layer, "is_gptq_calibrated", True)


def gptq_calibrate(backbone, batches, config):
    """Calibrates every projection of `backbone` in uncalibrated GPTQ mode
    (`quantize("gptq")` leaves them so) on `batches`, one stage at a time.

    Args:
        backbone: a `PaliGemma2Backbone`.
        batches: list of dicts of backbone inputs (`BATCH_KEYS`).
        config: `keras.quantizers.GPTQConfig` (bits, group size, damping,
            activation order).
    """
    blocks = list(backbone.vision_encoder.blocks) + list(backbone.decoder_blocks)
    remat = [block.remat for block in blocks]
    # A rematerialised block runs under `jax.checkpoint`, which would hand
    # the Hessian hooks tracers instead of activations.
    for block in blocks:
        block.remat = False
    try:
        image_tokens = _image_tokens(backbone, [b["images"] for b in batches], config)
        states = [
            backbone.decoder_inputs(tokens, b["token_ids"], b["padding_mask"], b["response_mask"])
            for tokens, b in zip(image_tokens, batches)
        ]
        xs = [x for x, _, _, _ in states]
        valid = [np.flatnonzero(np.asarray(v).reshape(-1)) for _, _, _, v in states]
        for i, block in enumerate(backbone.decoder_blocks):
            args = [(x, positions, masks[i]) for x, (_, positions, masks, _) in zip(xs, states)]
            xs = _calibrate(block, args, valid, config)
    finally:
        for block, policy in zip(blocks, remat):
            block.remat = policy


def _image_tokens(backbone, images, config):
    """Each batch's image tokens, the ViT and image projection calibrated
    on the way when they are in GPTQ mode."""
    encoder, projection = backbone.vision_encoder, backbone.image_projection
    if not any(is_pending(layer) for layer in list(encoder._flatten_layers()) + [projection]):
        return [backbone.embed_images(batch) for batch in images]
    side = encoder.image_size
    xs = [encoder.embed_patches(ops.reshape(batch, (-1, side, side, 3))) for batch in images]
    everything = [None] * len(xs)
    for block in encoder.blocks:
        xs = _calibrate(block, [(x,) for x in xs], everything, config)
    xs = _calibrate(projection, [(encoder.encoder_norm(x),) for x in xs], everything, config)
    return [ops.reshape(x, (-1, backbone.num_image_tokens, projection.units)) for x in xs]


def _calibrate(stage, args, valid, config):
    """Calibrates the pending layers of `stage` on calls with `args` (one
    tuple per batch; `valid`: each batch's real-token rows, or None for
    all), then returns the stage's outputs, computed after."""
    layers = [layer for layer in stage._flatten_layers() if is_pending(layer)]
    if layers:
        solvers = [
            keras_internals.gptq_solver(layer, config, layer.gptq_kernel_matrix())
            for layer in layers
        ]
        with _streamed_hessians(layers, solvers) as rows:
            for call_args, batch_rows in zip(args, valid):
                rows["valid"] = batch_rows
                stage(*call_args)
        with keras_internals.gptq_column_solver(gptq_matrix):
            for solver in solvers:
                solver.quantize_and_correct_layer()
                solver.free()
    return [stage(*call_args) for call_args in args]


@contextlib.contextmanager
def _streamed_hessians(layers, solvers):
    """While open, each layer's inputs (its real-token rows: the yielded
    dict's "valid") go into its solver's Hessian before the layer runs."""
    rows = {"valid": None}
    replaced = []

    def hooked(call, solver):
        def call_and_record(inputs, *args, **kwargs):
            x = ops.reshape(inputs, (-1, solver.rows))
            if rows["valid"] is not None:
                x = ops.take(x, rows["valid"], axis=0)
            solver.update_hessian_with_batch(x)
            return call(inputs, *args, **kwargs)

        return call_and_record

    # A layer in GPTQ mode runs `quantized_call` (Keras' `Layer.__call__`
    # takes it for every quantised layer), not `call`.
    try:
        for layer, solver in zip(layers, solvers):
            replaced.append((layer, "quantized_call" in vars(layer), layer.quantized_call))
            layer.quantized_call = hooked(layer.quantized_call, solver)
        yield rows
    finally:
        for layer, had_own, call in replaced:
            if had_own:
                layer.quantized_call = call
            else:
                del layer.quantized_call


def gptq_matrix(
    weights_transpose,
    inv_hessian,
    *,
    blocksize=128,
    group_size=-1,
    activation_order=False,
    order_metric=None,
    compute_scale_zero=None,
):
    """Keras' `gptq_quantize_matrix`, same arguments and values, jitted:
    the columns of each block solved in a `fori_loop`.

    Args:
        weights_transpose: float (out_features, in_features).
        inv_hessian: float (in_features, in_features).
        blocksize: int, columns solved before the error reaches the rest.
        group_size: int, columns sharing a scale and zero; -1: all.
        activation_order: bool; solve the columns by decreasing `order_metric`.
        order_metric: float (in_features,) or None (1 / diag(inv_hessian)).
        compute_scale_zero: the quantiser's `find_params`: a weight slice
            (out, n) -> (scale (out, 1), zero (out, 1), maxq).

    Returns:
        `(quantized int32 (out, in), scale (out, groups), zero (out,
        groups), g_idx float32 (in,))`, as Keras'.
    """
    if activation_order and order_metric is None:
        order_metric = ops.reciprocal(ops.add(ops.diagonal(inv_hessian), 1e-12))
    # Keras hands over its quantiser's bound `find_params`, one per layer:
    # the compiled solve is kept per quantiser setting instead.
    quantizer = compute_scale_zero.__self__
    setting = (
        quantizer.weight_bits,
        quantizer.symmetric,
        quantizer.per_channel,
        quantizer.group_size,
        quantizer.compute_dtype,
    )
    solve = _jitted_solve(blocksize, group_size, bool(activation_order), setting)
    return solve(weights_transpose, inv_hessian, order_metric)


@functools.lru_cache(maxsize=None)
def _jitted_solve(blocksize, group_size, activation_order, setting):
    bits, symmetric, per_channel, quantizer_group_size, compute_dtype = setting
    find_params = functools.partial(
        keras_internals.gptq_scale_and_zero,
        bits=bits,
        symmetric=symmetric,
        per_channel=per_channel,
        group_size=quantizer_group_size,
        compute_dtype=compute_dtype,
    )
    return jax.jit(
        functools.partial(
            _solve,
            blocksize=blocksize,
            group_size=group_size,
            activation_order=activation_order,
            compute_scale_zero=find_params,
        )
    )


def _solve(
    weights,
    inv_hessian,
    order_metric,
    *,
    blocksize,
    group_size,
    activation_order,
    compute_scale_zero,
):
    in_features = weights.shape[1]
    if activation_order:
        order_metric = ops.cast(order_metric, "float32")
        order_metric = ops.where(ops.isfinite(order_metric), order_metric, 0.0)
        perm = keras_internals.gptq_column_order(order_metric)
        weights = ops.take(weights, perm, axis=1)
        inv_hessian = ops.take(ops.take(inv_hessian, perm, axis=0), perm, axis=1)
    group = in_features if group_size == -1 else group_size
    buffer = weights
    quantized = []
    scales, zeros = {}, {}
    for start in range(0, in_features, blocksize):
        end = min(start + blocksize, in_features)
        # Keras computes a group's scale and zero when its first column is
        # solved, from the weights as they stood when that block began;
        # without groups, anew for each block from all the weights.
        if group_size == -1:
            starts = [start] * (end - start)
            scales[start], zeros[start], maxq = compute_scale_zero(buffer)
        else:
            starts = [(start + k) // group * group for k in range(end - start)]
        for first in sorted(set(starts) - set(scales)):
            scale, zero, maxq = compute_scale_zero(
                buffer[:, first : min(first + group, in_features)]
            )
            scales[first], zeros[first] = scale, zero
        column_scale = jnp.concatenate([scales[first] for first in starts], axis=1)
        column_zero = jnp.concatenate([zeros[first] for first in starts], axis=1)
        block_inverse = inv_hessian[start:end, start:end]
        columns = jnp.arange(end - start)

        def solve_column(
            k,
            state,
            column_scale=column_scale,
            column_zero=column_zero,
            block_inverse=block_inverse,
            columns=columns,
        ):
            block, errors, codes = state
            column = block[:, k]
            scale = jax.lax.dynamic_slice_in_dim(column_scale, k, 1, axis=1)
            zero = jax.lax.dynamic_slice_in_dim(column_zero, k, 1, axis=1)
            code = keras_internals.gptq_quantize_column(column[:, None], scale, zero, maxq)
            codes = codes.at[:, k].set(ops.cast(code[:, 0], "int32"))
            restored = keras_internals.gptq_dequantize_column(code, scale, zero)[:, 0]
            error = (column - restored) / block_inverse[k, k]
            errors = errors.at[:, k].set(error)
            update = error[:, None] * block_inverse[k][None, :]
            block = block - jnp.where(columns > k, update, 0.0)
            return block, errors, codes

        block = buffer[:, start:end]
        state = (block, jnp.zeros_like(block), jnp.zeros(block.shape, "int32"))
        _, errors, codes = jax.lax.fori_loop(0, end - start, solve_column, state)
        quantized.append(codes)
        if end < in_features:
            buffer = jnp.concatenate(
                [buffer[:, :end], buffer[:, end:] - errors @ inv_hessian[start:end, end:]], axis=1
            )
    quantized = jnp.concatenate(quantized, axis=1)
    g_idx = ops.cast(ops.divide(ops.arange(0, in_features, dtype="int32"), group), "float32")
    if activation_order:
        inverse = ops.argsort(perm)
        g_idx = ops.take(g_idx, inverse, axis=0)
        quantized = ops.take(quantized, inverse, axis=1)
    scale = jnp.concatenate([scales[first] for first in sorted(scales)], axis=1)
    zero = jnp.concatenate([zeros[first] for first in sorted(zeros)], axis=1)
    return quantized, scale, zero, g_idx

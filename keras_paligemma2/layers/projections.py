"""The model's projection layers: Keras' `EinsumDense` and `Dense`, with
their LoRA adapters kept apart when they compute and when they are saved.

With LoRA on a float kernel, Keras computes `x @ (W + A @ B * alpha / rank)`:
a full copy of every adapted kernel is formed in each step and kept for
the backward pass. These compute `x @ W + ((x @ A) @ B) * alpha / rank`,
which holds only (..., rank) activations besides the output (same numbers
within float32 rounding; quantised kernels already go Keras' unmerged way).

Keras saves a LoRA-enabled layer with the adapters folded into its kernel
(requantised, for an int8 / int4 kernel) and loads it back with both
adapters set to zero: a resumed fine-tune would start from zero adapters,
whose gradients are zero too. These layers save the base weights as Keras
does without LoRA, under Keras' own keys, plus `lora_kernel_a` and
`lora_kernel_b`, and load them back as they were. A file without adapters
(any file Keras or an earlier version wrote) loads as in Keras.

The classes keep Keras' names, `Dense` and `EinsumDense`: Keras files key a
layer held in a list (the functional model's `image_projection`) by its
class name, so another name would not find the weights of earlier saves.
Use them as `projections.Dense`, beside `keras.layers.Dense`.
"""

import keras
from keras import ops

from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.keras_internals import base_kernel

ADAPTER_KEYS = ("lora_kernel_a", "lora_kernel_b")

QUANTIZATIONS = (None, "int8", "int4")


def is_quantized(layer_path, quantize_vision):
    """Whether quantising the backbone makes this layer's kernel integers:
    every projection of the decoder, and with `quantize_vision` the ViT's and
    the image projection's too. Embeddings, norms and the patch convolution
    stay float (Keras quantises none of them here).

    Args:
        layer_path: str, a layer's Keras path, e.g.
            "decoder_block_0/attention/query".
        quantize_vision: bool; the ViT and the image projection too.
    """
    if "patch_embedding" in layer_path:
        return False
    if layer_path.startswith("decoder_block"):
        return True
    return quantize_vision and layer_path.startswith(("vision_encoder", "image_projection"))


def quantizes_layer(layer, quantize_vision):
    """`is_quantized` for a layer object: a Keras `Dense` / `EinsumDense`
    (the projections, the only layers here Keras can quantise) at a
    quantised path.

    Args:
        layer: a Keras layer of the backbone.
        quantize_vision: bool; the ViT and the image projection too.
    """
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) and is_quantized(
        layer.path or "", quantize_vision
    )


def check_quantization(mode):
    """Raises an `InputError` unless `mode` is None, "int8" or "int4".

    Args:
        mode: the requested quantisation.
    """
    if mode not in QUANTIZATIONS:
        raise InputError(
            f"quantization must be one of {QUANTIZATIONS} (Keras' int8 or int4 "
            f"kernels); got {mode!r}."
        )


class _KeepsAdapters:
    """`save_own_variables` / `load_own_variables` that keep LoRA adapters
    unmerged (see the module docstring)."""

    def quantize(self, mode=None, type_check=True, config=None):
        """Keras' own quantisation of the layer (int8, int4, float8, GPTQ,
        AWQ). Keras refuses subclasses unless told (`type_check`): these
        compute exactly as their Keras class.

        Args:
            mode: str, Keras' quantisation mode ("int8", "int4", ...).
            type_check: bool, ignored (see above).
            config: a Keras `QuantizationConfig` or None.
        """
        return super().quantize(mode, type_check=False, config=config)

    def save_own_variables(self, store):
        if self.quantization_mode == "gptq":
            # Keras 3.15 leaves a GPTQ layer's zero points out when it saves
            # (it takes them from a LoRA merge, which GPTQ has not) and reads
            # them back by position: the load fails. Its own order, whole.
            names = self.variable_serialization_spec["gptq"]
            names = [name for name in names if name != "bias" or self.bias is not None]
            for index, name in enumerate(names):
                store[str(index)] = getattr(self, name)
            return
        if not self.lora_enabled:
            return super().save_own_variables(store)
        # With `lora_enabled` off, Keras writes the base variables as they
        # are (nothing merged), under its own positional keys.
        self.lora_enabled = False
        try:
            super().save_own_variables(store)
        finally:
            self.lora_enabled = True
        for key in ADAPTER_KEYS:
            store[key] = getattr(self, key)

    def load_own_variables(self, store):
        if not (self.lora_enabled and ADAPTER_KEYS[0] in store.keys()):
            return super().load_own_variables(store)
        self.lora_enabled = False
        try:
            # Keras checks the count of stored values (the base's plus the
            # two adapters) against the layer's variables, then reads the
            # base ones by position.
            super().load_own_variables(store)
        finally:
            self.lora_enabled = True
        for key in ADAPTER_KEYS:
            getattr(self, key).assign(store[key])

    def _finish(self, x):
        if self.bias is not None:
            x = ops.add(x, self.bias)
        if self.activation is not None:
            x = self.activation(x)
        return x


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class EinsumDense(_KeepsAdapters, keras.layers.EinsumDense):
    """`keras.layers.EinsumDense` whose LoRA adapters stay unmerged, in the
    step and in saves.

    Args:
        **kwargs: `keras.layers.EinsumDense`'s (`equation`, `output_shape`,
            `bias_axes`, `dtype`, `name`, ...).
    """

    def call(self, inputs, training=None):
        """`keras.layers.EinsumDense.call`, with LoRA as `x @ W + (x @ A) @ B`.

        Args:
            inputs: tensor matching the equation's first operand.
            training: unused (Keras' signature).
        """
        if not self.lora_enabled:
            return super().call(inputs, training=training)
        x = ops.einsum(self.equation, inputs, base_kernel(self))
        # A is the kernel with its last axis (the output's last) replaced by
        # the rank: the same equation with that letter renamed gives x @ A.
        operands, output = self.equation.split("->")
        source, kernel = operands.split(",")
        last = kernel[-1]
        rank = next(c for c in "rzyxwvuqpo" if c not in self.equation)
        if output[-1] != last:
            raise NotImplementedError(
                f"LoRA needs the kernel's last axis to be the output's last: {self.equation}."
            )
        lora_a, lora_b = _adapters_in(self, inputs.dtype)
        down = ops.einsum(f"{source},{kernel[:-1]}{rank}->{output[:-1]}{rank}", inputs, lora_a)
        x = ops.add(x, ops.matmul(down, lora_b) * (self.lora_alpha / self.lora_rank))
        return self._finish(x)

    # GPTQ (Keras' `quantize("gptq")`) stores the kernel as a matrix (rows:
    # the contracted input features, columns: the rest). Keras guesses which
    # axes of a 3-D kernel are which from where the largest one is, and
    # misreads the decoder's query / key / value kernels (N, D, H), D
    # contracted: here the equation says.

    def gptq_axes(self):
        """The kernel's axes as GPTQ's matrix takes them: `(rows, columns)`,
        each a list of axis indices, rows the axes the equation contracts
        with the input's trailing axes (in their order).
        """
        operands, output = self.equation.split("->")
        source, kernel = operands.split(",")
        rows = [i for i, c in enumerate(kernel) if c not in output]
        contracted = "".join(kernel[i] for i in rows)
        if not source.endswith(contracted):
            raise NotImplementedError(
                f"GPTQ needs the contracted axes last in the input, in the kernel's order: "
                f"{self.equation}."
            )
        return rows, [i for i, c in enumerate(kernel) if c in output]

    def gptq_kernel_matrix(self):
        """The float kernel as GPTQ's (rows, columns) matrix (`gptq_axes`)."""
        rows, columns = self.gptq_axes()
        kernel = ops.transpose(base_kernel(self), rows + columns)
        shape = ops.shape(kernel)
        return ops.reshape(kernel, (_product(shape[: len(rows)]), _product(shape[len(rows) :])))

    def _gptq_build(self, kernel_shape, config):
        # Keras builds a 2-D kernel's GPTQ variables as they are: give it the
        # matrix's shape, and compute with the kernel's axes in matrix order.
        rows, columns = self.gptq_axes()
        matrix = (
            _product(kernel_shape[i] for i in rows),
            _product(kernel_shape[i] for i in columns),
        )
        super()._gptq_build(matrix, config)
        self.original_kernel_shape = tuple(kernel_shape[i] for i in rows + columns)

    def _gptq_call(self, inputs, training=False):
        if not self.is_gptq_calibrated:
            return super()._gptq_call(inputs, training=training)
        rows, columns = self.gptq_axes()
        operands, output = self.equation.split("->")
        source, kernel = operands.split(",")
        equation = self.equation
        # Keras' call reshapes the matrix to `original_kernel_shape` (the
        # axes in matrix order) and contracts it with `self.equation`.
        self.equation = f"{source},{''.join(kernel[i] for i in rows + columns)}->{output}"
        try:
            return super()._gptq_call(inputs, training=training)
        finally:
            self.equation = equation


def _product(values):
    result = 1
    for value in values:
        result *= int(value)
    return result


@keras.saving.register_keras_serializable(package="keras_paligemma2")
class Dense(_KeepsAdapters, keras.layers.Dense):
    """`keras.layers.Dense` whose LoRA adapters stay unmerged, in the step
    and in saves.

    Args:
        **kwargs: `keras.layers.Dense`'s (`units`, `dtype`, `name`, ...).
    """

    def call(self, inputs, training=None):
        """`keras.layers.Dense.call`, with LoRA as `x @ W + (x @ A) @ B`.

        Args:
            inputs: tensor (..., input_dim).
            training: unused (Keras' signature).
        """
        if not self.lora_enabled:
            return super().call(inputs, training=training)
        x = ops.matmul(inputs, base_kernel(self))
        lora_a, lora_b = _adapters_in(self, inputs.dtype)
        down = ops.matmul(inputs, lora_a)
        x = ops.add(x, ops.matmul(down, lora_b) * (self.lora_alpha / self.lora_rank))
        return self._finish(x)

    def gptq_kernel_matrix(self):
        """The float kernel as GPTQ's (rows: inputs, columns: outputs) matrix."""
        return base_kernel(self)


def _adapters_in(layer, dtype):
    # Keras keeps the adapters in float32 whatever the layer's dtype; used as
    # they are, they would promote a bfloat16 layer's output (and every
    # activation after it) to float32. They train in float32 and compute in
    # the layer's compute dtype, as mixed precision does.
    return ops.cast(layer.lora_kernel_a, dtype), ops.cast(layer.lora_kernel_b, dtype)

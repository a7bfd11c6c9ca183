"""Rematerialisation of blocks in the backward pass: the policies, in one place."""

import jax

from keras_paligemma2.utils.errors import InputError

# What a rematerialised block keeps for the backward pass: "block" nothing
# but its input (everything inside is recomputed); "matmuls" also the
# outputs of its projections (matmuls without batch dimensions: attention
# scores, softmax, norms and activations are recomputed, the costly
# projections are not).
REMAT_POLICIES = ("block", "matmuls")


def remat_policy(remat):
    """The canonical remat setting: None (off), "block" or "matmuls".

    Args:
        remat: False/None (off), True (= "block"), "block" or "matmuls".
    """
    if remat is None or remat is False:
        return None
    if remat is True:
        return "block"
    if remat not in REMAT_POLICIES:
        raise InputError(f"remat must be False, True or one of {REMAT_POLICIES}; got {remat!r}.")
    return remat


def rematerialised(function, policy):
    """`function` recomputed in the backward pass under `policy` ("block"
    or "matmuls", see `REMAT_POLICIES`).

    Args:
        function: the block's forward function.
        policy: "block" or "matmuls".
    """
    if policy == "matmuls":
        return jax.checkpoint(
            function, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable
        )
    return jax.checkpoint(function)

"""`python -m keras_paligemma2` (also the `keras-paligemma2` command)."""

import argparse
import os
import sys


def _convert(args):
    from keras_paligemma2 import PaliGemma2CausalLM

    destination = os.path.abspath(args.destination)
    if os.path.exists(destination) and os.listdir(destination) and not args.overwrite:
        raise UserError(
            f"{args.destination} exists and is not empty; pass --overwrite to "
            "replace it (the old one is kept until the new one is complete)."
        )
    overrides = {"dtype": args.dtype} if args.dtype else {}
    lm = PaliGemma2CausalLM.from_preset(args.source, source=args.from_source, **overrides)
    lm.save_to_preset(destination, max_shard_size=args.max_shard_size)
    backbone = lm.backbone
    count = sum(_size(v) for v in backbone.weights)
    print(
        f"Wrote {destination}: {count:,} parameters in "
        f"{backbone.dtype_policy.name}; load it with "
        f"PaliGemma2CausalLM.from_preset({args.destination!r})."
    )


def _size(variable):
    size = 1
    for dim in variable.shape:
        size *= dim
    return size


class UserError(Exception):
    """A mistake in the command line: one line on stderr, exit status 2."""


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_paligemma2",
        description="PaliGemma 2 in Keras 3 (JAX).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    convert = commands.add_parser(
        "convert",
        help="convert a checkpoint into a Keras preset directory",
        description=(
            "Convert a checkpoint (registered preset name, big_vision .npz, "
            "HF transformers directory, keras-hub preset or kaggle:// handle) "
            "into a Keras preset directory that from_preset loads."
        ),
    )
    convert.add_argument("source", help="preset name (e.g. pg2_3b_224), file, directory or handle")
    convert.add_argument("destination", help="directory to write the preset to")
    convert.add_argument("--dtype", help="variable dtype, e.g. bfloat16 or float32 (default: float32)")
    convert.add_argument(
        "--from",
        dest="from_source",
        choices=["big_vision", "transformers", "keras_hub"],
        help="for a registered name: where to download the weights (default big_vision)",
    )
    convert.add_argument(
        "--max-shard-size", type=float, default=2, help="split weight files above this many GB (default 2)"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.set_defaults(run=_convert)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from keras_paligemma2.checkpoints.common import CheckpointError

    try:
        args.run(args)
    except (UserError, CheckpointError, ValueError, FileNotFoundError) as error:
        message = str(error).strip()
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0

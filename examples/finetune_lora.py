"""LoRA transfer: teach `pg2_tiny_shapes` a question it was never trained on.

    python examples/finetune_lora.py [--preset pg2_tiny_shapes] [--epochs 4]

The new task: `answer en which shape is on the left?` -> the name of the
leftmost shape (`circle`, `square` or `triangle`). The base model has never
seen the prompt. The script measures exact-match accuracy on held-out
scenes, fine-tunes rank-8 LoRA adapters on the decoder (the base weights stay
frozen), measures again, and saves the adapters (a few hundred kB, loadable
with `load_lora_weights` on the same preset). A few minutes on 2 CPU cores.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_paligemma2 import PaliGemma2CausalLM  # noqa: E402
from keras_paligemma2.apps import shapes  # noqa: E402

PROMPT = "answer en which shape is on the left?"


def leftmost_examples(count, seed):
    rng = np.random.default_rng(seed)
    images, answers = [], []
    for _ in range(count):
        image, objects = shapes.draw_scene(rng)
        images.append(image)
        answers.append(objects[0]["shape"])  # objects are sorted left to right
    return {"images": np.stack(images), "prompts": [PROMPT] * count, "responses": answers}


def accuracy(lm, data, batch_size=64):
    replies = []
    for start in range(0, len(data["prompts"]), batch_size):
        replies += lm.generate(
            {
                "images": data["images"][start : start + batch_size],
                "prompts": data["prompts"][start : start + batch_size],
            },
            max_new_tokens=4,
        )
    return float(np.mean([r.strip() == a for r, a in zip(replies, data["responses"])]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="pg2_tiny_shapes")
    parser.add_argument("--train-examples", type=int, default=2048)
    parser.add_argument("--test-examples", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--save", default="leftmost_lora.safetensors")
    parser.add_argument("--seed", type=int, default=0, help="LoRA initialisation and shuffling")
    args = parser.parse_args(argv)
    keras.utils.set_random_seed(args.seed)  # the adapters' initial values: the same every run

    lm = PaliGemma2CausalLM.from_preset(args.preset)
    train = leftmost_examples(args.train_examples, seed=1)
    test = leftmost_examples(args.test_examples, seed=2)
    before = accuracy(lm, test)
    print(f"before: {before:.1%} of {args.test_examples} held-out scenes", flush=True)

    lm.enable_lora(rank=args.rank)
    trainable = sum(int(np.prod(v.shape)) for v in lm.trainable_variables)
    print(
        f"LoRA rank {args.rank}: {trainable:,} trainable of {lm.count_params():,} parameters",
        flush=True,
    )
    lm.compile(optimizer=keras.optimizers.Adam(args.learning_rate, global_clipnorm=1.0))
    start = time.time()
    history = lm.fit(
        train, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed, verbose=2
    )
    after = accuracy(lm, test)
    print(f"after:  {after:.1%} ({time.time() - start:.0f} s of fine-tuning)", flush=True)
    if args.save:
        lm.save_lora_weights(args.save)
        print(f"adapters saved to {args.save}", flush=True)
    return {"before": before, "after": after, "losses": history.history["loss"]}


if __name__ == "__main__":
    main()

"""`python -m keras_paligemma2` (also the `keras-paligemma2` command).

    generate   answer prompts about images; JSON out; annotated pictures
    finetune   LoRA or full fine-tuning on a JSONL data set, resumable
    evaluate   score a model on a JSONL data set
    predict    every request of a JSONL file or an image glob, to a resumable JSONL
    convert    any checkpoint format to a Keras preset directory
    plan       per-device memory of a job on every mesh of N devices

Mistakes in the command line or the data (missing files, unreadable images,
bad JSONL lines, unknown presets, over-long prompts: the package's
`InputError`s) print one line on stderr and exit with status 2; anything
else is a bug: its traceback, a line saying so, status 1. Nothing is written
half-way (every output is written to a temporary name and renamed); output
directories are created with their parents. TensorFlow / absl / XLA start-up
logs are hidden unless `--verbose`; progress bars become plain lines when
stderr is not a terminal.
"""

import argparse
import contextlib
import json
import os
import sys
import time
import traceback


class UserError(ValueError):
    """A mistake in the command line: one line on stderr, exit status 2."""


# === Shared ===


def _add_model_arguments(parser):
    parser.add_argument(
        "--preset",
        default="pg2_tiny_shapes",
        help="preset name, checkpoint or directory "
        "(default pg2_tiny_shapes, the small model shipped with the package)",
    )
    _add_source_argument(parser)
    parser.add_argument("--dtype", help="variable dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument(
        "--lora", help="directory written by `finetune` with LoRA adapters to apply"
    )


def _add_source_argument(parser):
    parser.add_argument(
        "--from",
        dest="from_source",
        choices=["big_vision", "transformers", "keras_hub"],
        help="for a registered name: where to download the weights (default big_vision)",
    )


def _load(args):
    from keras_paligemma2.models.causal_lm import PaliGemma2CausalLM

    overrides = {"dtype": args.dtype} if args.dtype else {}
    lm = PaliGemma2CausalLM.from_preset(args.preset, source=args.from_source, **overrides)
    if lm.preprocessor is None:
        raise UserError(
            f"{args.preset!r} comes without a tokenizer; convert it from a source that has one."
        )
    if getattr(args, "lora", None):
        description = os.path.join(args.lora, "finetune.json")
        if not os.path.isfile(description):
            raise UserError(
                f"{args.lora!r} holds no finetune.json: not a directory written by `finetune --lora-rank`."
            )
        with open(description) as f:
            adapters = json.load(f)
        lm.enable_lora(
            adapters["lora_rank"], adapters["lora_alpha"], tuple(adapters["lora_targets"])
        )
        lm.load_lora_weights(os.path.join(args.lora, "lora.safetensors"))
    return lm


def _sampling(args):
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        beam_size=args.beam_size,
        constrain=args.constrain,
    )


def _add_sampling_arguments(parser):
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        help="0 decodes greedily; default: greedy, or 1.0 with --top-k / --top-p",
    )
    parser.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="sample within probability p (nucleus)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--beam-size", type=int, help="beam search with this many beams")
    parser.add_argument(
        "--constrain",
        choices=["task"],
        help="task: detect / segment replies can only be well-formed objects of the prompt's classes",
    )


class _progress:
    """A tqdm bar on a terminal; elsewhere (a pipe, a log file) plain lines
    on stderr, about one per tenth of the work, without control codes.

    Args:
        total: int, the number of examples.
        description: str, what is being done.
        quiet: bool; True shows nothing.
    """

    def __init__(self, total, description, quiet=False):
        self.total, self.description, self.done = total, description, 0
        self.start = time.perf_counter()
        self.bar = None
        self.quiet = quiet
        self.next_report = 0
        if not quiet and sys.stderr.isatty():
            import tqdm

            self.bar = tqdm.tqdm(total=total, unit="example", desc=description)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()

    def update(self, count):
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        elif not self.quiet and (self.done >= self.next_report or self.done == self.total):
            rate = self.done / max(time.perf_counter() - self.start, 1e-9)
            print(
                f"{self.description}: {self.done}/{self.total} examples, {rate:.1f} examples/s",
                file=sys.stderr,
            )
            self.next_report = self.done + max(self.total // 10, 1)


def _batches(items, size):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _write_json(path, value):
    from keras_paligemma2.utils.files import atomic_file

    with atomic_file(path, "w") as f:
        json.dump(value, f, indent=1)


# === generate ===


def _generate(args):
    from keras_paligemma2.apps.drawing import draw
    from keras_paligemma2.models.task_outputs import parse_detections
    from keras_paligemma2.preprocessing.image_converter import to_rgb_array

    images, prompts = args.image, args.prompt
    if len(images) == 1:
        images = images * len(prompts)  # Every prompt about the one image.
    if len(prompts) not in (1, len(images)):
        raise UserError(
            f"Give one --prompt for all images, one per image, or one image for all prompts; got "
            f"{len(prompts)} prompts for {len(images)} images."
        )
    prompts = prompts * len(images) if len(prompts) == 1 else prompts
    pixels = [
        to_rgb_array(path, i) for i, path in enumerate(images)
    ]  # Bad images fail before loading.
    if args.annotate_dir and os.path.exists(args.annotate_dir):
        if not os.path.isdir(args.annotate_dir):
            raise UserError(f"--annotate-dir {args.annotate_dir!r} is a file, not a directory.")
    mask_decoder = None
    if args.mask_decoder:
        from keras_paligemma2.layers.vq_vae import MaskDecoder

        mask_decoder = MaskDecoder.from_checkpoint(args.mask_decoder)
    lm = _load(args)
    answers = []
    for chunk in _batches(list(zip(pixels, prompts)), args.batch_size):
        answers += lm.generate(
            {"images": [c[0] for c in chunk], "prompts": [c[1] for c in chunk]}, **_sampling(args)
        )
    names = _annotated_names(images, prompts)
    results = []
    for i, (path, image, prompt, answer) in enumerate(zip(images, pixels, prompts, answers)):
        entry = {"image": path, "prompt": prompt, "answer": answer}
        if prompt.startswith(("detect", "segment")):
            objects = parse_detections(answer, image.shape[:2])
            if mask_decoder is not None and prompt.startswith("segment"):
                _add_masks(objects, mask_decoder, image.shape[:2])
            entry["objects"] = [
                {"box": [round(float(v), 1) for v in o["box"]], "label": o["label"]}
                for o in objects
            ]
            if args.annotate_dir:
                os.makedirs(args.annotate_dir, exist_ok=True)
                out = os.path.join(args.annotate_dir, names[i])
                draw(image, objects, out)
                entry["annotated"] = out
        results.append(entry)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for entry in results:
        print(f"{entry['image']} | {entry['prompt']} -> {entry['answer']}")
        for obj in entry.get("objects", []):
            print(f"  {obj['label']}: box (y_min, x_min, y_max, x_max) {tuple(obj['box'])}")
        if "annotated" in entry:
            print(f"  annotated image: {entry['annotated']}")


def _annotated_names(images, prompts):
    """IMAGE_annotated.png for each example; where two examples would share
    a name (the same file asked twice, or two files of one base name), each
    gets its example number too, so no picture overwrites another."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in images]
    annotated = [i for i, p in enumerate(prompts) if p.startswith(("detect", "segment"))]
    counts = {}
    for i in annotated:
        counts[stems[i]] = counts.get(stems[i], 0) + 1
    return [
        f"{stem}_{i}_annotated.png" if counts.get(stem, 0) > 1 else f"{stem}_annotated.png"
        for i, stem in enumerate(stems)
    ]


def _add_masks(objects, mask_decoder, size):
    import numpy as np

    from keras_paligemma2.models.task_outputs import paste_mask

    coded = [o for o in objects if "codes" in o]
    if coded:
        logits = np.asarray(mask_decoder(np.array([o["codes"] for o in coded])))
        for obj, mask_logits in zip(coded, logits):
            obj["mask"] = paste_mask(mask_logits, obj["box"], size)


# === finetune ===


def _finetune(args):
    import keras

    from keras_paligemma2.training.callbacks import TrainingCheckpoint
    from keras_paligemma2.training.optimizers import big_vision_optimizer
    from keras_paligemma2.utils.jsonl import read_jsonl

    data = read_jsonl(args.data)
    validation = read_jsonl(args.validation_data) if args.validation_data else None
    output = os.path.abspath(args.output)
    if os.path.exists(output) and os.listdir(output) and not args.overwrite:
        raise UserError(f"{args.output} exists and is not empty; pass --overwrite to replace it.")
    if args.lora_rank and args.recipe:
        raise UserError("Choose LoRA (--lora-rank) or a freezing recipe (--recipe), not both.")
    if args.lora_rank is None:
        args.lora_rank = 0 if args.recipe else 8
    if args.lora:
        raise UserError(
            "finetune starts from --preset; merge adapters first (finetune --merge) to go on from them."
        )
    lm = _load(args)
    if args.sequence_length:
        lm.preprocessor.sequence_length = args.sequence_length
    targets = tuple(args.lora_targets.split(","))
    if args.lora_rank:
        lm.enable_lora(args.lora_rank, args.lora_alpha, targets)
    elif args.recipe:
        lm.set_trainable(args.recipe)
    steps = args.epochs * max(len(data["prompts"]) // args.batch_size, 1)
    lm.compile(optimizer=big_vision_optimizer(steps, learning_rate=args.learning_rate))
    callbacks = []
    if args.checkpoint_dir:
        callbacks.append(TrainingCheckpoint(args.checkpoint_dir, args.checkpoint_every))
    examples = {k: data[k] for k in ("images", "prompts", "responses")}
    keras.utils.set_random_seed(args.seed)
    history = lm.fit(
        examples,
        batch_size=args.batch_size,
        seed=args.seed,
        epochs=args.epochs,
        callbacks=callbacks,
        validation_data=(
            {k: validation[k] for k in ("images", "prompts", "responses")} if validation else None
        ),
        # A progress bar on a terminal; in a pipe or a log, one line per epoch.
        verbose=1 if sys.stdout.isatty() and not args.quiet_progress else 2,
    )
    from keras_paligemma2.utils.files import atomic_directory

    losses = [round(float(v), 4) for v in history.history.get("loss", [])]
    if args.lora_rank and not args.merge:
        with atomic_directory(output) as staging:
            lm.save_lora_weights(os.path.join(staging, "lora.safetensors"))
            _write_json(
                os.path.join(staging, "finetune.json"),
                {
                    "base_preset": args.preset,
                    "lora_rank": args.lora_rank,
                    "lora_alpha": args.lora_alpha or args.lora_rank,
                    "lora_targets": list(targets),
                    "losses": losses,
                },
            )
        print(
            f"Wrote LoRA adapters to {args.output}; use them with --preset {args.preset} --lora {args.output}."
        )
    else:
        if args.lora_rank:
            lm.merge_lora()
        lm.save_to_preset(output)
        print(f"Wrote {args.output}; use it with --preset {args.output}.")
    print(f"loss per epoch: {losses}")


# === evaluate ===


def _evaluate(args):
    import numpy as np

    from keras_paligemma2.apps import evaluation
    from keras_paligemma2.utils.jsonl import read_jsonl

    data = read_jsonl(args.data, need_suffix=False)
    mask_decoder = true_masks = None
    if "mask_miou" in args.metric:
        true_masks = _true_masks(args, data)
        from keras_paligemma2.layers.vq_vae import MaskDecoder

        mask_decoder = MaskDecoder.from_checkpoint(args.mask_decoder)
    items = list(zip(data["images"], data["prompts"]))
    if args.from_predictions:
        from keras_paligemma2.apps.prediction import read_predictions

        predictions = read_predictions(args.from_predictions, data["ids"], args.data)
    else:
        lm = _load(args)
        predictions = []
        with _progress(len(items), "evaluating", quiet=args.json) as bar:
            for chunk in _batches(items, args.batch_size):
                predictions += lm.generate(
                    {"images": [c[0] for c in chunk], "prompts": [c[1] for c in chunk]},
                    **_sampling(args),
                )
                bar.update(len(chunk))
    results = {
        m: float(np.mean(evaluation.mask_ious(predictions, true_masks, mask_decoder)))
        if m == "mask_miou"
        else evaluation.score(m, predictions, data["answers"])
        for m in args.metric
    }
    if args.predictions:
        _write_json(
            args.predictions,
            [
                {"image": i, "prefix": p, "prediction": y, "answers": a}
                for i, p, y, a in zip(data["images"], data["prompts"], predictions, data["answers"])
            ],
        )
    if args.json:
        print(json.dumps({"examples": len(items), **results}))
    else:
        for metric, value in results.items():
            print(f"{metric}: {value:.4f} on {len(items)} examples")


# === predict ===


def _predict(args):
    import jax
    import keras

    from keras_paligemma2.apps import prediction

    if args.distributed:
        jax.distributed.initialize()  # the cluster's own settings (Cloud TPU, SLURM, ...)
    requests = prediction.read_requests(args.data, args.images, args.prompt)
    if os.path.dirname(os.path.abspath(args.output)):
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    done = prediction.written_ids(args.output)
    left = sum(r["id"] not in done for r in requests)
    if jax.process_count() > 1:
        left = len(requests)  # other processes' parts are read by predict; all must take part
    devices = jax.local_devices()
    split = left and len(devices) > 1 and args.batch_size % len(devices) == 0
    # Every local device decodes its share of each batch.
    scope = (
        keras.distribution.DataParallel(devices=devices).scope()
        if split
        else contextlib.nullcontext()
    )
    with scope, _progress(left, "predicting") as bar:
        lm = _load(args) if left else None
        summary = (
            prediction.predict(
                lm, requests, args.output, args.batch_size, on_batch=bar.update, **_sampling(args)
            )
            if left
            else {"predicted": 0, "skipped": len(requests), "seconds": 0.0}
        )
    rate = summary["predicted"] / summary["seconds"] if summary["seconds"] else 0.0
    where = f" on {len(devices)} devices" if split else ""
    print(
        f"{summary['predicted']} predicted ({rate:.1f} examples/s{where}), {summary['skipped']} "
        f"already in {args.output}"
    )


def _true_masks(args, data):
    """Every line's mask as a boolean array the size of its image, read
    before the model loads, so a bad line fails fast."""
    import numpy as np
    import PIL.Image

    if not args.mask_decoder:
        raise UserError("--metric mask_miou needs --mask-decoder (big_vision's vae-oid.npz).")
    masks = []
    for number, (image, mask) in enumerate(zip(data["images"], data["masks"]), 1):
        if mask is None:
            raise UserError(
                f"{args.data} example {number}: --metric mask_miou needs a 'mask' image on every line."
            )
        try:
            with PIL.Image.open(image) as picture:
                size = picture.size
            with PIL.Image.open(mask) as picture:
                pixels = np.asarray(picture.convert("L")) > 0
        except (OSError, ValueError) as error:
            raise UserError(f"{args.data} example {number}: cannot read {error}.") from None
        if pixels.shape[::-1] != size:
            raise UserError(
                f"{args.data} example {number}: mask {mask!r} is {pixels.shape[1]}x{pixels.shape[0]}, "
                f"its image {size[0]}x{size[1]}; they must be the same size."
            )
        masks.append(pixels)
    return masks


# === convert ===


def _convert(args):
    from keras_paligemma2.models.causal_lm import PaliGemma2CausalLM

    destination = os.path.abspath(args.destination)
    if args.to == "big_vision":
        if not destination.endswith(".npz"):
            raise UserError(f"A big_vision checkpoint is an .npz file; got {args.destination!r}.")
        if os.path.exists(destination) and not args.overwrite:
            raise UserError(f"{args.destination} exists; pass --overwrite to replace it.")
        overrides = {"dtype": args.dtype} if args.dtype else {}
        lm = PaliGemma2CausalLM.from_preset(args.source, source=args.from_source, **overrides)
        os.makedirs(os.path.dirname(destination), exist_ok=True)
        lm.save_to_big_vision(destination)
        print(
            f"Wrote {destination}: a big_vision checkpoint in "
            f"{lm.backbone.dtype_policy.name} (paligemma.load reads it)."
        )
        return
    if os.path.exists(destination) and os.listdir(destination) and not args.overwrite:
        raise UserError(
            f"{args.destination} exists and is not empty; pass --overwrite to "
            "replace it (the old one is kept until the new one is complete)."
        )
    overrides = {"dtype": args.dtype} if args.dtype else {}
    lm = PaliGemma2CausalLM.from_preset(args.source, source=args.from_source, **overrides)
    if args.to == "transformers":
        lm.save_to_transformers(destination, max_shard_size=args.max_shard_size)
        print(
            f"Wrote {destination}: a transformers PaliGemmaForConditionalGeneration in "
            f"{lm.backbone.dtype_policy.name}"
            + (" with its tokenizer." if lm.preprocessor is not None else " (no tokenizer).")
        )
        return
    lm.save_to_preset(destination, max_shard_size=args.max_shard_size)
    backbone = lm.backbone
    count = backbone.count_params()
    print(
        f"Wrote {destination}: {count:,} parameters in "
        f"{backbone.dtype_policy.name}; load it with "
        f"PaliGemma2CausalLM.from_preset({args.destination!r})."
    )


# === plan ===


def _plan(args):
    from keras_paligemma2 import distribution as dist
    from keras_paligemma2.checkpoints.presets import preset_config

    config = preset_config(args.model)
    meshes = dist.meshes(args.devices, args.batch_size)
    if not meshes:
        raise UserError(
            f"No (data, model) mesh of {args.devices} devices has a data axis dividing batch {args.batch_size}."
        )
    budget = args.device_memory * 2**30 * args.headroom if args.device_memory else None
    gib = 2**30
    print(
        f"{args.mode}, batch {args.batch_size}, {args.sequence_length} text tokens, {args.dtype}"
        + (f", remat {args.remat}" if args.remat else "")
        + (f", {args.quantization} base" if args.quantization else "")
        + (f", loss in chunks of {args.loss_chunk_size}" if args.loss_chunk_size else "")
        + f"; GiB per device on {args.devices} device(s)"
    )
    print(
        "| mesh (data x model) | parameters | gradients | optimizer | activations | KV cache | total |"
        + (" fits |" if budget else "")
    )
    print("|---" * (7 + bool(budget)) + "|")
    chosen = None
    for shape in meshes:
        p = dist.plan(
            config,
            shape,
            args.mode,
            args.batch_size,
            args.sequence_length,
            args.dtype,
            **_plan_options(args),
        )
        fits = budget is not None and p.total <= budget
        if fits and chosen is None:
            chosen = shape
        cells = [p.parameters, p.gradients, p.optimizer_state, p.activations, p.kv_cache, p.total]
        row = f"| {shape[0]} x {shape[1]} | " + " | ".join(f"{c / gib:.2f}" for c in cells) + " |"
        if budget:
            row += (" chosen |" if shape == chosen else " yes |") if fits else " no |"
        print(row)
    if budget and chosen is None:
        ways = _what_would_fit(dist, config, meshes, args, budget)
        print(
            f"Nothing fits {args.headroom:.0%} of {args.device_memory} GiB per device. "
            + (f"What would: {'; '.join(ways)}." if ways else "More devices.")
        )


def _plan_options(args, **changes):
    options = dict(
        lora_rank=args.lora_rank,
        remat=args.remat,
        max_new_tokens=args.max_new_tokens,
        quantization=args.quantization,
        loss_chunk_size=args.loss_chunk_size,
        mu_dtype=args.mu_dtype,
    )
    options.update(changes)
    return options


def _what_would_fit(dist, config, meshes, args, budget):
    """The smallest changes of the request, one lever at a time and then
    together, that fit `budget` bytes on some mesh of these devices."""
    training = args.mode != "inference"
    levers = []
    if training:
        levers += [
            ("--remat", dict(remat="block")),
            ("--loss-chunk-size 128", dict(loss_chunk_size=128)),
        ]
    if args.mode != "full":
        levers += [("--quantization int8", dict(quantization="int8"))]
        levers += [("--quantization int4", dict(quantization="int4"))]
    if args.mode == "full":
        levers += [("--mode lora", dict(mode="lora"))]
    combined = {k: v for _, change in levers for k, v in change.items() if k != "quantization"}
    if args.mode != "full":
        combined["quantization"] = "int4"
    if len(levers) > 1:
        levers.append((" ".join(name for name, _ in levers if "int8" not in name), combined))

    def fits(batch, change):
        change = dict(change)
        mode = change.pop("mode", args.mode)
        return any(
            dist.plan(
                config,
                shape,
                mode,
                batch,
                args.sequence_length,
                args.dtype,
                **_plan_options(args, **change),
            ).total
            <= budget
            for shape in dist.meshes(args.devices, batch)
        )

    ways = [name for name, change in levers if fits(args.batch_size, change)]
    for name, change in [("as asked", {})] + levers:
        batch = args.batch_size // 2
        while batch >= 1 and not fits(batch, change):
            batch //= 2
        if batch >= 1:
            ways.append(f"batch {batch}" + ("" if name == "as asked" else f" with {name}"))
            break
    return ways


# === Parser ===


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_paligemma2",
        description="PaliGemma 2 in Keras 3 (JAX): generate, fine-tune, evaluate, convert, plan.",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="show TensorFlow / absl / XLA start-up logs (hidden by default)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")

    generate = commands.add_parser(
        "generate",
        help="answer prompts about images",
        description="Answer prompts about images. Detection and segmentation answers are parsed into pixel boxes "
        "(and masks, with --mask-decoder) and drawn onto a copy of the image.",
    )
    _add_model_arguments(generate)
    generate.add_argument(
        "--image", action="append", required=True, help="image file (repeat for several)"
    )
    generate.add_argument(
        "--prompt",
        action="append",
        required=True,
        help="e.g. 'caption en', 'answer en what is this?', 'detect cat ; dog', 'segment cat', "
        "'ocr' (one for all images, one per image, or several about one image)",
    )
    _add_sampling_arguments(generate)
    generate.add_argument(
        "--batch-size", type=int, default=8, help="examples per generate call (default 8)"
    )
    generate.add_argument("--json", action="store_true", help="print the results as JSON")
    generate.add_argument(
        "--annotate-dir",
        default=".",
        help="where to write IMAGE_annotated.png for detect/segment prompts (default: here); "
        "'' writes none",
    )
    generate.add_argument(
        "--mask-decoder", help="big_vision's vae-oid.npz, to turn <seg> codes into masks"
    )
    generate.set_defaults(run=_generate)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune on a JSONL data set (LoRA or full)",
        description='Fine-tune on JSON Lines of {"image": path, "prefix": prompt, "suffix": response} '
        "(big_vision's colab format; image paths relative to the file). With --lora-rank, writes the adapters "
        "(or, with --merge, the merged model); else trains per --recipe and writes a preset.",
    )
    _add_model_arguments(finetune)
    finetune.add_argument("--data", required=True, help="training JSONL file")
    finetune.add_argument("--validation-data", help="JSONL file for the validation loss")
    finetune.add_argument("--output", required=True, help="directory to write the result to")
    finetune.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    finetune.add_argument(
        "--lora-rank", type=int, help="LoRA rank (default 8, or no LoRA with --recipe); 0: no LoRA"
    )
    finetune.add_argument("--lora-alpha", type=float, help="LoRA alpha (default: the rank)")
    finetune.add_argument(
        "--lora-targets",
        default="attention,mlp",
        help="comma-separated: attention, mlp, vit_attention, vit_mlp, image_projection",
    )
    finetune.add_argument(
        "--merge", action="store_true", help="fold the adapters in and write a full preset"
    )
    finetune.add_argument(
        "--recipe",
        choices=["attention_only", "decoder_only", "all"],
        help="full fine-tuning (no LoRA) of: attention only (big_vision's colab), the "
        "decoder only, or all weights",
    )
    finetune.add_argument("--epochs", type=int, default=1)
    finetune.add_argument("--batch-size", type=int, default=8)
    finetune.add_argument(
        "--learning-rate",
        type=float,
        default=3e-5,
        help="peak of big_vision's cosine schedule (default 3e-5)",
    )
    finetune.add_argument(
        "--sequence-length", type=int, help="text tokens per example (default: the preset's)"
    )
    finetune.add_argument(
        "--checkpoint-dir", help="checkpoint every epoch here; a rerun resumes from it"
    )
    finetune.add_argument(
        "--checkpoint-every",
        type=int,
        help="with --checkpoint-dir, also checkpoint every N batches (a rerun resumes mid-epoch)",
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument(
        "--quiet-progress", action="store_true", help="one line per epoch, no progress bar"
    )
    finetune.set_defaults(run=_finetune)

    evaluate = commands.add_parser(
        "evaluate",
        help="score a model on a JSONL data set",
        description="Generate for every line of a JSONL data set (or read what `predict` wrote for "
        "it, --from-predictions) and score against its suffix (or its 'answers' list).",
    )
    _add_model_arguments(evaluate)
    evaluate.add_argument("--data", required=True, help="JSONL file")
    evaluate.add_argument(
        "--metric",
        action="append",
        choices=[
            "exact_match",
            "vqa_accuracy",
            "relaxed_accuracy",
            "anls",
            "cider",
            "box_iou",
            "coco_map",
            "coco_ap50",
            "mask_miou",
        ],
        help="repeat for several (default exact_match); mask_miou needs --mask-decoder and a 'mask' image per line",
    )
    evaluate.add_argument(
        "--mask-decoder", help="big_vision's vae-oid.npz (for --metric mask_miou)"
    )
    _add_sampling_arguments(evaluate)
    evaluate.add_argument("--batch-size", type=int, default=16)
    evaluate.add_argument("--predictions", help="also write every prediction to this JSON file")
    evaluate.add_argument(
        "--from-predictions",
        help="score the results `predict` wrote to this JSONL file (matched to --data by 'id') "
        "instead of generating; no model is loaded",
    )
    evaluate.add_argument("--json", action="store_true", help="print the scores as JSON")
    evaluate.set_defaults(run=_evaluate)

    predict = commands.add_parser(
        "predict",
        help="predict over a JSONL file or an image glob, resumable",
        description='Generate for every {"id", "image", "prefix"} line of a JSONL file (or every file '
        "of --images with one --prompt), in batches of similar prompt length, appending each "
        "batch's results to --output (flushed); a rerun skips ids already there. Detection and "
        "segmentation answers come with pixel boxes and labels.",
    )
    _add_model_arguments(predict)
    predict.add_argument("--data", help="JSONL file of requests")
    predict.add_argument("--images", help="image glob, e.g. 'photos/*.jpg' (with --prompt)")
    predict.add_argument("--prompt", help="the prompt for every --images file")
    predict.add_argument("--output", required=True, help="JSONL file of results (appended to)")
    predict.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="examples per generate call (default 16); split over the local devices when it "
        "divides by their number",
    )
    predict.add_argument(
        "--distributed",
        action="store_true",
        help="call jax.distributed.initialize() first: each process of the job decodes its "
        "share, and the results are merged into --output",
    )
    _add_sampling_arguments(predict)
    predict.set_defaults(run=_predict)

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
    convert.add_argument(
        "--dtype", help="variable dtype, e.g. bfloat16 or float32 (default: float32)"
    )
    _add_source_argument(convert)
    convert.add_argument(
        "--max-shard-size",
        type=float,
        default=2,
        help="split weight files above this many GB (default 2)",
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    convert.add_argument(
        "--to",
        choices=["keras", "big_vision", "transformers"],
        default="keras",
        help="keras (default): a Keras preset directory; big_vision: a big_vision .npz file; "
        "transformers: a PaliGemmaForConditionalGeneration directory (with its tokenizer)",
    )
    convert.set_defaults(run=_convert)

    plan = commands.add_parser(
        "plan",
        help="per-device memory of a job on every mesh of N devices",
        description="The memory planner (keras_paligemma2.distribution.plan): bytes per device of parameters, "
        "gradients, optimizer state, activations and KV cache on every (data, model) mesh of --devices devices; "
        "with --device-memory, which fit and which auto_distribution would choose.",
    )
    plan.add_argument("model", help="preset name (e.g. pg2_10b_224) or Keras preset directory")
    plan.add_argument("--devices", type=int, default=1)
    plan.add_argument(
        "--device-memory", type=float, help="GiB per device (e.g. 16 for TPU v5e, 80 for H100)"
    )
    plan.add_argument(
        "--headroom", type=float, default=0.9, help="usable fraction of device memory (default 0.9)"
    )
    plan.add_argument("--mode", choices=["inference", "lora", "full"], default="inference")
    plan.add_argument("--batch-size", type=int, default=8)
    plan.add_argument(
        "--sequence-length", type=int, default=64, help="text tokens per example (default 64)"
    )
    plan.add_argument(
        "--max-new-tokens", type=int, default=64, help="inference: tokens to generate (default 64)"
    )
    plan.add_argument(
        "--dtype", choices=["bfloat16", "float32", "mixed_bfloat16"], default="bfloat16"
    )
    plan.add_argument("--lora-rank", type=int, default=8)
    plan.add_argument(
        "--remat",
        nargs="?",
        const="block",
        default=False,
        choices=["block", "matmuls"],
        help="training recomputes each block in the backward pass ('block', the default when "
        "given; 'matmuls' keeps the projections' outputs)",
    )
    plan.add_argument(
        "--quantization", choices=["int8", "int4"], help="the decoder's kernels quantised"
    )
    plan.add_argument(
        "--loss-chunk-size", type=int, help="training: the loss's logits this many tokens at a time"
    )
    plan.add_argument("--mu-dtype", choices=["bfloat16"], help="Adam's first moment stored so")
    plan.set_defaults(run=_plan)
    return parser


def main(argv=None):
    """Runs one command line; returns the exit status: 0, 2 on a user error
    (one line on stderr), 1 on anything else (a bug: its traceback).

    Args:
        argv: list of str, the arguments after the program name; None reads
            `sys.argv[1:]`.
    """
    args = build_parser().parse_args(argv)
    if getattr(args, "metric", "unset") is None:
        args.metric = ["exact_match"]
    if getattr(args, "annotate_dir", None) == "":
        args.annotate_dir = None
    with _native_logs_hidden(not args.verbose):
        from keras_paligemma2.utils.errors import InputError

        try:
            args.run(args)
        except (
            UserError,
            InputError,
            FileNotFoundError,
            IsADirectoryError,
            PermissionError,
        ) as error:
            # One line, all of it: a checkpoint mismatch lists every bad key.
            message = " ".join(str(error).split()) or type(error).__name__
            print(f"error: {message}", file=sys.stderr)
            return 2
        except Exception:
            traceback.print_exc()
            print(
                "This is a bug in keras-paligemma2, not a mistake in the command line: please "
                "report it with the command and the traceback above.",
                file=sys.stderr,
            )
            return 1
    return 0


@contextlib.contextmanager
def _native_logs_hidden(hide):
    """While the command runs (when `hide`), file descriptor 2 goes to
    /dev/null and Python's `sys.stderr` to a copy of the real one: what
    TensorFlow, absl, XLA and SentencePiece log from C++ (CUDA probes on
    CPU machines, oneDNN notes) is dropped; our messages, warnings and
    tracebacks still show. A `sys.stderr` someone replaced (a test's
    capture) is left as it is."""
    if not hide:
        yield
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stderr.flush()
    saved = os.dup(2)
    python_stderr = sys.stderr
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
    if sys.stderr is sys.__stderr__:
        sys.stderr = os.fdopen(os.dup(saved), "w", buffering=1)
    try:
        yield
    finally:
        sys.stderr.flush()
        if sys.stderr is not python_stderr:
            sys.stderr.close()
            sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)

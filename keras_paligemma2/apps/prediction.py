"""Prediction over a data set: the job after fine-tuning.

Requests are `{"id", "image", "prefix"}` (JSON Lines, or every file of an
image glob with one prompt). They are decoded in batches of similar prompt
length (`generate` pads a batch to its longest prompt), in an order fixed by
the requests alone, and each batch's results are appended to the output
JSON Lines file in one write, flushed and synced before the next batch
starts. A run that stops (a crash, a pre-empted machine, Ctrl-C) loses at
most the batch in flight: run it again with the same output and it skips
the ids already written (a line cut short by the stop is dropped first).
Detection and segmentation answers are parsed into pixel boxes and labels.

    {"id": "0001", "image": "img/0001.png", "prefix": "detect cat ; dog"}
"""

import glob
import json
import os
import time

import jax
from jax.experimental import multihost_utils

from keras_paligemma2.models.generation import data_parallel_size
from keras_paligemma2.models.task_outputs import parse_detections
from keras_paligemma2.preprocessing.image_converter import to_rgb_array
from keras_paligemma2.utils.errors import InputError
from keras_paligemma2.utils.jsonl import DataError
from keras_paligemma2.utils.jsonl import read_jsonl


def read_requests(path=None, image_glob=None, prompt=None):
    """The prediction requests of a JSON Lines file or of an image glob.

    Args:
        path: str or path-like, a `.jsonl` file of `{"id", "image",
            "prefix"}` lines (ids: strings or integers, each once); or None.
        image_glob: str, e.g. "photos/*.jpg", with `prompt`; each file one
            request, its path the id, in sorted order; or None.
        prompt: str, the prompt for every file of `image_glob`.

    Returns:
        A list of dicts `{"id", "image" (absolute path), "prefix"}`.
    """
    if (path is None) == (image_glob is None):
        raise InputError("Give a JSONL file of requests or an image glob with a prompt, not both.")
    if image_glob is not None:
        if not prompt:
            raise InputError("An image glob needs the prompt to ask about every image.")
        files = sorted(f for f in glob.glob(image_glob, recursive=True) if os.path.isfile(f))
        if not files:
            raise InputError(f"No image files match {image_glob!r}.")
        return [{"id": f, "image": os.path.abspath(f), "prefix": prompt} for f in files]
    data = read_jsonl(path, need_suffix=False)
    seen = set()
    for number, request_id in enumerate(data["ids"], 1):
        if not isinstance(request_id, (str, int)) or isinstance(request_id, bool):
            raise DataError(
                f"{path}: example {number} has no 'id' (a string or an integer): prediction "
                "needs one per line, to write each result once and resume."
            )
        if request_id in seen:
            raise DataError(f"{path}: id {request_id!r} appears twice.")
        seen.add(request_id)
    return [
        {"id": i, "image": image, "prefix": prefix}
        for i, image, prefix in zip(data["ids"], data["images"], data["prompts"])
    ]


def written_ids(output, repair=True):
    """The ids already in `output`; a last line cut short (a run stopped in
    the middle of a write) is removed from the file first (or, with
    `repair=False`, only left out).

    Args:
        output: str or path-like, the results file; it may not exist yet.
        repair: bool; False leaves the file alone (another process's part file).
    """
    output = os.fspath(output)
    if not os.path.exists(output):
        return set()
    with open(output, "rb") as f:
        content = f.read()
    complete = content[: content.rfind(b"\n") + 1]
    if len(complete) != len(content) and repair:
        with open(output, "r+b") as f:
            f.truncate(len(complete))
    ids = set()
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if line.strip():
            try:
                ids.add(json.loads(line)["id"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{output} line {number} is not a result this command wrote; give a new "
                    "output file or remove that line."
                ) from None
    return ids


def read_predictions(output, ids, data_path="the data"):
    """The predictions `predict` wrote to `output`, in the order of `ids`.

    Args:
        output: str or path-like, a results file of `predict`.
        ids: list of the data set's ids (its lines' "id"), one per example.
        data_path: str, the data set's name in error messages.

    Returns:
        A list of str, one prediction per id.
    """
    if any(i is None for i in ids):
        raise DataError(
            f"{data_path} has lines without an 'id': predictions are matched to examples by id."
        )
    written = {}
    with open(output, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                result = json.loads(line)
                written[result["id"]] = result["prediction"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(
                    f"{output} line {number} is not a result `predict` wrote (an 'id' and a "
                    "'prediction')."
                ) from None
    missing = [i for i in ids if i not in written]
    if missing:
        raise DataError(
            f"{len(missing)} of {len(ids)} examples of {data_path} have no prediction in "
            f"{output} (e.g. ids {missing[:3]}); run predict on them first (it resumes)."
        )
    return [written[i] for i in ids]


def batches_by_length(requests, batch_size, prompt_length):
    """Requests in batches of up to `batch_size` of similar prompt length:
    ordered by length, then by their order in `requests` (the same order
    every run).

    Args:
        requests: list of request dicts.
        batch_size: int >= 1.
        prompt_length: function from a prompt to its token count.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1; got {batch_size}.")
    order = sorted(range(len(requests)), key=lambda i: (prompt_length(requests[i]["prefix"]), i))
    ordered = [requests[i] for i in order]
    return [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]


def predict(lm, requests, output, batch_size=16, on_batch=None, **generate_kwargs):
    """Runs `lm.generate` over `requests`, appending results to `output`.

    Each result line: `id`, `image`, `prefix`, `prediction` (the reply),
    and for "detect" / "segment" prompts `objects`: `box` (y_min, x_min,
    y_max, x_max in the image's pixels) and `label` (plus `codes`, the 16
    `<seg>` ids, for segmentation).

    Data-parallel: under a Keras distribution with a batch axis (e.g.
    `keras.distribution.DataParallel(devices=jax.local_devices())`, set before
    the model is loaded) each batch is split over its devices, the last
    one padded to a multiple of them. Under `jax.distributed` with several
    processes, each process decodes every `process_count`-th batch into its
    own part file `output.part-P-of-N` (resumable alone), and once all are
    done process 0 appends the parts to `output` and removes them: one merged
    file, each id once. Every process must see the same `output` path
    (shared storage) and call this with the same requests.

    Args:
        lm: a `PaliGemma2CausalLM` with its preprocessor.
        requests: list of `{"id", "image", "prefix"}` (`read_requests`).
        output: str or path-like, the JSON Lines file to append to; ids
            already in it are skipped.
        batch_size: int, requests per `generate` call (default 16).
        on_batch: None, or a function called with each batch's size after
            its results are written (a progress bar).
        **generate_kwargs: passed to `generate` (`max_new_tokens`,
            `temperature`, ...).

    Returns:
        dict: `predicted` (by this process) and `skipped` counts, `seconds`,
        `examples_per_second`.
    """
    output = os.fspath(output)
    index, count = jax.process_index(), jax.process_count()
    own = output if count == 1 else f"{output}.part-{index:05d}-of-{count:05d}"
    done = written_ids(output) | written_ids(own)
    for part in _parts(output, count):
        if part != own:
            done |= written_ids(part, repair=False)
    if count > 1:  # every process has read what is done before any writes
        multihost_utils.sync_global_devices("keras_paligemma2 predict: read")
    pending = [r for r in requests if r["id"] not in done]
    lengths = {}

    def prompt_length(prompt):
        if prompt not in lengths:
            lengths[prompt] = len(lm.preprocessor.prompt_ids(prompt))
        return lengths[prompt]

    ways = data_parallel_size()
    batches = batches_by_length(pending, batch_size, prompt_length)[index::count]
    start = time.perf_counter()
    with open(own, "a", encoding="utf-8") as out:
        for batch in batches:
            images = [to_rgb_array(r["image"], r["id"]) for r in batch]
            prompts = [r["prefix"] for r in batch]
            # Rows past the batch (copies of its last) make it divide over the devices.
            extra = -len(batch) % ways
            replies = lm.generate(
                {"images": images + images[-1:] * extra, "prompts": prompts + prompts[-1:] * extra},
                **generate_kwargs,
            )[: len(batch)]
            lines = [
                json.dumps(_result(request, image, reply)) + "\n"
                for request, image, reply in zip(batch, images, replies)
            ]
            out.write("".join(lines))
            out.flush()
            os.fsync(out.fileno())
            if on_batch is not None:
                on_batch(len(batch))
    seconds = time.perf_counter() - start
    predicted = sum(len(b) for b in batches)
    if count > 1:
        multihost_utils.sync_global_devices("keras_paligemma2 predict: written")
        if index == 0:
            _merge(output, _parts(output, count))
        multihost_utils.sync_global_devices("keras_paligemma2 predict: merged")
    return {
        "predicted": predicted,
        "skipped": len(requests) - len(pending),
        "seconds": seconds,
        "examples_per_second": predicted / seconds if seconds > 0 else 0.0,
    }


def _parts(output, count):
    return [f"{output}.part-{i:05d}-of-{count:05d}" for i in range(count)] if count > 1 else []


def _merge(output, parts):
    """Appends the parts' results to `output` (those not already there, in part order),
    synced, then removes the parts: a crash in between leaves parts a rerun merges again."""
    present = written_ids(output)
    with open(output, "a", encoding="utf-8") as out:
        for part in parts:
            if not os.path.exists(part):
                continue
            written_ids(part)  # drops a line cut short
            with open(part, encoding="utf-8") as f:
                lines = [line for line in f if line.strip()]
            out.write("".join(line for line in lines if json.loads(line)["id"] not in present))
            out.flush()
            os.fsync(out.fileno())
            present |= {json.loads(line)["id"] for line in lines}
    for part in parts:
        if os.path.exists(part):
            os.remove(part)


def _result(request, image, reply):
    result = {**request, "prediction": reply}
    if request["prefix"].startswith(("detect", "segment")):
        result["objects"] = [
            {
                "box": [round(float(v), 2) for v in o["box"]],
                "label": o["label"],
                **({"codes": o["codes"]} if "codes" in o else {}),
            }
            for o in parse_detections(reply, image.shape[:2])
        ]
    return result

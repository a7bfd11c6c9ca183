"""Data sets as JSON Lines, the format of big_vision's fine-tuning colab.

One object per line: `image` (a path, relative to the file's directory
unless absolute), `prefix` (the prompt) and `suffix` (the response). For
evaluation, `answers` (a list of accepted answers, e.g. VQA's ten) may
replace or accompany `suffix`.

    {"image": "img/0001.png", "prefix": "caption en", "suffix": "a red circle"}
"""

import json
import os

from keras_paligemma2.utils.errors import InputError


class DataError(InputError):
    """A data set line that cannot be used; the message names file and line."""


def read_jsonl(path, need_suffix=True):
    """Every example of `path`, checked before any is used.

    Args:
        path: str or path-like, the `.jsonl` file; relative image paths are read from its
            directory.
        need_suffix: bool; True (default) requires a string `suffix` on lines without
            `answers`; False (prompts only, e.g. for prediction) makes it optional.

    Returns:
        A dict of lists: `images` (absolute paths), `prompts`, `responses`
        (the suffix, or "" when absent), `answers` (lists of strings),
        `masks` (absolute path of the line's optional "mask" image, whose
        non-zero pixels are the object, for segmentation scores; else None)
        and `ids` (the line's optional "id", else None).

    Raises:
        DataError naming the first bad line: not JSON, not an object, a
        missing or non-string field, an image file that does not exist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"No data set file {path!r}.")
    base = os.path.dirname(os.path.abspath(path))
    data = {"images": [], "prompts": [], "responses": [], "answers": [], "masks": [], "ids": []}
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{path} line {number}"
            try:
                example = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{where}: not JSON ({error.msg}).") from None
            if not isinstance(example, dict):
                raise DataError(f"{where}: expected an object with image, prefix and suffix.")
            needed = ("image", "prefix") + (
                ("suffix",) if need_suffix and "answers" not in example else ()
            )
            for key in needed:
                if not isinstance(example.get(key), str):
                    problem = "missing" if key not in example else "not a string"
                    raise DataError(f"{where}: {key!r} is {problem}.")
            answers = example.get("answers", [example["suffix"]] if "suffix" in example else [])
            if not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
                raise DataError(f"{where}: 'answers' must be a list of strings.")
            image = os.path.join(base, example["image"])
            if not os.path.isfile(image):
                raise DataError(f"{where}: no image file {example['image']!r} (looked in {base}).")
            mask = example.get("mask")
            if mask is not None:
                if not isinstance(mask, str):
                    raise DataError(f"{where}: 'mask' must be an image file name.")
                mask = os.path.join(base, mask)
                if not os.path.isfile(mask):
                    raise DataError(
                        f"{where}: no mask file {example['mask']!r} (looked in {base})."
                    )
            data["masks"].append(mask)
            data["ids"].append(example.get("id"))
            data["images"].append(image)
            data["prompts"].append(example["prefix"])
            data["responses"].append(example.get("suffix", ""))
            data["answers"].append(answers)
    if not data["prompts"]:
        raise DataError(f"{path} holds no examples.")
    return data

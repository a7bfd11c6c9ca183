"""The synthetic shapes data set of `pg2_tiny_shapes`, and its accuracy measures.

Each image is 224 x 224 RGB on white with 1-3 non-overlapping filled shapes
(circle, square or upright triangle; red, green, blue or yellow; 40-80 px
across). Four tasks, in PaliGemma's prompt style:

- `caption en` -> the shapes left to right (by centre) as `colour shape`,
  joined by ` and ` (`red circle and blue square`);
- `detect circle` -> for each circle, left to right, its four `<loc>` tokens
  then `circle`, joined by ` ; ` (empty when there is none);
- `answer en how many squares?` -> `0` .. `3`;
- `answer en what color is the triangle?` -> the colour (asked only when
  exactly one triangle is present).

Everything is drawn from a seed, so a data set is reproducible.
"""

import numpy as np
import PIL.Image
import PIL.ImageDraw

from keras_paligemma2.apps.evaluation import box_iou  # noqa: F401 (part of this module's API)
from keras_paligemma2.apps.evaluation import match_boxes
from keras_paligemma2.models.task_outputs import format_detections
from keras_paligemma2.models.task_outputs import parse_detections

SIZE = 224
SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 200, 20),
}
MIN_SIDE, MAX_SIDE = 40, 80
TASKS = ("caption", "detect", "count", "colour")

# Every prompt and response word, for training the tokenizer.
VOCABULARY_TEXTS = (
    ["caption en", "detect", "answer en how many", "answer en what color is the", "and", ";"]
    + [f"{c} {s}" for c in COLOURS for s in SHAPES]
    + [f"answer en how many {s}s?" for s in SHAPES]
    + [f"answer en what color is the {s}?" for s in SHAPES]
    + [f"detect {s}" for s in SHAPES]
    + ["0", "1", "2", "3"]
)


def draw_scene(rng):
    """(uint8 image (224, 224, 3), objects): each object a dict with
    `shape`, `colour` and `box` (y_min, x_min, y_max, x_max) in pixels,
    sorted left to right by centre.

    Args:
        rng: `numpy.random.Generator`, the source of every random choice.
    """
    count = int(rng.integers(1, 4))
    objects = []
    while len(objects) < count:
        for _ in range(100):
            side = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            top = int(rng.integers(0, SIZE - side + 1))
            left = int(rng.integers(0, SIZE - side + 1))
            box = (top, left, top + side, left + side)
            # A 4 px gap keeps shapes apart (and their boxes too).
            if all(_apart(box, other["box"], 4) for other in objects):
                break
        else:
            break
        objects.append(
            {
                "shape": SHAPES[int(rng.integers(len(SHAPES)))],
                "colour": list(COLOURS)[int(rng.integers(len(COLOURS)))],
                "box": box,
            }
        )
    image = PIL.Image.new("RGB", (SIZE, SIZE), (255, 255, 255))
    pen = PIL.ImageDraw.Draw(image)
    for obj in objects:
        top, left, bottom, right = obj["box"]
        fill = COLOURS[obj["colour"]]
        if obj["shape"] == "circle":
            pen.ellipse((left, top, right - 1, bottom - 1), fill=fill)
        elif obj["shape"] == "square":
            pen.rectangle((left, top, right - 1, bottom - 1), fill=fill)
        else:
            pen.polygon(
                [((left + right - 1) / 2, top), (left, bottom - 1), (right - 1, bottom - 1)],
                fill=fill,
            )
    objects.sort(key=lambda o: (o["box"][1] + o["box"][3]) / 2)
    return np.asarray(image), objects


def _apart(a, b, gap):
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def caption(objects):
    """The `caption en` response: `colour shape` of each object, joined by " and ".

    Args:
        objects: list of object dicts as `draw_scene` gives (left to right).
    """
    return " and ".join(f"{o['colour']} {o['shape']}" for o in objects)


def detection(objects, shape):
    """The `detect {shape}` response: `<loc>` tokens and label of each such object.

    Args:
        objects: list of object dicts as `draw_scene` gives (left to right).
        shape: str, one of `SHAPES`.
    """
    found = [{"box": o["box"], "label": shape} for o in objects if o["shape"] == shape]
    return format_detections(found, image_size=(SIZE, SIZE))


def questions(objects):
    """Every (task, prompt, response) the scene supports.

    Args:
        objects: list of object dicts as `draw_scene` gives.
    """
    out = [("caption", "caption en", caption(objects))]
    for shape in SHAPES:
        same = [o for o in objects if o["shape"] == shape]
        out.append(("detect", f"detect {shape}", detection(objects, shape)))
        out.append(("count", f"answer en how many {shape}s?", str(len(same))))
        if len(same) == 1:
            out.append(("colour", f"answer en what color is the {shape}?", same[0]["colour"]))
    return out


def training_examples(count, seed, task_weights=None):
    """`count` examples as a dict of `images` (uint8 array), `prompts`,
    `responses` and `tasks`: per image one task, drawn with `task_weights`
    (default equal) among those the scene supports, then one of its
    questions uniformly.

    Args:
        count: int, the number of examples.
        seed: int or sequence of ints (what `numpy.random.default_rng` takes), the
            seed of the whole data set.
        task_weights: dict from task names (`TASKS`) to relative weights, or
            None; tasks left out weigh 1.0.
    """
    rng = np.random.default_rng(seed)
    weights = {t: (task_weights or {}).get(t, 1.0) for t in TASKS}
    images, prompts, responses, tasks = [], [], [], []
    for _ in range(count):
        image, objects = draw_scene(rng)
        options = questions(objects)
        present = sorted({t for t, _, _ in options}, key=TASKS.index)
        chance = np.array([weights[t] for t in present], np.float64)
        task = present[int(rng.choice(len(present), p=chance / chance.sum()))]
        same = [o for o in options if o[0] == task]
        _, prompt, response = same[int(rng.integers(len(same)))]
        images.append(image)
        prompts.append(prompt)
        responses.append(response)
        tasks.append(task)
    return {"images": np.stack(images), "prompts": prompts, "responses": responses, "tasks": tasks}


def evaluate(lm, count=300, seed=10_000, batch_size=64, max_new_tokens=24):
    """Held-out accuracy of `lm` on `count` fresh scenes (every question).

    Returns a dict: `caption` (exact match), `count`, `colour` (accuracy),
    `detection_recall` and `detection_precision` (a predicted box matches an
    unmatched true box of the asked shape at IoU >= 0.5, label included).

    Args:
        lm: a `PaliGemma2CausalLM` with a preprocessor (text in and out).
        count: int, the number of scenes (default 300).
        seed: int or sequence of ints, the scenes' seed (default 10,000).
        batch_size: int, prompts per `generate` call (default 64).
        max_new_tokens: int, the most tokens per reply (default 24).
    """
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        image, objects = draw_scene(rng)
        for task, prompt, response in questions(objects):
            items.append((task, image, prompt, response, objects))
    replies = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        replies += lm.generate(
            {"images": [i[1] for i in chunk], "prompts": [i[2] for i in chunk]},
            max_new_tokens=max_new_tokens,
        )
    hits = {"caption": [], "count": [], "colour": []}
    matched = predicted = true = 0
    for (task, _, prompt, response, objects), reply in zip(items, replies):
        if task != "detect":
            hits[task].append(reply.strip() == response)
            continue
        shape = prompt.split(" ", 1)[1]
        want = [{"box": o["box"], "label": shape} for o in objects if o["shape"] == shape]
        got = parse_detections(reply, (SIZE, SIZE))
        predicted += len(got)
        true += len(want)
        matched += match_boxes(got, want)
    result = {k: float(np.mean(v)) if v else 0.0 for k, v in hits.items()}
    result["detection_recall"] = matched / true if true else 1.0
    result["detection_precision"] = matched / predicted if predicted else 1.0
    return result

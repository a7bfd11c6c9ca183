"""The synthetic shapes data set and its accuracy measures."""

import numpy as np

from keras_paligemma2.apps import shapes
from keras_paligemma2.models.task_outputs import parse_detections


def test_scenes_follow_the_specification():
    rng = np.random.default_rng(0)
    for _ in range(50):
        image, objects = shapes.draw_scene(rng)
        assert image.shape == (224, 224, 3) and image.dtype == np.uint8
        assert 1 <= len(objects) <= 3
        centres = [(o["box"][1] + o["box"][3]) / 2 for o in objects]
        assert centres == sorted(centres)  # left to right
        painted = np.any(image != 255, axis=-1)
        covered = np.zeros_like(painted)
        for obj in objects:
            top, left, bottom, right = obj["box"]
            assert 40 <= bottom - top <= 80 and bottom - top == right - left
            region = painted[top:bottom, left:right]
            # The box is tight: the shape touches its bottom row and both sides.
            assert region[-1].any() and region[:, 0].any() and region[:, -1].any()
            assert tuple(image[top:bottom, left:right][region][0]) == shapes.COLOURS[obj["colour"]]
            covered[top:bottom, left:right] = True
        assert not (painted & ~covered).any()  # nothing drawn outside the boxes
        for i, a in enumerate(objects):
            for b in objects[i + 1 :]:
                assert shapes.box_iou(a["box"], b["box"]) == 0


def test_questions_and_answers():
    objects = [
        {"shape": "circle", "colour": "red", "box": (10, 10, 60, 60)},
        {"shape": "square", "colour": "blue", "box": (100, 80, 150, 130)},
        {"shape": "circle", "colour": "yellow", "box": (20, 150, 70, 200)},
    ]
    answers = {prompt: response for _, prompt, response in shapes.questions(objects)}
    assert answers["caption en"] == "red circle and blue square and yellow circle"
    assert answers["answer en how many circles?"] == "2"
    assert answers["answer en how many triangles?"] == "0"
    assert answers["answer en what color is the square?"] == "blue"
    assert "answer en what color is the circle?" not in answers  # two circles
    assert "answer en what color is the triangle?" not in answers  # none
    assert answers["detect triangle"] == ""
    found = parse_detections(answers["detect circle"], (224, 224))
    assert [o["label"] for o in found] == ["circle", "circle"]
    for got, want in zip(found, (objects[0]["box"], objects[2]["box"])):
        # Not roundoff: a box edge comes back as the nearest of 1024 <loc>
        # bins, 224 / 1023 px apart on this 224 px image.
        np.testing.assert_allclose(got["box"], want, atol=224 / 1023)


def test_training_examples_are_reproducible_and_cover_every_task():
    a = shapes.training_examples(40, seed=3)
    b = shapes.training_examples(40, seed=3)
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["prompts"] == b["prompts"] and a["responses"] == b["responses"]
    assert set(a["tasks"]) == set(shapes.TASKS)
    only = shapes.training_examples(
        10, seed=3, task_weights={"caption": 1, "detect": 0, "count": 0, "colour": 0}
    )
    assert set(only["prompts"]) == {"caption en"}


class _Oracle:
    """Answers by looking the scene up (drawn again from the same seed)."""

    def __init__(self, count, seed, wrong=()):
        rng = np.random.default_rng(seed)
        self.scenes = {}
        for _ in range(count):
            image, objects = shapes.draw_scene(rng)
            self.scenes[image.tobytes()] = objects
        self.wrong = wrong

    def generate(self, inputs, max_new_tokens):
        replies = []
        for image, prompt in zip(inputs["images"], inputs["prompts"]):
            answers = {p: r for t, p, r in shapes.questions(self.scenes[image.tobytes()])}
            task = next(
                t for t, p, _ in shapes.questions(self.scenes[image.tobytes()]) if p == prompt
            )
            replies.append("nonsense" if task in self.wrong else answers[prompt])
        return replies


def test_evaluate_scores_an_oracle_perfectly_and_a_wrong_model_at_zero():
    perfect = shapes.evaluate(_Oracle(20, 7), count=20, seed=7, batch_size=16)
    assert perfect == {
        "caption": 1.0,
        "count": 1.0,
        "colour": 1.0,
        "detection_recall": 1.0,
        "detection_precision": 1.0,
    }
    wrong = shapes.evaluate(_Oracle(20, 7, wrong=shapes.TASKS), count=20, seed=7)
    assert wrong["caption"] == wrong["count"] == wrong["colour"] == 0.0
    assert wrong["detection_recall"] == 0.0

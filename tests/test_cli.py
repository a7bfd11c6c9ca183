"""`python -m keras_paligemma2` commands, end to end."""

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.apps import evaluation
from keras_paligemma2.apps.cli import main
from keras_paligemma2.utils.tensor_files import read_npz_lazily


def test_convert_writes_a_preset_that_loads_bit_exactly(fixtures_dir, tmp_path, capsys):
    source = fixtures_dir / "bv_tiny" / "tiny.b16.npz"
    destination = tmp_path / "preset"
    assert main(["convert", str(source), str(destination), "--dtype", "bfloat16"]) == 0
    assert "Wrote" in capsys.readouterr().out
    lm = PaliGemma2CausalLM.from_preset(destination)
    embedding = np.asarray(lm.backbone.token_embedding.embeddings)
    want = read_npz_lazily(source)["params/llm/embedder/input_embedding"].read()
    np.testing.assert_array_equal(embedding.view(np.uint16), np.asarray(want).view(np.uint16))


def test_convert_refuses_to_overwrite_and_keeps_the_old_preset(fixtures_dir, tmp_path, capsys):
    destination = tmp_path / "preset"
    destination.mkdir()
    (destination / "precious.txt").write_text("mine")
    source = str(fixtures_dir / "bv_tiny" / "tiny_f32.npz")
    assert main(["convert", source, str(destination)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (destination / "precious.txt").read_text() == "mine"
    # A failing conversion with --overwrite leaves the old directory alone.
    assert main(["convert", str(tmp_path / "missing.npz"), str(destination), "--overwrite"]) == 2
    assert (destination / "precious.txt").exists()
    assert main(["convert", source, str(destination), "--overwrite"]) == 0
    assert not (destination / "precious.txt").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".preset.")]


def test_user_errors_are_one_line_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "keras_paligemma2", "convert", "pg2_3b_22", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "error: Unknown preset 'pg2_3b_22'" in result.stderr
    assert "Did you mean 'pg2_3b_224'" in result.stderr
    assert not (tmp_path / "x").exists()


# --- generate, finetune, evaluate, plan on a small task preset ---------------


# Every command runs on the shipped embedded model, as a user's would.
PRESET = "pg2_tiny_shapes"


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """A JSONL data set of 8 drawn scenes in big_vision's colab format."""
    from keras_paligemma2.apps import shapes

    root = tmp_path_factory.mktemp("cli")
    examples = shapes.training_examples(8, seed=3, task_weights={"detect": 0})
    (root / "img").mkdir()
    with open(root / "train.jsonl", "w") as f:
        for i, (image, prompt, response) in enumerate(
            zip(examples["images"], examples["prompts"], examples["responses"])
        ):
            PIL.Image.fromarray(image).save(root / "img" / f"{i}.png")
            f.write(
                json.dumps({"image": f"img/{i}.png", "prefix": prompt, "suffix": response}) + "\n"
            )
    return root


def test_generate_prints_and_writes_json_for_each_image(shapes_data, capsys):
    image = str(shapes_data / "img" / "0.png")
    args = [
        "generate",
        "--preset",
        PRESET,
        "--image",
        image,
        "--image",
        image,
        "--prompt",
        "caption en",
        "--max-new-tokens",
        "3",
        "--json",
    ]
    assert main(args) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["prompt"] for r in results] == ["caption en"] * 2
    assert results[0]["answer"] == results[1]["answer"] and isinstance(results[0]["answer"], str)


def test_generate_parses_and_draws_detections(shapes_data, tmp_path, capsys, monkeypatch):
    # The random model cannot detect: give it a known answer to check the
    # parsing into pixel boxes and the annotated picture.
    answer = "<loc0256><loc0512><loc0768><loc1023> circle"
    monkeypatch.setattr(
        PaliGemma2CausalLM, "generate", lambda self, inputs, **kw: [answer] * len(inputs["prompts"])
    )
    image = str(pathlib.Path(__file__).parents[1] / "examples" / "data" / "shapes.png")
    args = [
        "generate",
        "--preset",
        PRESET,
        "--image",
        image,
        "--prompt",
        "detect circle",
        "--annotate-dir",
        str(tmp_path),
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "detect circle -> " + answer in out
    assert "circle: box (y_min, x_min, y_max, x_max) (56.1, 112.1, 168.2, 224.0)" in out
    picture = np.asarray(PIL.Image.open(tmp_path / "shapes_annotated.png").convert("RGB"))
    original = np.asarray(PIL.Image.open(image).convert("RGB"))
    changed = np.argwhere((picture != original).any(-1))
    # The box outline and its label just above it, nowhere else.
    assert changed[:, 0].min() >= 40 and changed[:, 0].max() <= 170 and changed[:, 1].min() >= 110


def test_generate_refuses_bad_input_in_one_line(shapes_data, tmp_path, capsys):
    preset = PRESET
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert (
        main(["generate", "--preset", preset, "--image", str(text), "--prompt", "caption en"]) == 2
    )
    assert "Cannot read image 0" in capsys.readouterr().err
    image = str(shapes_data / "img" / "0.png")
    args = [
        "generate",
        "--preset",
        preset,
        "--image",
        image,
        "--image",
        image,
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--prompt",
        "c",
    ]
    assert main(args) == 2
    assert "got 3 prompts for 2 images" in capsys.readouterr().err


def test_finetune_lora_then_generate_and_evaluate_with_the_adapters(shapes_data, tmp_path, capsys):
    preset, data = PRESET, str(shapes_data / "train.jsonl")
    out = tmp_path / "adapters"
    args = [
        "finetune",
        "--preset",
        preset,
        "--data",
        data,
        "--output",
        str(out),
        "--lora-rank",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-2",
        "--quiet-progress",
        "--checkpoint-dir",
        str(tmp_path / "checkpoint"),
    ]
    assert main(args) == 0
    losses = json.loads((out / "finetune.json").read_text())["losses"]
    assert len(losses) == 2 and losses[1] < losses[0]
    assert (out / "lora.safetensors").is_file()
    # A rerun resumes from the checkpoint rather than starting over.
    assert main(args + ["--overwrite"]) == 0
    assert "Resumed from" in capsys.readouterr().out
    args = [
        "evaluate",
        "--preset",
        preset,
        "--lora",
        str(out),
        "--data",
        data,
        "--metric",
        "exact_match",
        "--metric",
        "anls",
        "--max-new-tokens",
        "6",
        "--json",
        "--predictions",
        str(tmp_path / "p.json"),
    ]
    assert main(args) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["examples"] == 8 and 0 <= scores["exact_match"] <= scores["anls"] <= 1
    assert len(json.loads((tmp_path / "p.json").read_text())) == 8


def test_finetune_names_the_bad_jsonl_line_and_writes_nothing(shapes_data, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    lines = (shapes_data / "train.jsonl").read_text().splitlines()
    lines[2] = lines[2].replace('"suffix"', '"answer"')
    bad.write_text("\n".join(lines))
    (tmp_path / "img").symlink_to(shapes_data / "img")
    args = ["finetune", "--preset", PRESET, "--data", str(bad), "--output", str(tmp_path / "o")]
    assert main(args) == 2
    assert f"{bad} line 3: 'suffix' is missing" in capsys.readouterr().err
    bad.write_text(lines[0] + "\n{not json\n")
    assert main(args) == 2
    assert "line 2: not JSON" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_plan_marks_what_fits_and_says_when_nothing_does(capsys):
    assert (
        main(["plan", "pg2_10b_224", "--devices", "8", "--device-memory", "16", "--mode", "lora"])
        == 0
    )
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "mesh" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["8 x 1", "4 x 2", "2 x 4", "1 x 8"]
    assert sum("chosen" in r for r in rows) == 1
    assert main(["plan", "pg2_28b_224", "--mode", "full", "--device-memory", "80"]) == 0
    assert "Nothing fits" in capsys.readouterr().out


def test_evaluate_scores_vqa_cider_and_masks_as_the_library(
    fixtures_dir, shapes_data, tmp_path, capsys, monkeypatch
):
    reference = np.load(fixtures_dir / "segmentation_big_vision_reference.npz")
    answers = [str(t) for t in reference["texts"]][:3]
    lines = []
    for i, answer in enumerate(answers):
        mask = reference[f"mask_{i}"]
        PIL.Image.new("RGB", mask.shape[::-1]).save(tmp_path / f"{i}.png")
        PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / f"{i}_mask.png")
        # The first example's annotators all gave the model's answer.
        references = [answer] * 4 if i == 0 else ["a thing", "the thing", "thing"]
        lines.append(
            {
                "image": f"{i}.png",
                "prefix": "segment thing",
                "mask": f"{i}_mask.png",
                "answers": references,
            }
        )
    data = tmp_path / "segment.jsonl"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    # The embedded model cannot segment: give it big_vision's reference answers.
    monkeypatch.setattr(
        PaliGemma2CausalLM, "generate", lambda self, inputs, **kw: answers[: len(inputs["prompts"])]
    )
    decoder = str(fixtures_dir / "vae_tiny" / "vae.npz")
    args = [
        "evaluate",
        "--preset",
        PRESET,
        "--data",
        str(data),
        "--metric",
        "mask_miou",
        "--metric",
        "vqa_accuracy",
        "--metric",
        "cider",
        "--mask-decoder",
        decoder,
        "--json",
    ]
    assert main(args) == 0
    scores = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert scores["mask_miou"] == pytest.approx(reference["ious"][:3].mean())
    assert scores["vqa_accuracy"] == pytest.approx(1 / 3)
    references = [line["answers"] for line in lines]
    assert (
        scores["cider"] == pytest.approx(evaluation.cider(answers, references)[0])
        and scores["cider"] > 0
    )
    # Without the decoder, a mask, or with a mask of the wrong size: one line, nothing run.
    assert main(args[:-3] + ["--json"]) == 2
    assert "--metric mask_miou needs --mask-decoder" in capsys.readouterr().err
    del lines[1]["mask"]
    data.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(args) == 2
    assert (
        "example 2: --metric mask_miou needs a 'mask' image on every line"
        in capsys.readouterr().err
    )
    lines[1]["mask"] = "0_mask.png"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(args) == 2
    error = capsys.readouterr().err
    assert "example 2: mask" in error and "must be the same size" in error
    lines[1]["mask"] = "missing.png"
    data.write_text("\n".join(json.dumps(line) for line in lines))
    assert main(args) == 2
    assert "line 2: no mask file 'missing.png'" in capsys.readouterr().err


def test_convert_and_plan_the_embedded_preset(tmp_path, capsys):
    destination = tmp_path / "tiny_bf16"
    assert main(["convert", PRESET, str(destination), "--dtype", "bfloat16"]) == 0
    original = PaliGemma2CausalLM.from_preset(PRESET)
    converted = PaliGemma2CausalLM.from_preset(str(destination))
    assert converted.backbone.token_embedding.embeddings.dtype == "bfloat16"
    want = np.asarray(original.backbone.token_embedding.embeddings).astype("bfloat16")
    np.testing.assert_array_equal(np.asarray(converted.backbone.token_embedding.embeddings), want)
    image = str(pathlib.Path(__file__).parents[1] / "examples" / "data" / "shapes.png")
    assert (
        main(
            [
                "generate",
                "--preset",
                str(destination),
                "--image",
                image,
                "--prompt",
                "caption en",
                "--json",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert (
        main(["plan", str(destination), "--devices", "2", "--device-memory", "1", "--mode", "full"])
        == 0
    )
    assert "chosen" in capsys.readouterr().out


def test_help_and_argument_mistakes_load_nothing_heavy():
    """`--help` and a wrong argument answer before Keras, JAX or TensorFlow
    is imported (Python's own import log, `-X importtime`, lists every import)."""
    for argv, status in ((["--help"], 0), (["generate", "--bogus"], 2)):
        run = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "keras_paligemma2", *argv],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == status, run.stderr[-2000:]
        imported = {line.split("|")[-1].strip() for line in run.stderr.splitlines() if "|" in line}
        heavy = {m for m in imported if m.split(".")[0] in ("keras", "jax", "tensorflow", "numpy")}
        assert not heavy, sorted(heavy)[:5]
        assert "keras_paligemma2.apps.cli" in imported


def test_annotated_pictures_of_same_named_images_never_overwrite(tmp_path, capsys, monkeypatch):
    answer = "<loc0256><loc0512><loc0768><loc1023> circle"
    monkeypatch.setattr(
        PaliGemma2CausalLM, "generate", lambda self, inputs, **kw: [answer] * len(inputs["prompts"])
    )
    shapes_png = pathlib.Path(__file__).parents[1] / "examples" / "data" / "shapes.png"
    images = []
    for folder, size in (("a", 64), ("b", 80)):
        (tmp_path / folder).mkdir()
        PIL.Image.open(shapes_png).resize((size, size)).save(tmp_path / folder / "scene.png")
        images += ["--image", str(tmp_path / folder / "scene.png")]
    out_dir = tmp_path / "not" / "yet"  # Created, with its parents, as finetune --output.
    args = ["generate", "--preset", PRESET, *images, "--prompt", "detect circle"]
    assert main([*args, "--annotate-dir", str(out_dir)]) == 0
    written = sorted(p.name for p in out_dir.iterdir())
    assert written == ["scene_0_annotated.png", "scene_1_annotated.png"]
    sizes = {PIL.Image.open(out_dir / name).size for name in written}
    assert sizes == {(64, 64), (80, 80)}  # Each image's own picture.
    (tmp_path / "file").write_text("")
    assert main([*args, "--annotate-dir", str(tmp_path / "file")]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_commands_print_no_start_up_logs_and_plain_progress(shapes_data, tmp_path):
    """A real run in a pipe: nothing on stderr but our own lines (no
    TensorFlow / absl / CUDA logs), progress as plain lines, no ANSI codes."""
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_paligemma2",
            "evaluate",
            "--preset",
            PRESET,
            "--data",
            str(shapes_data / "train.jsonl"),
            "--max-new-tokens",
            "2",
            "--batch-size",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": ""},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "\x1b" not in run.stderr + run.stdout and "\r" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, lines
    for line, done in zip(lines, (4, 8)):
        assert re.fullmatch(rf"evaluating: {done}/8 examples, \d+\.\d examples/s", line), line


def test_internal_errors_show_their_traceback_and_say_bug(monkeypatch, capsys):
    def broken(self, inputs, **kwargs):
        raise ValueError("operands could not be broadcast together")  # Not an InputError.

    monkeypatch.setattr(PaliGemma2CausalLM, "generate", broken)
    image = str(pathlib.Path(__file__).parents[1] / "examples" / "data" / "shapes.png")
    assert main(["generate", "--preset", PRESET, "--image", image, "--prompt", "caption en"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "operands could not be broadcast" in err
    assert "This is a bug in keras-paligemma2" in err

"""Prediction over a data set: batches by prompt length giving what single
calls give, results appended per batch, resumed runs that write each id
once, bad requests explained."""

import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest

from keras_paligemma2 import PaliGemma2CausalLM
from keras_paligemma2.apps import prediction
from keras_paligemma2.apps import shapes
from keras_paligemma2.apps.cli import main
from keras_paligemma2.utils.errors import InputError

TOKENS = dict(max_new_tokens=24)  # a detection with its label
REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lm():
    return PaliGemma2CausalLM.from_preset("pg2_tiny_shapes")


@pytest.fixture
def requests_file(tmp_path):
    """Eight scenes with questions of several lengths (detection among them)."""
    examples = shapes.training_examples(8, seed=21)
    (tmp_path / "img").mkdir()
    with open(tmp_path / "requests.jsonl", "w") as f:
        for i, (image, prompt) in enumerate(zip(examples["images"], examples["prompts"])):
            PIL.Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
            f.write(json.dumps({"id": f"scene-{i}", "image": f"img/{i}.png", "prefix": prompt}))
            f.write("\n")
    return tmp_path / "requests.jsonl"


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_predict_gives_what_single_generate_calls_give(lm, requests_file, tmp_path):
    requests = prediction.read_requests(requests_file)
    assert len({len(lm.preprocessor.prompt_ids(r["prefix"])) for r in requests}) > 1
    assert any(r["prefix"].startswith("detect") for r in requests)
    output = tmp_path / "out.jsonl"
    summary = prediction.predict(lm, requests, output, batch_size=4, **TOKENS)
    assert summary["predicted"] == 8 and summary["skipped"] == 0
    results = _lines(output)
    assert sorted(r["id"] for r in results) == sorted(r["id"] for r in requests)
    lengths = [len(lm.preprocessor.prompt_ids(r["prefix"])) for r in results]
    assert lengths == sorted(lengths)  # bucketed by prompt length
    found = []
    for result in results:
        image = np.asarray(PIL.Image.open(result["image"]))
        alone = lm.generate({"images": image, "prompts": result["prefix"]}, **TOKENS)
        assert result["prediction"] == alone, result["id"]
        if result["prefix"].startswith("detect"):
            assert len(result["objects"]) == result["prediction"].count("<loc") // 4
            for obj in result["objects"]:
                assert 0 <= obj["box"][0] < obj["box"][2] <= image.shape[0] and obj["label"]
            found += result["objects"]
    assert found  # the tiny model finds its shapes, in pixels


def test_a_stopped_run_resumes_and_writes_each_id_once(lm, requests_file, tmp_path):
    requests = prediction.read_requests(requests_file)
    whole = tmp_path / "whole.jsonl"
    prediction.predict(lm, requests, whole, batch_size=3, **TOKENS)

    class Stopped(Exception):
        pass

    def stop(count):
        raise Stopped

    resumed = tmp_path / "resumed.jsonl"
    with pytest.raises(Stopped):
        prediction.predict(lm, requests, resumed, batch_size=3, on_batch=stop, **TOKENS)
    assert len(_lines(resumed)) == 3  # the first batch was written before the stop
    with open(resumed, "a") as f:
        f.write('{"id": "scene-7", "predic')  # a write cut short
    summary = prediction.predict(lm, requests, resumed, batch_size=3, **TOKENS)
    assert summary == {**summary, "predicted": 5, "skipped": 3}
    assert _lines(resumed) == _lines(whole)  # same lines, same order
    assert prediction.predict(lm, requests, resumed, batch_size=3)["predicted"] == 0


def test_bad_requests_are_explained(requests_file, tmp_path):
    lines = requests_file.read_text().splitlines()
    broken = tmp_path / "broken.jsonl"
    broken.write_text(lines[0] + "\n" + lines[0] + "\n")
    with pytest.raises(InputError, match="appears twice"):
        prediction.read_requests(broken)
    no_id = json.loads(lines[0])
    del no_id["id"]
    broken.write_text(json.dumps(no_id) + "\n")
    with pytest.raises(InputError, match="no 'id'"):
        prediction.read_requests(broken)
    with pytest.raises(InputError, match="not both"):
        prediction.read_requests(requests_file, str(tmp_path / "img" / "*.png"), "caption en")
    with pytest.raises(InputError, match="needs the prompt"):
        prediction.read_requests(image_glob=str(tmp_path / "img" / "*.png"))
    with pytest.raises(InputError, match="No image files"):
        prediction.read_requests(image_glob=str(tmp_path / "none" / "*.png"), prompt="ocr")
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"name": "not a result"}\n')
    with pytest.raises(InputError, match="line 1 is not a result"):
        prediction.written_ids(foreign)


def test_predict_command_over_an_image_glob_resumes(requests_file, tmp_path, capsys):
    output = tmp_path / "results" / "captions.jsonl"
    command = [
        "predict",
        "--images",
        str(tmp_path / "img" / "*.png"),
        "--prompt",
        "caption en",
        "--output",
        str(output),
        "--max-new-tokens",
        "8",
        "--constrain",  # caption rows decode freely under it
        "task",
    ]
    assert main(command) == 0
    results = _lines(output)
    assert [r["id"] for r in results] == sorted(str(p) for p in (tmp_path / "img").glob("*.png"))
    assert all(r["prefix"] == "caption en" and r["prediction"] for r in results)
    assert "8 predicted" in capsys.readouterr().out
    assert main(command) == 0
    assert "0 predicted" in capsys.readouterr().out and len(_lines(output)) == 8


def test_evaluate_from_predictions_matches_by_id(lm, tmp_path, capsys):
    """`predict` writes in prompt-length order; `evaluate --from-predictions` puts each
    result back with its example and scores what generating would have scored."""
    examples = shapes.training_examples(10, seed=23, task_weights={"detect": 50.0})
    (tmp_path / "img").mkdir()
    data = tmp_path / "detections.jsonl"
    with open(data, "w") as f:
        for i, (image, prompt, response) in enumerate(
            zip(examples["images"], examples["prompts"], examples["responses"])
        ):
            PIL.Image.fromarray(image).save(tmp_path / "img" / f"{i}.png")
            line = {"id": 100 - i, "image": f"img/{i}.png", "prefix": prompt, "suffix": response}
            f.write(json.dumps(line) + "\n")
    output = tmp_path / "out.jsonl"
    prediction.predict(lm, prediction.read_requests(data), output, batch_size=4, **TOKENS)
    assert [r["id"] for r in _lines(output)] != [100 - i for i in range(10)]
    scores = ["--metric", "coco_map", "--metric", "coco_ap50", "--metric", "box_iou", "--json"]
    assert main(["evaluate", "--data", str(data), "--from-predictions", str(output), *scores]) == 0
    read_back = json.loads(capsys.readouterr().out)
    assert main(["evaluate", "--data", str(data), "--max-new-tokens", "24", *scores]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert read_back == generated and 0 < generated["coco_ap50"] <= 1
    partial = tmp_path / "partial.jsonl"
    partial.write_text("".join(line + "\n" for line in output.read_text().splitlines()[:7]))
    assert main(["evaluate", "--data", str(data), "--from-predictions", str(partial)]) != 0
    assert "3 of 10 examples" in capsys.readouterr().err


@pytest.mark.multiprocess
def test_data_parallel_over_devices_and_processes(lm, requests_file, tmp_path):
    """Two processes (jax.distributed on localhost) of 2 simulated devices each, every
    batch split over a process's devices: one merged output, each id once, the answers
    of one process; ids already in the output are skipped by both."""
    requests = prediction.read_requests(requests_file)
    alone = tmp_path / "alone.jsonl"
    prediction.predict(lm, requests, alone, batch_size=4, **TOKENS)
    want = {r["id"]: r for r in _lines(alone)}
    output = tmp_path / "merged.jsonl"
    first = next(iter(want.values()))
    output.write_text(json.dumps(first) + "\n")  # already done
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    worker = REPO / "tests" / "workers" / "predict_process.py"
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(port), str(i), "2", str(requests_file), str(output)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outs):
        assert p.returncode == 0, stderr[-3000:]
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
    assert [(s["devices"], s["local"]) for s in summaries] == [(4, 2), (4, 2)]
    assert sum(s["predicted"] for s in summaries) == 7 and all(s["predicted"] for s in summaries)
    merged = _lines(output)
    assert sorted(r["id"] for r in merged) == sorted(want)  # each id once
    assert {r["id"]: r for r in merged} == want
    assert sorted(p.name for p in tmp_path.iterdir() if ".part-" in p.name) == []

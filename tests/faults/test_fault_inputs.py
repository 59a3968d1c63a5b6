"""Fault suite, bad inputs on the command line: one clear `error: ...` line (exit code 2), never a traceback, and
never an overwritten input.

    .venv/bin/python -m pytest tests/faults/test_fault_inputs.py -q
"""

from __future__ import annotations

import json
import time

import pytest
from PIL import Image

from suzak import cli
from suzak.errors import SuzakError
from suzak.tasks import get_task
from suzak.tasks.sources import jsonl_examples, load_examples


def _run(capsys, *argv) -> str:
    """`suzak argv...` in-process; returns stderr, asserting the clean error exit (2, one message, no traceback)."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def _jsonl(folder, rows, raw: bytes | None = None):
    path = folder / "bench.jsonl"
    if raw is not None:
        path.write_bytes(raw)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- data files


def test_a_jsonl_with_bytes_that_are_not_utf8_names_file_and_line(tmp_path, capsys):
    good = json.dumps({"image_path": "a.png", "question": "q", "ground_truth": 3}).encode()
    path = _jsonl(tmp_path, None, raw=good + b"\n" + good[:20] + b"\xff\xfe" + good[20:] + b"\n")
    with pytest.raises(SuzakError, match=r"bench\.jsonl:2: not UTF-8 text"):
        jsonl_examples(get_task("clevr_count"), path, check_images=False)
    pred = json.dumps({"ground_truth": 3, "output": "<answer> 3 </answer>"}).encode()
    preds = tmp_path / "predictions.jsonl"
    preds.write_bytes(pred + b"\n" + pred[:10] + b"\xc3\x28" + pred[10:] + b"\n")
    err = _run(capsys, "eval", "superclevr", "--rescore", str(preds), "--out", str(tmp_path / "re"))
    assert "predictions.jsonl:2: not UTF-8" in err


def test_an_integer_image_path_is_a_clear_error(tmp_path):
    path = _jsonl(tmp_path, [{"image_path": 5, "question": "q", "ground_truth": 3}])
    with pytest.raises(SuzakError, match=r"bench\.jsonl:1: image_path must be a file path \(a string\), got 5"):
        load_examples(get_task("clevr_count"), str(path))


def test_a_symlink_loop_as_an_image_path_is_a_clear_error(tmp_path):
    (tmp_path / "loop.png").symlink_to(tmp_path / "loop.png")
    path = _jsonl(tmp_path, [{"image_path": "loop.png", "question": "q", "ground_truth": 3}])
    with pytest.raises(SuzakError, match=r"bench\.jsonl:1: image loop\.png"):
        load_examples(get_task("clevr_count"), str(path))
    from suzak.images import open_image

    with pytest.raises(SuzakError, match="image not found"):
        open_image(tmp_path / "loop.png")


# --------------------------------------------------------------------------- output folders


@pytest.mark.parametrize("make", ["out_file", "sft_file", "eval_file", "config_dir", "eval_output"])
def test_train_refuses_an_output_folder_it_cannot_use_before_loading_anything(tmp_path, capsys, make):
    out = tmp_path / "run"
    if make == "out_file":
        out.write_text("x")
    else:
        out.mkdir()
        {"sft_file": lambda: (out / "sft").write_text("x"), "eval_file": lambda: (out / "eval").write_text("x"),
         "config_dir": lambda: (out / "config.yaml").mkdir(),
         "eval_output": lambda: (out / "predictions.jsonl").write_text("{}\n")}[make]()
    start = time.monotonic()
    err = _run(capsys, "train", "--out", str(out))
    assert str(out) in err and time.monotonic() - start < 30


def test_train_refuses_grpo_settings_that_cannot_work_before_loading_anything(tmp_path, capsys):
    err = _run(capsys, "train", "--out", str(tmp_path / "r"), "grpo.temperature=0", "grpo.reward_weights={acc: 1}",
               "grpo.max_completion_tokens=5000")
    assert "grpo.temperature=0" in err and "['acc']" in err and "server.max_model_len" in err
    assert not (tmp_path / "r").exists()


def test_rescore_refuses_to_overwrite_what_it_reads(tmp_path, capsys):
    run = tmp_path / "eval-run"
    run.mkdir()
    preds = run / "predictions.jsonl"
    line = {"id": "0", "image_path": "a.png", "question": "q", "ground_truth": 3, "output": "<answer>3</answer>",
            "extracted": "3", "correct": True}
    preds.write_text(json.dumps(line) + "\n")
    (run / "summary.json").write_text('{"model": "m"}')
    before = preds.read_bytes(), (run / "summary.json").read_bytes()
    for out in (run, run / "." , tmp_path / "eval-run"):
        err = _run(capsys, "eval", "superclevr", "--rescore", str(preds), "--out", str(out))
        assert "would overwrite" in err
    assert (preds.read_bytes(), (run / "summary.json").read_bytes()) == before
    assert cli.main(["eval", "superclevr", "--rescore", str(preds), "--out", str(tmp_path / "elsewhere")]) == 0
    assert (tmp_path / "elsewhere" / "predictions.jsonl").exists()


def test_eval_refuses_to_write_into_a_training_run(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "grpo").mkdir(parents=True)
    (run / "config.yaml").write_text("seed: 0\n")
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"ground_truth": 3, "output": "3"}) + "\n")
    err = _run(capsys, "eval", "superclevr", "--rescore", str(preds), "--out", str(run))
    assert "training run" in err and (run / "config.yaml").read_text() == "seed: 0\n"


def test_eval_against_a_refused_port_fails_at_once(tmp_path, capsys):
    from vllm_server.client import free_port

    data = tmp_path / "d"
    data.mkdir()
    Image.new("RGB", (56, 56)).save(data / "a.png")
    _jsonl(data, [{"image_path": "a.png", "question": "How many?", "ground_truth": 3}])
    start = time.monotonic()
    err = _run(capsys, "eval", "superclevr", "--server", f"http://127.0.0.1:{free_port()}", "--data",
               str(data / "bench.jsonl"), "--out", str(tmp_path / "o"))
    assert "no rollout server answers" in err and time.monotonic() - start < 30


# --------------------------------------------------------------------------- other commands


def test_synth_with_a_bad_image_size_is_a_clear_error(tmp_path, capsys):
    err = _run(capsys, "data", "synth", "clevr", "--n", "2", "--out", str(tmp_path / "d"), "--image-size", "abc")
    assert "WIDTHxHEIGHT" in err


def test_model_tiny_refuses_an_existing_file(tmp_path, capsys):
    target = tmp_path / "model"
    target.write_text("keep me")
    err = _run(capsys, "model", "tiny", "--out", str(target))
    assert "is a file" in err and target.read_text() == "keep me"

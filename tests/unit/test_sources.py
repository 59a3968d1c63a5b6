"""Every data source on files in the real formats, and every bad input with its clear error.

    .venv/bin/python -m pytest tests/unit/test_sources.py -q
"""

from __future__ import annotations

import json

import pytest
from PIL import Image

from suzak.config import SynthConfig
from suzak.errors import SuzakError
from suzak.synth.writers import write_dataset
from suzak.tasks import TRAIN_TEMPLATE, get_task
from suzak.tasks.sources import load_examples, synth_examples

CLEVR = get_task("clevr_count")
GEOQA = get_task("geoqa")


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    small = {"image_size": (96, 64)}
    return {
        "hf": write_dataset("clevr", 6, 1, root / "hf", "hf", split="B", **small),
        "superclevr": write_dataset("clevr", 5, 2, root / "sc", "superclevr", **small),
        "geoqa": write_dataset("geo", 4, 3, root / "geo", "geoqa", image_size=(96, 72)),
    }


def test_save_to_disk_folder(written):
    examples = load_examples(CLEVR, str(written["hf"]))
    assert len(examples) == 6
    ex = examples[0]
    assert ex.answer.isdigit() and ex.thinking.startswith("<think>") and ex.load_image().mode == "RGB"
    assert ex.solution == f"<answer> {ex.answer} </answer>"


def test_superclevr_jsonl_and_folder(written):
    folder = written["superclevr"]
    by_file = load_examples(CLEVR, str(folder / "superclevr_test200_counting_problems.jsonl"))
    by_folder = load_examples(CLEVR, str(folder))
    assert [e.answer for e in by_file] == [e.answer for e in by_folder]
    assert all(isinstance(e.ground_truth, int) for e in by_file)
    assert by_file[0].load_image().size[0] > 0


def test_geoqa_jsonl_keeps_string_truth(written):
    examples = load_examples(GEOQA, str(written["geoqa"]))
    assert len(examples) == 4 and all(isinstance(e.ground_truth, str) for e in examples)


def test_synth_source_and_enumerate_thinking():
    examples = load_examples(CLEVR, "synth", synth=SynthConfig(n=4, seed=5, image_width=64, image_height=48,
                                                              thinking="enumerate", min_objects=2, max_objects=3))
    assert len(examples) == 4
    for ex in examples:
        assert ex.thinking == "<think> " + " ".join(str(k) for k in range(1, int(ex.answer) + 1)) + " </think>"
    again = synth_examples(CLEVR, SynthConfig(n=4, seed=5, image_width=64, image_height=48, thinking="enumerate",
                                              min_objects=2, max_objects=3))
    assert [e.answer for e in again] == [e.answer for e in examples]


def test_prompt_is_r1v_exact():
    ex = load_examples(CLEVR, "synth", synth=SynthConfig(n=1, image_width=64, image_height=48))[0]
    text = CLEVR.messages(ex, prompt="train")[0]["content"][1]["text"]
    assert text == TRAIN_TEMPLATE.format(Question=ex.problem)
    assert "  Output the thinking" in text
    assert CLEVR.messages(ex, prompt="eval")[0]["content"][1]["text"].endswith(
        "First output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags.")


def _jsonl(tmp_path, rows, image=True):
    (tmp_path / "images").mkdir(exist_ok=True)
    if image:
        Image.new("RGB", (32, 32)).save(tmp_path / "images" / "a.png")
    path = tmp_path / "bench.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_missing_image_names_the_line(tmp_path):
    path = _jsonl(tmp_path, [{"image_path": "./images/a.png", "question": "q", "ground_truth": 3},
                             {"image_path": "./images/missing.png", "question": "q", "ground_truth": 3}])
    with pytest.raises(SuzakError, match=r"bench\.jsonl:2: image \./images/missing\.png not found"):
        load_examples(CLEVR, str(path))


def test_corrupt_image_names_the_file(tmp_path):
    path = _jsonl(tmp_path, [{"image_path": "./images/bad.png", "question": "q", "ground_truth": 3}])
    (tmp_path / "images" / "bad.png").write_bytes(b"not a png")
    ex = load_examples(CLEVR, str(path))[0]
    with pytest.raises(SuzakError, match=r"bad\.png.*corrupt"):
        ex.load_image()


def test_missing_column_and_wrong_truth_type(tmp_path):
    path = _jsonl(tmp_path, [{"image_path": "./images/a.png", "ground_truth": 3}])
    with pytest.raises(SuzakError, match=r"missing field\(s\) \['question'\]"):
        load_examples(CLEVR, str(path))
    path = _jsonl(tmp_path, [{"image_path": "./images/a.png", "question": "q", "ground_truth": "three"}])
    with pytest.raises(SuzakError, match=r"bench\.jsonl:1: ground_truth must be an integer"):
        load_examples(CLEVR, str(path))
    path = _jsonl(tmp_path, [{"image_path": "./images/a.png", "question": "q", "ground_truth": None}])
    with pytest.raises(SuzakError, match=r"ground_truth must be a non-empty string"):
        load_examples(GEOQA, str(path))


def test_empty_dataset_and_bad_json(tmp_path):
    path = _jsonl(tmp_path, [])
    path.write_text("\n")
    with pytest.raises(SuzakError, match="no examples"):
        load_examples(CLEVR, str(path))
    path.write_text("{not json\n")
    with pytest.raises(SuzakError, match=r"bench\.jsonl:1: not valid JSON"):
        load_examples(CLEVR, str(path))


def test_hf_folder_with_wrong_columns(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"img": [Image.new("RGB", (8, 8))], "question": ["q"], "answer": ["3"]})
    ds.save_to_disk(str(tmp_path / "wrong"))
    with pytest.raises(SuzakError, match=r"lacks column\(s\) \['image', 'problem', 'solution'\].*R1-V's format"):
        load_examples(CLEVR, str(tmp_path / "wrong"))


def test_hub_id_offline_gives_the_download_command(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(SuzakError, match=r"HF_HUB_OFFLINE.*huggingface-cli download leonardPKU/clevr_cogen_a_train"):
        load_examples(CLEVR, "leonardPKU/clevr_cogen_a_train")


def test_unknown_task():
    with pytest.raises(SuzakError, match="known tasks"):
        get_task("vqa")

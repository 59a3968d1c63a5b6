"""Tests for the synthetic data generators (CLEVR-CoGenT scenes, GeoQA-style geometry) and dataset writers.

    .venv/bin/python -m pytest tests/unit/test_synth.py -q
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from suzak.errors import SuzakError
from suzak.synth import SynthSample, clevr_sample, clevr_samples, geo_sample, geo_samples
from suzak.synth import clevr as clevr_mod
from suzak.synth.clevr import COGENT_PALETTES, TOTAL_COUNT_QUESTION, Camera, attribute_question, render_scene
from suzak.synth.geo import TEMPLATES, measure_angle
from suzak.synth.writers import GEOQA_FILE, SUPERCLEVR_FILE, write_dataset

SMALL = (160, 120)  # keeps every test fast; layout and shading code paths are the same as at 480x320


def _pixels(sample: SynthSample) -> bytes:
    return sample.image.tobytes()


# ------------------------------------------------------------------------------------------------- CLEVR
def test_clevr_same_seed_identical_different_seed_differs():
    a = clevr_sample(5, seed=11, image_size=SMALL)
    b = clevr_sample(5, seed=11, image_size=SMALL)
    c = clevr_sample(5, seed=12, image_size=SMALL)
    assert _pixels(a) == _pixels(b) and a.thinking == b.thinking and a.meta == b.meta
    assert _pixels(a) != _pixels(c)
    assert a.image.size == SMALL and a.image.mode == "RGB"


def test_clevr_index_regenerates_alone():
    stream = list(clevr_samples(4, seed=3, image_size=SMALL))
    alone = clevr_sample(3, seed=3, image_size=SMALL)
    assert _pixels(stream[3]) == _pixels(alone)
    assert len({_pixels(s) for s in stream}) == 4


@pytest.mark.parametrize("split", ["A", "B"])
def test_cogent_palette_rules(split):
    shapes_seen = set()
    for s in clevr_samples(25, seed=7, split=split, image_size=SMALL):
        assert s.meta["split"] == split
        for obj in s.meta["objects"]:
            shapes_seen.add(obj["shape"])
            assert obj["color"] in COGENT_PALETTES[split][obj["shape"]], obj
    assert shapes_seen == {"cube", "sphere", "cylinder"}
    # Condition B really is the swap of A: cube colours in B are A's cylinder colours.
    assert set(COGENT_PALETTES["B"]["cube"]) == set(COGENT_PALETTES["A"]["cylinder"])
    assert set(COGENT_PALETTES["A"]["cube"]).isdisjoint(COGENT_PALETTES["A"]["cylinder"])


def test_total_count_answer_matches_meta_and_bounds():
    counts = []
    for s in clevr_samples(20, seed=1, min_objects=3, max_objects=10, image_size=SMALL):
        n = len(s.meta["objects"])
        counts.append(n)
        assert s.problem == TOTAL_COUNT_QUESTION
        assert s.answer == str(n) == str(s.meta["count"])
        assert s.solution == f"<answer> {n} </answer>"
        assert s.thinking.startswith("<think> ") and s.thinking.endswith(f"That makes {n} items. </think>")
        assert s.thinking.count(" a large ") + s.thinking.count(" a small ") == n
        assert 3 <= n <= 10
        # Every object stays countable: at least half of its silhouette is unoccluded.
        assert min(o["visible_fraction"] for o in s.meta["objects"]) >= 0.5
    assert len(set(counts)) >= 4


def test_attribute_questions_are_answered_correctly():
    kinds_seen = set()
    for s in clevr_samples(40, seed=5, total_count_fraction=0.0, image_size=SMALL):
        filters = s.meta["filters"]
        assert s.meta["question_type"] == "attribute" and filters
        kinds_seen.add(tuple(sorted(filters)))
        expected = sum(all(o[k] == v for k, v in filters.items()) for o in s.meta["objects"])
        assert s.answer == str(expected)
        assert s.problem == attribute_question(filters)
        for value in filters.values():
            assert value in s.problem
        noun = clevr_mod.phrase(filters, plural=expected != 1)
        assert s.thinking.endswith(f"That makes {expected} {noun}. </think>")
    assert len(kinds_seen) >= 5


def test_attribute_question_wording():
    assert attribute_question({"color": "red", "shape": "cube"}) == "How many red cubes are there?"
    assert attribute_question({"size": "large", "shape": "sphere"}) == "How many large spheres are there?"
    assert attribute_question({"material": "metal"}) == "How many metal objects are there?"
    assert attribute_question({"size": "small", "color": "cyan", "shape": "cylinder"}) == (
        "How many small cyan cylinders are there?"
    )


def test_question_mix_fraction():
    kinds = [s.meta["question_type"] for s in clevr_samples(40, seed=2, total_count_fraction=0.5, image_size=SMALL)]
    assert 8 <= kinds.count("total") <= 32


def test_objects_are_drawn_where_meta_says():
    s = clevr_sample(0, seed=9, image_size=SMALL)
    img = np.asarray(s.image).astype(int)
    floor = np.asarray(render_scene([], Camera(*SMALL))).astype(int)
    for obj in s.meta["objects"]:
        x0, y0, x1, y1 = obj["bbox"]
        assert 0 <= x0 < x1 <= SMALL[0] and 0 <= y0 < y1 <= SMALL[1]
        diff = np.abs(img[y0:y1, x0:x1] - floor[y0:y1, x0:x1]).sum(axis=2)
        assert (diff > 40).mean() > 0.2, obj  # a real object, not bare floor, covers its box


def test_perspective_far_objects_are_smaller_and_higher():
    cam = Camera(480, 320)
    near = clevr_mod.SceneObject("sphere", "large", "red", "rubber", 0.0, 4.0, 0)
    far = clevr_mod.SceneObject("sphere", "large", "red", "rubber", 0.0, 10.0, 0)
    bn, bf = clevr_mod._bbox(near, cam), clevr_mod._bbox(far, cam)
    assert (bf[2] - bf[0]) < (bn[2] - bn[0]) and bf[3] < bn[3]


def test_metal_is_shinier_than_rubber():
    cam = Camera(480, 320)
    patches = {m: clevr_mod._patch("sphere", "large", m, 5.0, 0, cam) for m in ("rubber", "metal")}
    assert patches["metal"].specular.max() > 3 * patches["rubber"].specular.max()


@pytest.mark.parametrize(
    "kw",
    [{"split": "C"}, {"min_objects": 5, "max_objects": 3}, {"image_size": (10, 10)}, {"total_count_fraction": 2.0}],
)
def test_clevr_bad_params_raise_suzak_error(kw):
    split = kw.pop("split", "A")
    with pytest.raises(SuzakError):
        clevr_sample(0, 0, split, **kw)


# --------------------------------------------------------------------------------------------------- geo
def test_geo_same_seed_identical_different_seed_differs():
    a, b, c = geo_sample(4, seed=1), geo_sample(4, seed=1), geo_sample(4, seed=2)
    assert _pixels(a) == _pixels(b) and a.problem == b.problem
    assert _pixels(a) != _pixels(c) or a.problem != c.problem


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_geo_answers_match_the_drawn_figure(template):
    for s in geo_samples(6, seed=3, templates=[template], image_size=(200, 150)):
        meta, pts = s.meta, s.meta["points"]
        assert meta["template"] == template
        asked = meta["asked"]
        if asked["type"] == "angle":
            measured = measure_angle(pts, asked["vertex"], *asked["arms"])
            assert s.answer == f"{round(measured)}°" and math.isclose(measured, meta["answer_value"], abs_tol=1e-6)
        else:
            p, q = (np.array(pts[n]) for n in asked["segment"])
            assert math.isclose(float(np.linalg.norm(p - q)), meta["answer_value"], rel_tol=1e-9)
        if "triangle_angles" in meta:
            assert sum(meta["triangle_angles"].values()) == 180
        given = dict(meta["given"])
        if "angle 1 is" in given:  # parallel lines: angle 1 is a named angle at E
            given[f"angle {given.pop('angle 1 is')}"] = given.pop("angle 1")
            given.pop("angle 2 is")
        for name, value in given.items():  # the givens in the text are true of the figure too
            label = name.removeprefix("angle ")
            if name.startswith("angle ") and len(label) == 3:
                assert math.isclose(measure_angle(pts, label[1], label[0], label[2]), value, abs_tol=1e-6), name
            elif name.startswith("angle "):
                assert meta["triangle_angles"][label] == value, name
            else:  # a length such as "AC"
                p, q = (np.array(pts[n]) for n in name)
                assert math.isclose(float(np.linalg.norm(p - q)), value, rel_tol=1e-9), name


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_geo_question_choices_and_thinking(template):
    from math_verify import parse, verify

    s = geo_sample(0, seed=8, templates=[template], image_size=(200, 150))
    stem, choice_block = s.problem.split("\nChoices:\n")
    assert stem.startswith("As shown in the figure, ") and stem.endswith("()")
    lines = choice_block.split("\n")
    assert [line[:2] for line in lines] == ["A:", "B:", "C:", "D:"]
    options = [line[2:] for line in lines]
    assert options.count(s.answer) == 1 and len(set(options)) == 4
    assert options["ABCD".index(s.meta["answer_letter"])] == s.answer
    assert re.fullmatch(r"\d+°|\d+|\\frac\{\d+\}\{\d+\}", s.answer)
    assert s.thinking.startswith("<think> ") and s.thinking.endswith(" </think>")
    # The SFT target (thinking + solution) scores correct under R1-V's GeoQA metric.
    assert verify(parse(s.answer), parse(s.thinking + "\n\n" + s.solution))


def test_geo_fraction_answers_appear():
    answers = [s.answer for s in geo_samples(12, seed=0, templates=["altitude_on_hypotenuse"], image_size=(200, 150))]
    assert any(a.startswith("\\frac{") for a in answers)


def test_geo_unknown_template_raises():
    with pytest.raises(SuzakError, match="unknown geo templates"):
        geo_sample(0, 0, templates=["hexagon"])


# ------------------------------------------------------------------------------------------------ writers
def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_write_hf_columns_and_preview(tmp_path):
    import datasets

    out = write_dataset("clevr", 6, 0, tmp_path / "hf", "hf", preview=tmp_path / "prev.png", image_size=SMALL)
    dd = datasets.load_from_disk(str(out))
    assert list(dd) == ["train"]
    ds = dd["train"]
    assert ds.column_names == ["image", "problem", "solution", "thinking"] and len(ds) == 6
    assert isinstance(ds.features["image"], datasets.Image)
    row = ds[2]
    expected = clevr_sample(2, 0, image_size=SMALL)
    assert row["problem"] == expected.problem and row["solution"] == f"<answer> {expected.answer} </answer>"
    assert row["thinking"] == expected.thinking and row["thinking"].startswith("<think>")
    assert row["image"].size == SMALL and row["image"].convert("RGB").tobytes() == _pixels(expected)
    with Image.open(tmp_path / "prev.png") as prev:
        assert prev.size[0] == 4 * 240 and prev.size[1] > 2 * 180


def test_write_superclevr_format_and_workers_match_serial(tmp_path):
    serial = write_dataset("clevr", 4, 2, tmp_path / "s0", "superclevr", image_size=SMALL)
    pooled = write_dataset("clevr", 4, 2, tmp_path / "s2", "superclevr", workers=2, image_size=SMALL)
    rows = _jsonl(serial / SUPERCLEVR_FILE)
    assert rows == _jsonl(pooled / SUPERCLEVR_FILE) and len(rows) == 4
    assert rows[0]["image_path"] == "./images/superCLEVR_new_025000.png"
    assert rows[3]["image_path"] == "./images/superCLEVR_new_025003.png"
    for row in rows:
        assert set(row) == {"image_path", "question", "ground_truth"}
        assert type(row["ground_truth"]) is int and isinstance(row["question"], str)
        assert (serial / row["image_path"]).read_bytes() == (pooled / row["image_path"]).read_bytes()


def test_write_geoqa_format(tmp_path):
    out = write_dataset("geo", 3, 0, tmp_path / "g", "geoqa", preview=tmp_path / "gp.png", image_size=(200, 150))
    rows = _jsonl(out / GEOQA_FILE)
    assert [r["image_path"] for r in rows] == [f"./Geo170K/images/test/{i}.png" for i in range(3)]
    for i, row in enumerate(rows):
        assert set(row) == {"image_path", "question", "ground_truth"}
        assert isinstance(row["ground_truth"], str)
        assert row["ground_truth"] == geo_sample(i, 0, image_size=(200, 150)).answer
        with Image.open(out / row["image_path"]) as img:
            assert img.size == (200, 150)
    assert (tmp_path / "gp.png").is_file()


@pytest.mark.parametrize(
    "kind,fmt,match",
    [("geo", "superclevr", "integer counts"), ("clevr", "geoqa", "geometry"), ("clevr", "csv", "format")],
)
def test_writer_rejects_bad_combinations(tmp_path, kind, fmt, match):
    with pytest.raises(SuzakError, match=match):
        write_dataset(kind, 2, 0, tmp_path / "x", fmt)


def test_writer_refuses_non_empty_output(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(SuzakError, match="already exists"):
        write_dataset("clevr", 2, 0, tmp_path / "full", "superclevr", image_size=SMALL)
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"

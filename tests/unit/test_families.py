"""The model-family seam (suzak/families.py): families from config.json, pixel bounds per visual-token size, the
resize factor every side uses, DeepStack features carried through the shared image encoding, and the tiny Qwen3-VL.

    .venv/bin/python -m pytest tests/unit/test_families.py -q
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from suzak.errors import SuzakError
from suzak.families import QWEN3VL, QWEN25VL, family_of, get_family, processor_factor, tiny_family
from suzak.images import budget_size, resize_to_budget, visual_tokens
from suzak.models import load_model, load_processor, model_family, resolve_model_path

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    from suzak.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny3"), family="qwen3vl", hidden=64, layers=2, vision_depth=2,
                            vision_hidden=64, vocab_target=512)


def test_family_follows_config_json():
    assert family_of({"model_type": "qwen2_5_vl"}) is QWEN25VL and family_of({"model_type": "qwen2_vl"}) is QWEN25VL
    assert family_of({"model_type": "qwen3_vl"}) is QWEN3VL and model_family({"model_type": "qwen3_vl"}) == "qwen3_vl"
    with pytest.raises(SuzakError, match="Qwen3-VL"):  # the message names what is supported
        family_of({"model_type": "qwen3_vl_moe"})
    with pytest.raises(SuzakError, match="qwen25vl, qwen3vl"):
        get_family("qwen2")
    assert tiny_family("tiny") is QWEN25VL and tiny_family("tiny-qwen3vl") is QWEN3VL and tiny_family("x") is None
    assert (QWEN25VL.factor, QWEN3VL.factor, QWEN3VL.token_area) == (28, 32, 1024)


def test_pixel_bounds_are_multiples_of_the_token_area():
    QWEN25VL.check_pixel_bounds(3136, 401408)
    QWEN3VL.check_pixel_bounds(4096, 524288)
    with pytest.raises(SuzakError, match="min_pixels 3136 is not a multiple of 1024"):
        QWEN3VL.check_pixel_bounds(3136, 524288)
    with pytest.raises(SuzakError, match="1024 \\(32\\*32\\) <= min_pixels"):
        QWEN3VL.check_pixel_bounds(1024, 512)


def test_images_resize_to_the_familys_factor():
    # 480x320 at 128 visual tokens: 26x18 blocks of 28 px (117 tokens) or 13x9 blocks of 32 px (117 tokens).
    h, w = budget_size(320, 480, 3136, 128 * 784)
    assert h % 28 == 0 and w % 28 == 0 and visual_tokens(320, 480, 3136, 128 * 784) == 117
    h, w = budget_size(320, 480, 4096, 128 * 1024, 32)
    assert h % 32 == 0 and w % 32 == 0 and h * w <= 128 * 1024
    assert visual_tokens(320, 480, 4096, 128 * 1024, 32) == (h // 32) * (w // 32) == 117
    img = resize_to_budget(Image.new("RGB", (480, 320)), 4096, 128 * 1024, 32)
    assert img.size == (w, h)


def test_tiny_qwen3vl_folder_and_processor(tiny3):
    config = json.loads((tiny3 / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert config["vision_config"]["deepstack_visual_indexes"] == [0, 1]
    assert config["text_config"]["rope_parameters"]["mrope_interleaved"] is True
    processor = load_processor(tiny3, min_pixels=4096, max_pixels=65536)
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor_factor(processor) == 32
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many?"}]}]
    assert processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True).startswith(
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>")  # no default system turn
    with pytest.raises(SuzakError, match="not a multiple of 1024"):
        load_processor(tiny3, min_pixels=3136, max_pixels=65536)


def test_deepstack_features_travel_with_the_shared_encoding(tiny3):
    """encode_images + rope_index + language_forward is the model's own image path: same hidden states as
    pixel_values in, and the DeepStack maps matter (zeroing them changes the output)."""
    model = load_model(tiny3, dtype="float32")
    processor = load_processor(tiny3, min_pixels=4096, max_pixels=65536)
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many items?"}]}]
    text = processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    images = [Image.new("RGB", (128, 96), (200, 30, 60)), Image.new("RGB", (96, 160), (20, 180, 60))]
    enc = processor(text=[text, text], images=images, return_tensors="pt", padding=True)
    backbone = model.model
    with torch.no_grad():
        own = backbone(**enc).last_hidden_state
        feats = QWEN3VL.encode_images(backbone, enc["pixel_values"], enc["image_grid_thw"])
        assert len(feats) == 2 and len(feats.deepstack) == 2  # two images, two DeepStack levels
        positions = QWEN3VL.rope_index(backbone, enc["input_ids"], enc["image_grid_thw"], enc["attention_mask"],
                                       enc["mm_token_type_ids"])
        shared = QWEN3VL.language_forward(backbone, enc["input_ids"], feats.select([0, 1]),
                                          attention_mask=enc["attention_mask"],
                                          position_ids=positions).last_hidden_state
        no_deepstack = type(feats)(embeds=feats.embeds, deepstack=tuple(tuple(torch.zeros_like(t) for t in level)
                                                                         for level in feats.deepstack))
        plain = QWEN3VL.language_forward(backbone, enc["input_ids"], no_deepstack, attention_mask=enc["attention_mask"],
                                         position_ids=positions)
        with pytest.raises(SuzakError, match="image tokens in the micro-batch"):
            QWEN3VL.language_forward(backbone, enc["input_ids"], feats.select([0]), attention_mask=None,
                                     position_ids=positions)
    torch.testing.assert_close(shared, own, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain.last_hidden_state, own, atol=1e-3)


def test_tiny_qwen3vl_by_name_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("SUZAK_HOME", str(tmp_path / "home"))
    path = Path(resolve_model_path("tiny-qwen3vl"))
    assert path == tmp_path / "home" / "tiny-qwen3vl" and json.loads((path / "config.json").read_text())[
        "model_type"] == "qwen3_vl"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "suzak", "model", "tiny", "--family", "qwen3vl", "--out",
                           str(tmp_path / "cli")], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tiny Qwen3-VL written to" in done.stdout
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["model_type"] == "qwen3_vl"

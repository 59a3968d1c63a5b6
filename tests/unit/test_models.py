"""Tests for the tiny embedded Qwen2.5-VL (suzak/tiny.py) and model loading (suzak/models.py).

    .venv/bin/python -m pytest tests/unit/test_models.py -q
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from suzak import models, tiny
from suzak.errors import SuzakError
from suzak.models import (load_model, load_processor, model_family, pick_attn_implementation, pick_dtype,
                          resolve_model_path)

TRAIN_PROMPT = ("How many items are there in the image?  Output the thinking process in <think> </think> "
                "and final answer (number) in <answer> </answer> tags.")
TASK_TEXTS = [
    TRAIN_PROMPT,
    "<think> I see a large red metal cube, a small blue rubber sphere, a large cyan metal cylinder. "
    "That makes 3 items. </think>\n\n<answer> 3 </answer>",
    "As shown in the figure, AB ∥ CD, ∠1 = 50°, then ∠2 is ()\nChoices:\nA:40°\nB:50°\nC:130°\nD:140°",
    "<answer> \\frac{12}{5} </answer>",
    "text the corpus never saw: Zürich 東京 🙂 \t tabs",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def loaded(tiny_dir):
    return load_model(tiny_dir), load_processor(tiny_dir)


def _image(seed: int = 0, size=(480, 320)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray(rng.randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the tiny model folder ----------------------------------------------------------------------


def test_tiny_folder_has_hf_files(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "processor_config.json", "chat_template.jinja", "generation_config.json"):
        assert (tiny_dir / name).is_file(), name
    assert tiny.is_current_tiny(tiny_dir)


def test_generate_with_image_through_chat_template(loaded):
    model, processor = loaded
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    messages = [{"role": "user", "content": [{"type": "image", "image": _image()},
                                             {"type": "text", "text": TRAIN_PROMPT}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt")
    # 480x320 at max_pixels 128*28*28 -> a 26x18 patch grid -> 117 merged visual tokens.
    grid = inputs["image_grid_thw"][0].tolist()
    assert grid == [1, 18, 26]
    n_image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n_image_tokens == 18 * 26 // 4
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False, min_new_tokens=12)
    new = out[0, inputs["input_ids"].shape[1]:]
    assert new.numel() == 12
    assert int(new.max()) < model.config.text_config.vocab_size
    assert isinstance(processor.decode(new), str)


def test_param_count_is_a_few_million(loaded):
    model, _ = loaded
    n_params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 < n_params < 5_000_000
    assert model.dtype == torch.float32


def test_tokenizer_round_trips_task_text(loaded):
    _, processor = loaded
    tok = processor.tokenizer
    for text in TASK_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # The corpus made task words cheap: the training prompt is ~one token per word.
    assert len(tok.encode(TRAIN_PROMPT, add_special_tokens=False)) < 40
    for tag in tiny.TAG_TOKENS:
        assert len(tok.encode(tag, add_special_tokens=False)) == 1
        # Tags are ordinary text: decoding that skips special tokens must keep them.
        assert tok.decode(tok.encode(tag, add_special_tokens=False), skip_special_tokens=True) == tag


def test_special_tokens_match_config_ids(loaded, tiny_dir):
    model, processor = loaded
    tok, cfg = processor.tokenizer, model.config
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id == processor.image_token_id
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.convert_tokens_to_ids("<|vision_end|>") == cfg.vision_end_token_id
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == cfg.text_config.eos_token_id
    assert tok.pad_token_id == cfg.text_config.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert len(tok) == cfg.text_config.vocab_size
    gen = json.loads((tiny_dir / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<|im_end|>") in gen["eos_token_id"]
    for token in tiny.QWEN_SPECIAL_TOKENS:
        assert len(tok.encode(token, add_special_tokens=False)) == 1


def test_chat_template_matches_qwen_layout(loaded):
    _, processor = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\n")


def _prompt_inputs(processor, text="Q?"):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[prompt], images=[_image()], return_tensors="pt")


def test_mrope_positions_need_mm_token_type_ids(loaded):
    # transformers 5 builds Qwen2.5-VL's 3-D image positions only when mm_token_type_ids is passed;
    # without it the forward silently uses 1-D positions. Training logprobs must pass it (vLLM matches
    # transformers to ~1e-6 with it, see tests/integration/test_tiny_vllm.py).
    model, processor = loaded
    inputs = _prompt_inputs(processor)
    assert "mm_token_type_ids" in inputs
    without = {k: v for k, v in inputs.items() if k != "mm_token_type_ids"}
    with torch.no_grad():
        gap = (model(**inputs).logits - model(**without).logits).abs().max()
    assert gap > 1e-3


def test_vision_token_ids_guard_completions(loaded):
    model, processor = loaded
    tok = processor.tokenizer
    assert sorted(models.vision_token_ids(model.config)) == sorted(
        tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"))
    assert models.vision_token_ids(model.config.to_dict()) == models.vision_token_ids(model.config)
    # Why rollouts must ban them: one sampled <|image_pad|> breaks the training forward.
    inputs = _prompt_inputs(processor)
    completion = torch.tensor([[5, model.config.image_token_id, 7]])
    ids = torch.cat([inputs["input_ids"], completion], dim=1)
    mm_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion)], dim=1)
    with pytest.raises(ValueError, match="do not match"), torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
              pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"])


def test_config_respects_architecture_constraints(loaded):
    cfg = loaded[0].config
    text, vision = cfg.text_config, cfg.vision_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert vision.out_hidden_size == text.hidden_size
    assert all(0 <= i < vision.depth for i in vision.fullatt_block_indexes)
    assert len(vision.fullatt_block_indexes) < vision.depth  # some block uses window attention
    assert (vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size) == (14, 2, 2)


def test_build_is_deterministic_for_a_seed(tiny_dir, tmp_path):
    again = tiny.build_tiny_model(tmp_path / "again", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert _sha(again / name) == _sha(tiny_dir / name), name
    other = tiny.build_tiny_model(tmp_path / "other", seed=1)
    assert _sha(other / "model.safetensors") != _sha(tiny_dir / "model.safetensors")


def test_bad_tiny_sizes_are_suzak_errors(tmp_path):
    with pytest.raises(SuzakError, match="hidden=100"):
        tiny.build_tiny_model(tmp_path / "bad", hidden=100)
    with pytest.raises(SuzakError, match="vocab_target"):
        tiny.build_tokenizer(vocab_target=100)


# ---- ensure_tiny_model / resolve_model_path ------------------------------------------------------


def test_ensure_tiny_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("user data")
    with pytest.raises(SuzakError, match="not a suzak tiny model"):
        tiny.ensure_tiny_model(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "user data"


def test_resolve_tiny_builds_once_under_suzak_home(tmp_path, monkeypatch, tiny_dir):
    monkeypatch.setenv("SUZAK_HOME", str(tmp_path))
    built = []
    real_build = tiny.build_tiny_model

    def counting_build(out, **kw):
        built.append(out)
        return real_build(out, **kw)

    monkeypatch.setattr(tiny, "build_tiny_model", counting_build)
    first = resolve_model_path("tiny")
    assert Path(first) == tmp_path / "tiny-qwen25vl" and tiny.is_current_tiny(Path(first))
    assert resolve_model_path("tiny") == first
    assert len(built) == 1
    # No temp build folders are left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-qwen25vl"]


def test_ensure_tiny_rebuilds_stale_version(tmp_path):
    path = tmp_path / "t"
    tiny.ensure_tiny_model(path)
    stamp = json.loads((path / tiny.STAMP_FILE).read_text())
    stamp["version"] = tiny.TINY_VERSION - 1
    (path / tiny.STAMP_FILE).write_text(json.dumps(stamp))
    assert not tiny.is_current_tiny(path)
    tiny.ensure_tiny_model(path)
    assert tiny.is_current_tiny(path)
    # Other settings than the folder was built with also rebuild it.
    assert not tiny.is_current_tiny(path, seed=1)
    tiny.ensure_tiny_model(path, seed=1)
    assert json.loads((path / tiny.STAMP_FILE).read_text())["build"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]
    with pytest.raises(TypeError, match="unknown"):
        tiny.is_current_tiny(path, depth=3)


def test_resolve_local_folder_needs_config_json(tmp_path, tiny_dir):
    assert resolve_model_path(tiny_dir) == str(tiny_dir.resolve())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SuzakError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(SuzakError, match="is a file"):
        resolve_model_path(tmp_path / "file.bin")
    with pytest.raises(SuzakError, match="no such folder"):
        resolve_model_path("./does/not/exist")
    with pytest.raises(SuzakError, match="empty"):
        resolve_model_path("  ")


def test_offline_uncached_hub_id_says_how_to_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SuzakError) as err:
        resolve_model_path("suzak-tests/not-a-cached-model")
    msg = str(err.value)
    assert "hf download suzak-tests/not-a-cached-model --local-dir" in msg
    assert "huggingface-cli download" in msg and "HF_HUB_OFFLINE" in msg


def test_offline_hub_id_found_in_cache(monkeypatch, tmp_path):
    import huggingface_hub.constants as hub_constants

    commit = "a" * 40
    repo = tmp_path / "models--suzak-tests--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert Path(resolve_model_path("suzak-tests/cached")) == snapshot


def test_online_hub_id_is_left_to_the_libraries(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert resolve_model_path("Qwen/Qwen2.5-VL-3B-Instruct") == "Qwen/Qwen2.5-VL-3B-Instruct"


# ---- family, dtype, attention, processor -----------------------------------------------------------


def test_model_family_rejects_other_architectures(tmp_path, loaded):
    assert model_family(loaded[0].config) == "qwen2_5_vl"
    assert model_family({"model_type": "qwen2_vl"}) == "qwen2_vl"
    with pytest.raises(SuzakError, match="'llama'"):
        model_family({"model_type": "llama"})
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(SuzakError, match="not supported"):
        load_model(folder)


def test_pick_attn_implementation(monkeypatch):
    monkeypatch.setattr(models, "_flash_attn_usable", lambda: False)
    assert pick_attn_implementation() == "sdpa"
    assert pick_attn_implementation("eager") == "eager"
    with pytest.raises(SuzakError, match="flash-attn"):
        pick_attn_implementation("flash_attention_2")
    with pytest.raises(SuzakError, match="not one of"):
        pick_attn_implementation("flash")
    monkeypatch.setattr(models, "_flash_attn_usable", lambda: True)
    assert pick_attn_implementation() == "flash_attention_2"
    assert pick_attn_implementation(dtype="float32") == "sdpa"  # flash-attn has no fp32 kernels


def test_pick_dtype():
    assert pick_dtype("auto", "cpu") == "float32"
    assert pick_dtype("auto", "cuda:0") == "bfloat16"
    assert pick_dtype("bfloat16", "cpu") == "bfloat16"
    with pytest.raises(SuzakError, match="dtype 'fp8'"):
        pick_dtype("fp8")


def test_load_model_dtype_override(tiny_dir):
    model = load_model(tiny_dir, dtype="bfloat16", attn_implementation="eager")
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "eager"


def test_load_processor_pixel_bounds(tiny_dir):
    processor = load_processor(tiny_dir, min_pixels=28 * 28, max_pixels=16 * 28 * 28)
    grid = processor.image_processor(images=[_image()], return_tensors="pt")["image_grid_thw"][0]
    assert int(grid.prod()) // 4 <= 16
    only_max = load_processor(tiny_dir, max_pixels=64 * 28 * 28)
    assert only_max.image_processor.size["shortest_edge"] == tiny.DEFAULT_MIN_PIXELS
    with pytest.raises(SuzakError, match="min_pixels"):
        load_processor(tiny_dir, min_pixels=10_000, max_pixels=5_000)

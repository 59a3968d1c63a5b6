"""The benchmark package: bench/make_arch.py's real-shape folders and bench/grpo_step.py end to end on the tiny model.

    .venv/bin/python -m pytest tests/unit/test_bench_smoke.py -q                  # fast checks (~40 s)
    .venv/bin/python -m pytest tests/unit/test_bench_smoke.py -q -m "slow"        # + the CPU run through vLLM (~2 min)

The fast tests check what the GPU numbers rest on: the 3B/7B and Qwen3-VL 2B/4B/8B configs count exactly the
parameters of the public architectures, the tokenizer has Qwen's special ids, a weight-less folder builds at random
through suzak's own loader, and the prompts have the reference step's shape (512 visual tokens, the asked-for text
tokens).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import grpo_step, make_arch

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from suzak.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("bench") / "tiny")


@pytest.fixture(scope="module")
def bench_tokenizer():
    return make_arch.build_tokenizer()


def _meta_param_count(config) -> int:
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch,hub_id,params", [("3b", "Qwen/Qwen2.5-VL-3B-Instruct", 3_754_622_976),
                                                ("7b", "Qwen/Qwen2.5-VL-7B-Instruct", 8_292_166_656)])
def test_arch_configs_have_the_public_shapes(arch, hub_id, params):
    from trainer.memory import count_parameters

    cfg = make_arch.build_config(arch)
    text, vision = cfg.text_config, cfg.vision_config
    # trainer/memory.py KNOWN_ARCHS (the hub config.json values), and the public parameter totals.
    assert _meta_param_count(cfg) == count_parameters(hub_id).total == params
    assert (text.vocab_size, cfg.tie_word_embeddings) == ((151936, True) if arch == "3b" else (152064, False))
    assert text.rope_parameters["mrope_section"] == [16, 24, 24]
    assert (vision.depth, vision.hidden_size, vision.window_size) == (32, 1280, 112)
    assert vision.fullatt_block_indexes == [7, 15, 23, 31] and vision.out_hidden_size == text.hidden_size
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)


@pytest.mark.parametrize("arch,hub_id,params", [("qwen3vl-2b", "Qwen/Qwen3-VL-2B-Instruct", 2_127_532_032),
                                                ("qwen3vl-4b", "Qwen/Qwen3-VL-4B-Instruct", 4_437_815_808),
                                                ("qwen3vl-8b", "Qwen/Qwen3-VL-8B-Instruct", 8_767_123_696)])
def test_qwen3vl_arch_configs_have_the_public_shapes(arch, hub_id, params):
    from trainer.memory import count_parameters

    cfg = make_arch.build_config(arch)
    text, vision = cfg.text_config, cfg.vision_config
    assert cfg.model_type == "qwen3_vl" and cfg.architectures == ["Qwen3VLForConditionalGeneration"]
    assert _meta_param_count(cfg) == count_parameters(hub_id).total == params
    assert text.rope_parameters["mrope_section"] == [24, 20, 20] and text.rope_parameters["mrope_interleaved"]
    assert (text.head_dim, text.vocab_size, vision.patch_size, vision.out_hidden_size) == \
        (128, 151936, 16, text.hidden_size)
    assert len(vision.deepstack_visual_indexes) == 3 and max(vision.deepstack_visual_indexes) < vision.depth
    assert cfg.tie_word_embeddings == (arch != "qwen3vl-8b")
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id) == \
        (151655, 151656, 151652, 151653)


def test_qwen3vl_8b_folder_has_its_processor_and_shapes(tmp_path):
    from suzak.models import load_processor

    folder = make_arch.make_arch(tmp_path / "q3", "qwen3vl-8b")
    assert not make_arch.has_weights(folder)
    processor = load_processor(folder, min_pixels=4 * 1024, max_pixels=512 * 1024)
    assert type(processor).__name__ == "Qwen3VLProcessor" and processor.image_processor.patch_size == 16
    args = grpo_step.parse_args(["--arch", "qwen3vl-8b"])
    assert args.factor == 32 and grpo_step.image_size(args.visual_tokens, args.factor) == (1024, 512)
    over = grpo_step.base_overrides(args, folder, tmp_path / "run", on_cuda=True)
    assert "model.max_pixels=524288" in over and "model.min_pixels=4096" in over


def test_tokenizer_has_qwen_ids_and_one_token_per_ascii_char(bench_tokenizer):
    tok = bench_tokenizer
    assert len(tok) == 151665  # as the real Qwen2.5 tokenizer
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>", "<|image_pad|>", "<|file_sep|>"]) == \
        [151643, 151645, 151655, 151664]
    assert (tok.eos_token_id, tok.pad_token_id) == (151645, 151643)
    text = "How many cubes? Output <answer> 3 </answer>."
    assert len(tok(text, add_special_tokens=False)["input_ids"]) == len(text)
    # Any id a random policy samples decodes, including the filler range.
    assert tok.decode([100000]) == "<t100000>"


def test_image_size_gives_exactly_the_visual_tokens():
    from suzak.images import visual_tokens

    assert grpo_step.image_size(512) == (896, 448) and 896 * 448 == 401408
    for n in (512, 64, 187, 13):
        width, height = grpo_step.image_size(n)
        assert visual_tokens(height, width, 3136 if n >= 4 else 784, n * 784) == n
        width, height = grpo_step.image_size(n, 32)  # Qwen3-VL
        assert visual_tokens(height, width, 4096 if n >= 4 else 1024, n * 1024, 32) == n


def test_weightless_folder_builds_at_random_through_suzaks_loader(tiny_dir, tmp_path, monkeypatch, capsys):
    import suzak.models as models

    monkeypatch.setattr(models, "load_model", models.load_model)  # undone after the test
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for f in tiny_dir.iterdir():
        if f.suffix != ".safetensors":
            (empty / f.name).write_bytes(f.read_bytes())
    make_arch.install_random_init_loader()
    saved = models.load_model(str(tiny_dir), dtype="float32")
    assert "random init" not in capsys.readouterr().out  # weights on disk: read as before
    built = models.load_model(str(empty), dtype="float32")
    assert f"{empty} has no weights: random init" in capsys.readouterr().out
    assert [(n, p.shape) for n, p in built.named_parameters()] == [(n, p.shape) for n, p in saved.named_parameters()]
    from safetensors.torch import load_file

    disk = load_file(str(tiny_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]  # older key layout
    assert torch.equal(saved.state_dict()["model.language_model.layers.0.mlp.up_proj.weight"], disk)


def test_prompts_have_the_asked_for_text_tokens(tiny_dir):
    from suzak.models import load_processor
    from suzak.tasks import get_task

    task = get_task("clevr_count")
    processor = load_processor(tiny_dir, min_pixels=3136, max_pixels=64 * 784)
    args = grpo_step.parse_args(["--arch", "tiny", "--prompts", "3", "--text-tokens", "120"])
    examples, shape = grpo_step.make_examples(args, processor, task)
    counts = [grpo_step.text_tokens(processor, task, e.problem) for e in examples]
    # The tiny tokenizer merges characters, so the shortest padding can overshoot by a token or two.
    assert all(120 <= c <= 123 for c in counts) and shape["text_tokens"] == counts[0]
    assert {e.image.size for e in examples} == {(224, 224)} and len({e.problem for e in examples}) == 3


def test_training_settings_map_to_config_keys():
    from suzak.config import load_config

    lora = load_config(None, grpo_step.train_overrides("lora"))
    full = load_config(None, grpo_step.train_overrides("full"))
    frozen = load_config(None, grpo_step.train_overrides("frozen_vision"))
    assert lora.model.lora.enabled and lora.model.freeze_vision and lora.model.gradient_checkpointing
    assert not full.model.lora.enabled and not full.model.freeze_vision
    assert not frozen.model.lora.enabled and frozen.model.freeze_vision


@pytest.mark.slow
@pytest.mark.vllm
def test_grpo_step_runs_end_to_end_on_the_tiny_model(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    cmd = [sys.executable, "-m", "bench.grpo_step", "--arch", "tiny", "--prompts", "2", "--G", "2",
           "--completion", "8", "--steps", "1", "--warmup", "0", "--visual-tokens", "16", "--text-tokens", "40",
           "--compare-unshared", "1", "--work", str(tmp_path / "work")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    try:
        stdout, stderr = proc.communicate(timeout=170)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the bench stops its rollout server on the way out
        stdout, stderr = proc.communicate(timeout=60)
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, stdout[-3000:] + stderr[-3000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result == json.loads((tmp_path / "out" / "grpo_step_tiny.json").read_text())
    for key in ("tokens_per_step", "step_s", "tokens_per_s_per_gpu", "phases_s", "mfu_learner", "mfu_step",
                "memory", "shape", "setting", "steps", "params"):
        assert key in result
    assert {"generate", "logprobs", "update", "weight_sync"} <= set(result["phases_s"])
    # ignore_eos reached the server: every completion has the full length, and the token count adds up.
    assert result["completion_len_mean"] == 8
    shape = result["shape"]
    assert shape["visual_tokens"] == 16 and shape["prompt_tokens"] == 16 + shape["text_tokens"]
    assert result["tokens_per_step"] == 4 * (shape["prompt_tokens"] + 8)
    assert result["setting"]["transport"] == "files" and result["train"] == "full"
    # The shared-prompt step, then the unshared baseline on the same learner, summarised apart.
    assert result["setting"]["share_prompt"] is True
    assert [r["share_prompt"] for r in result["steps"]] == [True, False]
    assert result["unshared"]["tokens_per_step"] == result["tokens_per_step"]


def test_learner_step_updates_without_a_server_and_profiles(tmp_path, capsys, monkeypatch):
    from bench import learner_step

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert learner_step.main(["--arch", "tiny", "--prompts", "2", "--G", "2", "--completion", "8", "--steps", "1",
                              "--warmup", "0", "--visual-tokens", "16", "--text-tokens", "40", "--profile",
                              "--work", str(tmp_path / "work")]) == 0
    result = json.loads((tmp_path / "out" / "learner_step_tiny.json").read_text())
    assert result["update_s"] > 0 and result["learner_flops"] > 0 and result["share_prompt"] is True
    assert [u["warmup"] for u in result["updates"]] == [False] and result["updates"][0]["grad_norm"] > 0
    assert result["profile"]["top_device"] and (tmp_path / "out" / "learner_step_trace.json").is_file()
    assert "aten::" in capsys.readouterr().out  # the profiler's table


def test_learner_step_variants_agree_and_each_is_timed(tmp_path, monkeypatch):
    from bench import learner_step

    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    assert learner_step.main(["--arch", "tiny", "--prompts", "2", "--G", "2", "--completion", "8", "--steps", "2",
                              "--warmup", "1", "--visual-tokens", "16", "--text-tokens", "40", "--work",
                              str(tmp_path / "work"), "--variants", "loop:vision=per_window", "packed:vision=packed",
                              "nockpt:ckpt=off,mbt=64"]) == 0
    result = json.loads((tmp_path / "out" / "learner_step_tiny.json").read_text())
    variants = result["variants"]
    assert list(variants) == ["loop", "packed", "nockpt"]
    for record in variants.values():
        assert record["logp_max_diff_vs_first"] < 1e-5  # the settings change speed, not the numbers
        assert [u["warmup"] for u in record["updates"]] == [True, False, False] and record["update_s"] > 0
    assert variants["nockpt"]["settings"] == {"ckpt": "off", "mbt": "64"}
    with pytest.raises(SystemExit, match="unknown key 'attn'"):
        learner_step.parse_variant("x:attn=flex")
    with pytest.raises(SystemExit, match="mbt=lots is not one of a token count"):
        learner_step.parse_variant("x:mbt=lots")


@pytest.mark.parametrize("arch", ["tiny", "tiny-qwen3vl"])
def test_vision_tower_bench_times_both_settings_on_the_same_features(arch, tmp_path, monkeypatch):
    from bench import vision_tower

    monkeypatch.setenv("OUT", str(tmp_path))
    assert vision_tower.main(["--arch", arch, "--images", "3", "--size", "224x160", "--repeats", "1"]) == 0
    result = json.loads((tmp_path / f"vision_tower_{arch}.json").read_text())
    assert result["max_abs_diff"] == 0.0 and set(result["fwd_bwd_s"]) == {"per_window", "packed"}
    # Qwen2.5-VL: 224x160 px is 8x5 merged tokens, two 4x4-token windows across and two down; Qwen3-VL: per image.
    assert result["windows_per_forward"] == (3 * 4 if arch == "tiny" else 3)


def test_scaling_points_vary_one_quantity_at_a_time_and_plot(tmp_path):
    from bench import scaling

    args, rest = scaling.parse_args(["--arch", "tiny", "--G-values", "4", "8", "16", "--completions", "128", "256",
                                     "--visual-tokens-values", "512"])
    pts = scaling.points(args)
    assert pts[0] == {"G": 8, "completion": 256, "visual_tokens": 512, "varies": "reference"}
    assert [(p["varies"], p["G"], p["completion"]) for p in pts[1:]] == [("G", 4, 256), ("G", 16, 256),
                                                                          ("completion", 8, 128)]
    big = scaling.largest(args, rest)
    assert (big.G, big.completion, big.visual_tokens) == (16, 256, 512)
    result = {"arch": "tiny", "train": "full", "prompts": 2, "device": "cpu", "points": [
        dict(p, step_s=1.0 + i, generate_s=0.2, update_s=0.7 + i, tokens_per_s_per_gpu=100.0)
        for i, p in enumerate(pts)]}
    assert scaling.table(result).count("\n") == len(pts) + 1
    png = scaling.plot(result, tmp_path / "scaling.png")
    assert png.stat().st_size > 10_000


@pytest.mark.vllm
def test_trl_prompts_collapsed_to_one_image_pad_reach_vllm_as_the_trainer_sees_them(tmp_path):
    """TRL hands vLLM token ids with each image already expanded; vLLM's own Qwen2.5-VL processor expands the
    first pad again (the prompt grows by N - 1). Collapsed to one pad, vLLM builds the trainer's prompt exactly."""
    import inspect

    from PIL import Image
    from transformers import AutoProcessor
    from vllm.config import ModelConfig
    from vllm.multimodal import MULTIMODAL_REGISTRY
    from vllm.multimodal.processing.context import TimingContext
    from vllm.multimodal.processing.inputs import ProcessorInputs

    from bench.trl_baseline import collapse_expanded_images

    folder = make_arch.make_arch(tmp_path / "tiny", "tiny")
    processor = AutoProcessor.from_pretrained(str(folder))
    image = Image.new("RGB", (448, 224))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many objects?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    trainer_ids = list(processor(text=[text], images=[image])["input_ids"][0])
    pads = trainer_ids.count(processor.image_token_id)
    vllm_processor = MULTIMODAL_REGISTRY.create_processor(ModelConfig(model=str(folder), dtype="float32"))
    parse = getattr(vllm_processor.info, "parse_mm_data", None) or vllm_processor.data_parser.parse_mm_data

    def vllm_prompt(ids: list[int]) -> list[int]:
        kw = {"timing_ctx": TimingContext()} if "timing_ctx" in inspect.signature(vllm_processor.apply).parameters \
            else {}
        out = vllm_processor.apply(ProcessorInputs(prompt=ids, mm_data_items=parse({"image": image})), **kw)
        return out["prompt_token_ids"] if isinstance(out, dict) else out.prompt_token_ids

    assert pads > 1 and len(vllm_prompt(trainer_ids)) == len(trainer_ids) + pads - 1  # what TRL's vLLM generates from
    collapsed, dropped = collapse_expanded_images({"prompt_token_ids": trainer_ids, "multi_modal_data": {}},
                                                  processor.image_token_id)
    assert dropped == pads - 1 and list(vllm_prompt(collapsed["prompt_token_ids"])) == trainer_ids

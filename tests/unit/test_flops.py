"""bench/flops.py: the real FLOPs of a GRPO step, checked against the matmul weights of real (tiny) models.

    .venv/bin/python -m pytest tests/unit/test_flops.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from bench.flops import Dims, grpo_step_flops


def _linear_weights(module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


@pytest.mark.parametrize("family", ["qwen25vl", "qwen3vl"])
def test_per_token_flops_are_twice_the_matmul_weights_the_token_meets(family, tmp_path):
    from suzak.models import load_model
    from suzak.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / family, family=family)
    model = load_model(folder, dtype="float32", device="cpu")
    dims = Dims.from_config(json.loads((folder / "config.json").read_text()))
    lm = model.model.language_model
    assert dims.lm_token() == 2 * (_linear_weights(lm) + model.lm_head.weight.numel())
    visual = model.model.visual
    per_patch = sum(_linear_weights(block) for block in visual.blocks)
    tokens = 16
    mergers = sum(_linear_weights(m) for name, m in visual.named_children() if "merger" in name)
    linear = 2 * (4 * tokens * per_patch + tokens * mergers)
    # The rest of image() is attention (4 * hidden per query-key pair): positive and below the linear part here.
    rest = dims.image(tokens) - linear
    assert 0 < rest < linear


def test_shared_rows_cost_less_than_one_row_per_rollout_and_the_modes_order():
    dims = Dims(layers=28, hidden=3584, kv_dim=512, intermediate=18944, vocab=152064, vis_depth=32, vis_hidden=1280,
                vis_intermediate=3420, vis_mlp_mats=3, vis_window_patches=64, vis_full_blocks=4, mergers=1,
                merge_out=3584)
    shape = dict(prompts=64, G=8, prompt_tokens=812, visual_tokens=512, completion=256, beta=0.04)
    shared = grpo_step_flops(dims, train="full", **shape)
    unshared = grpo_step_flops(dims, train="full", share_prompt=False, **shape)
    assert shared["generation"] == unshared["generation"]
    # 812 + 8 x 256 tokens a group instead of 8 x 1,068: about a third of the learner's work.
    assert 0.3 < shared["learner"] / unshared["learner"] < 0.4
    full, lora = shared["learner"], grpo_step_flops(dims, train="lora", **shape)["learner"]
    frozen = grpo_step_flops(dims, train="frozen_vision", **shape)["learner"]
    assert lora < frozen < full
    no_ref = grpo_step_flops(dims, train="full", **dict(shape, beta=0.0))["learner"]
    assert no_ref < full

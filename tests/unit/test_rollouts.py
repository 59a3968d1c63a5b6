"""Learner-side rollout batching (trainer/rollouts.py) and the shared image encoding of trainer/grpo.py.

    .venv/bin/python -m pytest tests/unit/test_rollouts.py -q

The G rollouts of a group share one image; the learner encodes it once per micro-batch, and with
grpo.share_prompt runs the whole prompt once per group (one row: prompt, then the G completions). These tests
check that both give the same log-probs and the same gradients as one row per rollout, and that micro-batches
keep a group's rollouts together; the model tests run on the tiny Qwen2.5-VL and the tiny Qwen3-VL (DeepStack).
"""

from __future__ import annotations

import pytest
import torch

from suzak.config import SynthConfig
from suzak.errors import SuzakError
from suzak.models import load_model, load_processor
from suzak.tasks import get_task
from suzak.tasks.sources import synth_examples
from trainer.forward import completion_logps
from trainer.rollouts import (MicroBatch, Rollout, build_micro_batch, cut_group_micro_batches, cut_micro_batches,
                              prepare_prompt)


# 4..64 visual tokens of each family: 28 px (Qwen2.5-VL) or 32 px (Qwen3-VL, with DeepStack) per token.
PIXELS = {"qwen25vl": (3136, 50176), "qwen3vl": (4096, 65536)}


@pytest.fixture(scope="module", params=["qwen25vl", "qwen3vl"])
def tiny(request, tmp_path_factory):
    from suzak.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", family=request.param)
    model = load_model(path, dtype="float32")
    min_pixels, max_pixels = PIXELS[request.param]
    return model, load_processor(path, min_pixels=min_pixels, max_pixels=max_pixels)


@pytest.fixture(scope="module")
def prompts(tiny):
    model, processor = tiny
    min_pixels, max_pixels = PIXELS["qwen3vl" if model.config.model_type == "qwen3_vl" else "qwen25vl"]
    task = get_task("clevr_count")
    # Two image sizes, so the images have different grids and token counts.
    examples = (synth_examples(task, SynthConfig(n=2, seed=3, image_width=224, image_height=160))
                + synth_examples(task, SynthConfig(n=1, seed=4, image_width=160, image_height=112)))
    return [prepare_prompt(e, task, processor, prompt="train", system=False, min_pixels=min_pixels,
                           max_pixels=max_pixels) for e in examples]


def _rollouts(prompts, group: int, seed: int = 0) -> list[Rollout]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p in range(len(prompts)):
        for _ in range(group):
            length = int(torch.randint(3, 9, (1,), generator=gen))
            ids = torch.randint(20, 200, (length,), generator=gen).tolist()
            out.append(Rollout(prompt_index=p, completion_ids=ids, text="", rollout_logps=None, finish_reason="stop",
                               policy_version=0))
    return out


def _per_row_batch(mb: MicroBatch, prompts, rollouts) -> MicroBatch:
    """The same micro-batch with every row carrying its own copy of its image (the unshared path)."""
    rows = [rollouts[i].prompt_index for i in mb.rollout_indices]
    return MicroBatch(mb.rollout_indices, mb.input_ids, mb.attention_mask,
                      torch.cat([prompts[p].pixel_values for p in rows]),
                      torch.cat([prompts[p].image_grid_thw for p in rows]), mb.completion_mask, mb.targets,
                      mb.rollout_logps, mb.max_completion, mb.mm_token_type_ids)


def _logps_and_grads(model, mb: MicroBatch, temperature: float = 1.0):
    model.zero_grad()
    logps = completion_logps(model, mb, temperature, torch.device("cpu"))
    # Weight tokens unevenly, so a mix-up of which log-prob lands where would change the gradients.
    weights = torch.linspace(0.5, 1.5, logps.numel()).view(logps.shape)
    (logps * mb.completion_mask * weights).sum().backward()
    return logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(result_a, result_b):
    (a, grads_a), (b, grads_b) = result_a, result_b
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any("visual" in n for n in grads_a)  # the vision tower is trained through the shared features
    if any("deepstack" in n for n in grads_b):  # Qwen3-VL: the DeepStack maps reach the LM through the shared path
        assert any("deepstack_merger_list" in n for n in grads_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_shared_image_encoding_equals_per_rollout_encoding(tiny, prompts):
    model, processor = tiny
    rollouts = _rollouts(prompts, group=3)
    # Interleave the groups, so the distinct-image bookkeeping is exercised, not just contiguous rows.
    indices = [0, 3, 6, 1, 4, 7, 2, 5, 8]
    pad = processor.tokenizer.pad_token_id
    shared = build_micro_batch(indices, rollouts, prompts, pad, set())
    assert shared.pixel_values.shape[0] == sum(p.pixel_values.shape[0] for p in prompts)  # each image once
    unshared = _per_row_batch(shared, prompts, rollouts)
    assert shared.completion_mask.sum() > 0
    _assert_same(_logps_and_grads(model, shared), _logps_and_grads(model, unshared))


def test_shared_prompt_rows_equal_one_row_per_rollout(tiny, prompts):
    model, processor = tiny
    rollouts = _rollouts(prompts, group=3, seed=5)
    rollouts[4].rejected = True  # a rejected completion is left out of its group's row and out of the loss
    indices = [0, 3, 6, 1, 4, 7, 2, 5, 8]
    pad = processor.tokenizer.pad_token_id
    packed = build_micro_batch(indices, rollouts, prompts, pad, set(), share_prompts=True)
    shared = packed.shared
    assert shared.input_ids.shape[0] == len(prompts)  # one row per group
    assert shared.input_ids.shape[1] < packed.input_ids.shape[0] * packed.input_ids.shape[1] / len(prompts)
    assert shared.dest.numel() == int(packed.completion_mask.sum())
    unshared = _per_row_batch(packed, prompts, rollouts)
    _assert_same(_logps_and_grads(model, packed, 0.7), _logps_and_grads(model, unshared, 0.7))


def test_shared_prompt_mask_keeps_completions_apart(tiny, prompts):
    """A completion must not see its siblings: changing one completion leaves the others' log-probs unchanged."""
    model, processor = tiny
    rollouts = _rollouts(prompts, group=3, seed=6)
    pad = processor.tokenizer.pad_token_id
    before = completion_logps(model, build_micro_batch([0, 1, 2], rollouts, prompts, pad, set(), share_prompts=True),
                              1.0, torch.device("cpu")).detach()
    rollouts[1].completion_ids = [7] * len(rollouts[1].completion_ids)
    after = completion_logps(model, build_micro_batch([0, 1, 2], rollouts, prompts, pad, set(), share_prompts=True),
                             1.0, torch.device("cpu")).detach()
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(before[1], after[1])


def _with_text_attention(model, implementation: str):
    from suzak.kernels import text_config

    config = text_config(model)
    before, config._attn_implementation = config._attn_implementation, implementation
    return before


def test_flex_block_mask_gives_the_dense_mask_log_probs(tiny, prompts):
    """grpo.shared_prompt_attention=flex: the same log-probs as the dense additive mask (forward; FlexAttention has
    no CPU backward, so the gradients are checked on a GPU in tests/integration/test_full_param_gpu.py)."""
    from suzak.kernels import use_flex_for_text

    model, processor = tiny
    rollouts = _rollouts(prompts, group=3, seed=7)
    pad = processor.tokenizer.pad_token_id
    mb = build_micro_batch([0, 3, 6, 1, 4, 7, 2, 5, 8], rollouts, prompts, pad, set(), share_prompts=True)
    mask = mb.shared.block_mask("cpu")
    assert mask.shape == (len(prompts), 1, mb.shared.segments.shape[1], mb.shared.segments.shape[1])
    with torch.no_grad():
        dense = completion_logps(model, mb, 1.0, torch.device("cpu"))
        use_flex_for_text(model)
        try:
            flex = completion_logps(model, mb, 1.0, torch.device("cpu"))
        finally:
            _with_text_attention(model, "sdpa")
    assert dense.abs().sum() > 0
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_flex_block_mask_gives_the_dense_mask_gradients_on_a_gpu(tiny, prompts):
    """The backward that CPU FlexAttention lacks: log-probs and every gradient equal the dense mask's on CUDA."""
    import copy

    from suzak.kernels import use_flex_for_text

    model = copy.deepcopy(tiny[0]).cuda()
    rollouts = _rollouts(prompts, group=3, seed=8)
    mb = build_micro_batch([0, 3, 6, 1, 4, 7, 2, 5, 8], rollouts, prompts, tiny[1].tokenizer.pad_token_id, set(),
                           share_prompts=True)

    def logps_and_grads():
        model.zero_grad()
        logps = completion_logps(model, mb, 1.0, torch.device("cuda"))
        weights = torch.linspace(0.5, 1.5, logps.numel(), device="cuda").view(logps.shape)
        (logps * mb.completion_mask.cuda() * weights).sum().backward()
        return logps.detach().cpu(), {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None}

    dense_logps, dense_grads = logps_and_grads()
    use_flex_for_text(model)
    flex_logps, flex_grads = logps_and_grads()
    # Triton's fp32 dots may run in TF32 (10-bit mantissa), so this compares at 1e-3, not the CPU tests' 1e-5.
    torch.testing.assert_close(flex_logps, dense_logps, rtol=1e-3, atol=1e-3)
    assert flex_grads.keys() == dense_grads.keys() and any("visual" in n for n in flex_grads)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(flex_grads[name], grad, rtol=2e-3, atol=2e-4, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only host")
def test_flex_needs_a_cuda_learner(tmp_path):
    from suzak.config import load_config
    from trainer.grpo import GRPOLearner

    cfg = load_config(None, ["grpo.shared_prompt_attention=flex"])
    with pytest.raises(SuzakError, match="needs a CUDA learner .* use grpo.shared_prompt_attention=bias"):
        GRPOLearner(cfg, get_task("clevr_count"), [], None, tmp_path)


def test_group_micro_batches_hold_whole_groups_within_budget(prompts):
    rollouts = _rollouts(prompts, group=4, seed=2)
    packed_length = {p: len(prompts[p].input_ids) + sum(len(r.completion_ids) for r in rollouts if r.prompt_index == p)
                     for p in range(len(prompts))}
    budget = 2 * max(packed_length.values())
    batches = cut_group_micro_batches(rollouts, prompts, token_budget=budget)
    assert sorted(i for b in batches for i in b) == list(range(len(rollouts)))
    assert len(batches) == 2
    for b in batches:
        groups = {rollouts[i].prompt_index for i in b}
        assert all(sum(rollouts[i].prompt_index == p for i in b) == 4 for p in groups)  # whole groups
        assert len(groups) * max(packed_length[p] for p in groups) <= budget


def test_micro_batches_keep_groups_together(prompts):
    rollouts = _rollouts(prompts, group=4, seed=1)
    row_tokens = max(len(p.input_ids) for p in prompts) + 8
    batches = cut_micro_batches(rollouts, prompts, token_budget=row_tokens * 4)
    assert sorted(i for b in batches for i in b) == list(range(len(rollouts)))
    for b in batches:
        assert len({rollouts[i].prompt_index for i in b}) == 1  # one group of 4 fills the budget
    mb = build_micro_batch(batches[0], rollouts, prompts, 0, set())
    assert mb.pixel_values.shape[0] == prompts[rollouts[batches[0][0]].prompt_index].pixel_values.shape[0]
    assert len(mb.row_images) == 4 and mb.row_grid_thw.shape == (4, 3)


def test_informative_groups_come_first_and_the_batch_keeps_its_size():
    from trainer.grpo import keep_informative_groups

    rewards = {0: [1.0, 1.0], 1: [0.0, 1.0], 2: [0.0, 0.0], 3: [2.0, 0.5]}  # groups 1 and 3 are informative
    prompts = [f"prompt-{p}" for p in rewards]
    rollouts = [Rollout(prompt_index=p, completion_ids=[p, i], text="", rollout_logps=None, finish_reason="stop",
                        policy_version=0, reward=v) for p, vs in rewards.items() for i, v in enumerate(vs)]
    kept, kept_prompts, informative = keep_informative_groups(rollouts, prompts, count=3)
    assert kept_prompts == ["prompt-1", "prompt-3", "prompt-0"]  # informative first, then filled in order
    assert informative == 0.5
    assert [(r.prompt_index, r.completion_ids) for r in kept] == [(0, [1, 0]), (0, [1, 1]), (1, [3, 0]), (1, [3, 1]),
                                                                   (2, [0, 0]), (2, [0, 1])]


def test_learner_prompt_renders_as_the_server_renders_the_wire_prompt(tiny):
    """Learner and server render through the one suzak.prompts.hf_messages; a system prompt included, whose string
    content the chat template renders as a single text part would be."""
    from suzak import wire
    from suzak.images import load_image
    from suzak.prompts import hf_messages

    _, processor = tiny
    task = get_task("clevr_count")
    example = synth_examples(task, SynthConfig(n=1, seed=5, image_width=224, image_height=160))[0]
    prep = prepare_prompt(example, task, processor, prompt="train", system=True, min_pixels=3136, max_pixels=50176)
    served = wire.Prompt.model_validate({"messages": prep.messages})  # what the server receives
    rendered = hf_messages(served.messages)
    assert rendered[0] == {"role": "system", "content": prep.messages[0]["content"]}
    text = processor.apply_chat_template(rendered, tokenize=False, add_generation_prompt=True)
    image = load_image(served.messages[1].content[0].image, field="image")
    assert processor(text=[text], images=[image], return_tensors="pt")["input_ids"][0].tolist() == prep.input_ids
    as_parts = [{"role": "system", "content": [{"type": "text", "text": rendered[0]["content"]}]}] + rendered[1:]
    assert processor.apply_chat_template(as_parts, tokenize=False, add_generation_prompt=True) == text

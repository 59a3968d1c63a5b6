"""Learner-side rollout batching (trainer/rollouts.py) and the shared image encoding of trainer/grpo.py.

    .venv/bin/python -m pytest tests/unit/test_rollouts.py -q

The G rollouts of a group share one image; the learner encodes it once per micro-batch. These tests check that
this gives the same log-probs and the same gradients as encoding it once per rollout, and that micro-batches
keep a group's rollouts together.
"""

from __future__ import annotations

import pytest
import torch

from suzak.config import SynthConfig
from suzak.models import load_model, load_processor
from suzak.tasks import get_task
from suzak.tasks.sources import synth_examples
from trainer.grpo import completion_logps
from trainer.rollouts import MicroBatch, Rollout, build_micro_batch, cut_micro_batches, prepare_prompt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from suzak.tiny import build_tiny_model

    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
    model = load_model(path, dtype="float32")
    return model, load_processor(path, min_pixels=3136, max_pixels=50176)


@pytest.fixture(scope="module")
def prompts(tiny):
    _, processor = tiny
    task = get_task("clevr_count")
    # Two image sizes, so the images have different grids and token counts.
    examples = (synth_examples(task, SynthConfig(n=2, seed=3, image_width=224, image_height=160))
                + synth_examples(task, SynthConfig(n=1, seed=4, image_width=160, image_height=112)))
    return [prepare_prompt(e, task, processor, prompt="train", system=False, min_pixels=3136, max_pixels=50176)
            for e in examples]


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


def test_shared_image_encoding_equals_per_rollout_encoding(tiny, prompts):
    model, processor = tiny
    rollouts = _rollouts(prompts, group=3)
    # Interleave the groups, so the distinct-image bookkeeping is exercised, not just contiguous rows.
    indices = [0, 3, 6, 1, 4, 7, 2, 5, 8]
    pad = processor.tokenizer.pad_token_id
    shared = build_micro_batch(indices, rollouts, prompts, pad, set())
    assert shared.pixel_values.shape[0] == sum(p.pixel_values.shape[0] for p in prompts)  # each image once
    unshared = _per_row_batch(shared, prompts, rollouts)

    results = []
    for mb in (shared, unshared):
        model.zero_grad()
        logps = completion_logps(model, mb, 1.0, torch.device("cpu"))
        (logps * mb.completion_mask).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logps.detach(), grads))
    (a, grads_a), (b, grads_b) = results
    assert shared.completion_mask.sum() > 0
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert any("visual" in n for n in grads_a)  # the vision tower is trained through the shared features
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)


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

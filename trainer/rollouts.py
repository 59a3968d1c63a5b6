"""Rollouts on the learner side: prompts out to the server, completions back into learner tensors.

Used by trainer/grpo.py (`suzak train`). The learner rebuilds every prompt with its own processor from the same
resized image the server saw, and checks that its token ids equal the server's: equal ids imply equal image grids
and equal mrope positions on both sides, which the log-prob agreement depends on.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from suzak.errors import SuzakError
from suzak.prompts import example_messages, hf_messages
from suzak.tasks import Example, Task
from suzak.wire import ChatMessage, GenerateRequest, GenerateResponse, Prompt, SamplingParams


@dataclass
class PreparedPrompt:
    """One prompt as both sides see it: wire messages for the server, tensors for the learner."""

    example: Example
    messages: list[dict]
    input_ids: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    mm_token_type_ids: list[int] | None = None
    """transformers 5.x builds Qwen2.5-VL's 3-D (mrope) image positions only when given these; without them
    the forward silently falls back to 1-D positions and the log-probs drift from vLLM's."""


@dataclass
class Rollout:
    """One completion of one prompt, with everything the loss needs."""

    prompt_index: int
    completion_ids: list[int]
    text: str
    rollout_logps: list[float] | None
    finish_reason: str | None
    policy_version: int
    rewards: dict[str, float] = field(default_factory=dict)
    reward: float = 0.0
    advantage: float = 0.0
    rejected: bool = False
    """True when the completion holds vision tokens: kept for group statistics, masked from the loss."""


def prepare_prompt(example: Example, task: Task, processor, *, prompt: str, system: bool,
                   min_pixels: int, max_pixels: int) -> PreparedPrompt:
    """The example's messages (suzak.prompts: image resized to the budget at the model's patch factor, sent as a
    data URL), tokenized the same way the server will."""
    from suzak.families import processor_factor

    messages, image = example_messages(task, example, prompt=prompt, system=system, min_pixels=min_pixels,
                                       max_pixels=max_pixels, factor=processor_factor(processor))
    text = processor.apply_chat_template(hf_messages(messages), tokenize=False, add_generation_prompt=True)
    enc = processor(text=[text], images=[image], return_tensors="pt")
    mm_types = enc.get("mm_token_type_ids")
    return PreparedPrompt(example, messages, enc["input_ids"][0].tolist(), enc["pixel_values"], enc["image_grid_thw"],
                          None if mm_types is None else mm_types[0].tolist())


@contextmanager
def one_intra_op_thread():
    """Run image processing on one torch thread: its ops are on arrays of a few hundred KB, where waking a thread
    pool costs more than the work (and on a host shared with a CPU rollout server, whose threads hold the other
    cores, each op waits a scheduler slice; bench/RESULTS.md, the embedded default run)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def prepare_prompts(examples: list[Example], task: Task, processor, **kw) -> list[PreparedPrompt]:
    """prepare_prompt for each example, on one intra-op thread (see one_intra_op_thread)."""
    with one_intra_op_thread():
        return [prepare_prompt(example, task, processor, **kw) for example in examples]


def generate_request(prompts: list[PreparedPrompt], *, n: int, temperature: float, top_p: float, top_k: int,
                     max_tokens: int, seed: int | None, ignore_eos: bool = False) -> GenerateRequest:
    return GenerateRequest(
        prompts=[Prompt(messages=[ChatMessage.model_validate(m) for m in p.messages]) for p in prompts],
        sampling=SamplingParams(n=n, temperature=temperature, top_p=top_p, top_k=top_k, max_tokens=max_tokens,
                                seed=seed, ignore_eos=ignore_eos, logprobs=True))


def collect_rollouts(prompts: list[PreparedPrompt], response: GenerateResponse, *,
                     vision_token_ids: set[int]) -> list[Rollout]:
    """Flatten the server's answer into rollouts (group-major), verifying prompt ids and rejecting vision tokens."""
    if len(response.results) != len(prompts):
        raise SuzakError(f"server answered {len(response.results)} prompts for {len(prompts)} sent")
    rollouts = []
    for i, (prep, result) in enumerate(zip(prompts, response.results)):
        if result.prompt_token_ids and result.prompt_token_ids != prep.input_ids:
            raise SuzakError(
                f"prompt {i}: the server tokenized the prompt differently from the learner "
                f"({len(result.prompt_token_ids)} vs {len(prep.input_ids)} tokens). Image grids / mrope positions "
                f"would differ; make sure server and learner use the same model folder and model.min_pixels/max_pixels")
        for c in result.completions:
            rejected = any(t in vision_token_ids for t in c.token_ids) or not c.token_ids
            rollouts.append(Rollout(i, list(c.token_ids), c.text, c.logprobs, c.finish_reason, c.policy_version,
                                    rejected=rejected))
    return rollouts


@dataclass
class SharedPrompts:
    """A micro-batch laid out one row per group: the group's prompt once, then each rollout's completion after it.

    A completion attends to the prompt and to its own earlier tokens only (see `segments`), and its positions
    continue from the prompt's as in its own row, so every token sees what it would see unshared; the prompt
    (image included) runs once per group instead of G times.
    """

    input_ids: torch.Tensor
    """[groups, W] prompt ids, then the completions back to back, right-padded."""
    mm_token_type_ids: torch.Tensor | None
    """[groups, W] the prompts' modality types (completions are text)."""
    prompt_lengths: list[int]
    segments: torch.Tensor
    """[groups, W] 0 on prompt tokens, k on the k-th completion (from 1), -1 on padding."""
    completion_offsets: torch.Tensor
    """[groups, W] j + 1 on a completion's j-th token (its position is the prompt's last + j + 1), else 0."""
    source: torch.Tensor
    """[N] flat indices into the [groups * W] hidden states that predict the loss tokens..."""
    dest: torch.Tensor
    """[N] ...and the flat indices of those tokens in the unshared [B, T-1] layout (completion_mask > 0)."""

    def attention_bias(self, dtype: torch.dtype, device) -> torch.Tensor:
        """[groups, 1, W, W] additive mask: causal, and a completion sees the prompt and itself only."""
        seg = self.segments.to(device)
        width = seg.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        query, key = seg[:, :, None], seg[:, None, :]
        allowed = causal & ((key == 0) | (key == query))
        bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
        return bias.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]

    def block_mask(self, device):
        """The same mask as attention_bias, as FlexAttention's BlockMask: its kernel skips the 128x128 blocks no
        query attends to (one completion's queries against another's keys), which the dense mask computes and
        throws away."""
        from torch.nn.attention.flex_attention import create_block_mask

        seg = self.segments.to(device)

        def shared_prompt(batch, head, query, key):
            return (key <= query) & ((seg[batch, key] == 0) | (seg[batch, key] == seg[batch, query]))

        groups, width = seg.shape
        return create_block_mask(shared_prompt, groups, None, width, width, device=device)


@dataclass
class MicroBatch:
    """Right-padded learner inputs for a few rollouts; completion_mask marks the tokens the loss sees."""

    rollout_indices: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    """Patches of each *distinct* prompt's images, once: rollouts of one group share them."""
    image_grid_thw: torch.Tensor
    """[images, 3] grids of the distinct images in pixel_values."""
    completion_mask: torch.Tensor
    """[B, T] mask over positions whose *next* token is a completion token (aligned with logits[:, :-1])."""
    targets: torch.Tensor
    """[B, T] the next token at each position (aligned with the logits)."""
    rollout_logps: torch.Tensor | None
    max_completion: int
    mm_token_type_ids: torch.Tensor | None = None
    row_images: list[int] = field(default_factory=list)
    """For each row in order, the indices (into image_grid_thw) of its images: the rows' image features.
    Empty: pixel_values already hold every row's images in row order (no sharing)."""
    shared: SharedPrompts | None = None
    """The same rollouts one row per group (prompt once); when set, the forward runs on it instead of the rows."""

    @property
    def row_grid_thw(self) -> torch.Tensor:
        """[images of all rows, 3] grids in row order, for the rows' mrope positions."""
        return self.image_grid_thw[self.row_images] if self.row_images else self.image_grid_thw


def cut_micro_batches(rollouts: list[Rollout], prompts: list[PreparedPrompt], token_budget: int) -> list[list[int]]:
    """Group rollout indices so each micro-batch's padded size (rows x longest row) stays within the token budget."""
    lengths = [len(prompts[r.prompt_index].input_ids) + len(r.completion_ids) for r in rollouts]
    # A group's rollouts stay side by side (groups ordered by their longest row), so a micro-batch holds whole
    # groups and encodes each group's image once (completion_logps shares the vision tower's output).
    group_longest: dict[int, int] = {}
    for r, n in zip(rollouts, lengths):
        group_longest[r.prompt_index] = max(group_longest.get(r.prompt_index, 0), n)
    order = sorted(range(len(rollouts)),
                   key=lambda i: (group_longest[rollouts[i].prompt_index], rollouts[i].prompt_index, lengths[i]))
    return _pack([[i] for i in order], [lengths[i] for i in order], token_budget)


def cut_group_micro_batches(rollouts: list[Rollout], prompts: list[PreparedPrompt],
                            token_budget: int) -> list[list[int]]:
    """Whole groups per micro-batch, sized by their shared layout (groups x longest prompt-plus-completions row)."""
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rollouts):
        groups.setdefault(r.prompt_index, []).append(i)
    length = {p: len(prompts[p].input_ids) + sum(len(rollouts[i].completion_ids) for i in ix)
              for p, ix in groups.items()}
    order = sorted(groups, key=lambda q: (length[q], q))
    return _pack([groups[p] for p in order], [length[p] for p in order], token_budget)


def _pack(units: list[list[int]], lengths: list[int], token_budget: int) -> list[list[int]]:
    """Consecutive units (rollouts, or whole groups) into micro-batches whose padded size, units x longest unit,
    stays within the token budget; a unit over the budget goes alone."""
    batches, current, count, longest = [], [], 0, 0
    for unit, n in zip(units, lengths):
        new_longest = max(longest, n)
        if current and new_longest * (count + 1) > token_budget:
            batches.append(current)
            current, count, new_longest = [], 0, n
        current.extend(unit)
        count += 1
        longest = new_longest
    if current:
        batches.append(current)
    return batches


def build_micro_batch(indices: list[int], rollouts: list[Rollout], prompts: list[PreparedPrompt],
                      pad_id: int, vision_token_ids: set[int], *, share_prompts: bool = False) -> MicroBatch:
    rows, masks, targets, rlogps, mm_rows = [], [], [], [], []
    for idx in indices:
        r = rollouts[idx]
        prompt_ids = prompts[r.prompt_index].input_ids
        completion = [pad_id if t in vision_token_ids else t for t in r.completion_ids]
        ids = prompt_ids + completion
        rows.append(ids)
        mm = prompts[r.prompt_index].mm_token_type_ids
        mm_rows.append(None if mm is None else mm + [0] * len(completion))
        # Position p predicts token p+1: completion token j sits at len(prompt)+j, predicted at len(prompt)+j-1.
        mask = [0.0] * (len(ids) - 1)
        tgt = ids[1:]
        if not r.rejected:
            for j in range(len(completion)):
                mask[len(prompt_ids) - 1 + j] = 1.0
        masks.append(mask)
        targets.append(tgt)
        lp = [0.0] * (len(ids) - 1)
        if r.rollout_logps is not None:
            for j, v in enumerate(r.rollout_logps[: len(completion)]):
                lp[len(prompt_ids) - 1 + j] = float(v)
        rlogps.append(lp)
    width = max(len(x) for x in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    comp_mask = torch.zeros((len(rows), width - 1))
    tgt_t = torch.full((len(rows), width - 1), pad_id, dtype=torch.long)
    rlp_t = torch.zeros((len(rows), width - 1))
    for b, ids in enumerate(rows):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        comp_mask[b, : len(masks[b])] = torch.tensor(masks[b])
        tgt_t[b, : len(targets[b])] = torch.tensor(targets[b])
        rlp_t[b, : len(rlogps[b])] = torch.tensor(rlogps[b])
    mm_t = None
    if all(m is not None for m in mm_rows):
        mm_t = torch.zeros((len(rows), width), dtype=torch.long)
        for b, m in enumerate(mm_rows):
            mm_t[b, : len(m)] = torch.tensor(m)
    pixel_values, grids, row_images = _distinct_images([rollouts[i].prompt_index for i in indices], prompts)
    has_rollout_lp = all(rollouts[i].rollout_logps is not None for i in indices)
    shared = _shared_layout(indices, rollouts, prompts, pad_id, width - 1) if share_prompts else None
    if shared is not None and shared.dest.numel() != int((comp_mask > 0).sum()):
        raise SuzakError("shared-prompt layout and completion mask disagree on the loss tokens")
    return MicroBatch(indices, input_ids, attention, pixel_values, grids, comp_mask, tgt_t,
                      rlp_t if has_rollout_lp else None, max(len(rollouts[i].completion_ids) for i in indices), mm_t,
                      row_images=row_images, shared=shared)


def _shared_layout(indices: list[int], rollouts: list[Rollout], prompts: list[PreparedPrompt], pad_id: int,
                   unshared_width: int) -> SharedPrompts:
    """One row per distinct prompt (in first-appearance order, as `_distinct_images` orders the images)."""
    order: dict[int, list[int]] = {}
    for b, idx in enumerate(indices):
        order.setdefault(rollouts[idx].prompt_index, []).append(b)
    rows, segs, offsets, mm_rows, source, dest = [], [], [], [], [], []
    for g, (p, members) in enumerate(order.items()):
        prompt_ids = prompts[p].input_ids
        ids, seg, off = list(prompt_ids), [0] * len(prompt_ids), [0] * len(prompt_ids)
        for k, b in enumerate(members, start=1):
            r = rollouts[indices[b]]
            if r.rejected:  # no loss on it, and its vision tokens would need features: leave it out
                continue
            start = len(ids)
            ids.extend(r.completion_ids)
            seg.extend([k] * len(r.completion_ids))
            off.extend(range(1, len(r.completion_ids) + 1))
            # Token j of the completion is predicted at the prompt's last position (j = 0), else at start + j - 1.
            source.extend([(g, len(prompt_ids) - 1)] + [(g, start + j - 1) for j in range(1, len(r.completion_ids))])
            dest.extend((b, len(prompt_ids) - 1 + j) for j in range(len(r.completion_ids)))
        rows.append(ids)
        segs.append(seg)
        offsets.append(off)
        mm = prompts[p].mm_token_type_ids
        mm_rows.append(None if mm is None else mm + [0] * (len(ids) - len(mm)))
    width = max(len(x) for x in rows)

    def padded(values: list[list[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)

    mm_t = None if any(m is None for m in mm_rows) else padded(mm_rows, 0)
    return SharedPrompts(padded(rows, pad_id), mm_t, [len(prompts[p].input_ids) for p in order], padded(segs, -1),
                         padded(offsets, 0), torch.tensor([g * width + t for g, t in source], dtype=torch.long),
                         torch.tensor([b * unshared_width + t for b, t in dest], dtype=torch.long))


def _distinct_images(prompt_indices: list[int], prompts: list[PreparedPrompt]):
    """Each distinct prompt's patches once, and for every row the indices of its images among them."""
    first_image: dict[int, int] = {}
    pixel_parts, grid_parts, row_images = [], [], []
    count = 0
    for p in prompt_indices:
        if p not in first_image:
            first_image[p] = count
            pixel_parts.append(prompts[p].pixel_values)
            grid_parts.append(prompts[p].image_grid_thw)
            count += int(prompts[p].image_grid_thw.shape[0])
        row_images.extend(range(first_image[p], first_image[p] + int(prompts[p].image_grid_thw.shape[0])))
    return torch.cat(pixel_parts, dim=0), torch.cat(grid_parts, dim=0), row_images


def vision_token_ids(config) -> set[int]:
    """Token ids that must never appear inside a completion (they would need image features the learner lacks)."""
    ids = set()
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        value = getattr(config, name, None)
        if value is None and hasattr(config, "text_config"):
            value = getattr(config.text_config, name, None)
        if value is not None:
            ids.add(int(value))
    return ids

"""The policy's forward for GRPO: completion log-probs of Qwen2.5-VL / Qwen3-VL rows (suzak/families.py), one row
per rollout or the shared-prompt layout (a group's prompt and image once, its G completions after it), without
full-vocabulary logits.

    from trainer.forward import completion_logps
    logps = completion_logps(model, micro_batch, temperature, device)    # [B, T-1], zero off the completions

Used by trainer/grpo.py (the update, the reference and old-policy passes); tests/unit/test_rollouts.py checks the
shared layout against one row per rollout, in log-probs and gradients.
"""

from __future__ import annotations

import torch

from suzak.errors import SuzakError
from suzak.families import family_of
from suzak.kernels import FLEX_ATTENTION, text_attention_of
from trainer import loss as grpo_loss
from trainer.rollouts import MicroBatch, SharedPrompts

LOGP_CHUNK = 1024


def split_backbone(model):
    """(backbone, lm_head) of a (possibly DDP- and peft-wrapped) Qwen-VL, so log-probs never need full-vocab logits."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # peft forwards attribute lookups, so unwrap explicitly
        inner = inner.get_base_model()
    if not hasattr(inner, "lm_head") or not hasattr(inner, "model"):
        raise SuzakError(f"unsupported model class {type(model).__name__}: expected a Qwen2.5-VL or Qwen3-VL with "
                         ".model and .lm_head")
    return inner.model, inner.lm_head


def image_features(backbone, mb: MicroBatch, device, row_images: list[int] | None = None):
    """The micro-batch's image features for its rows: family.encode_images, then indexed per row.

    The G rollouts of a group share their image: encoding it once per group instead of once per rollout cuts
    the vision tower's work G-fold, and indexing the shared features keeps their gradient exact (it sums over
    the rows, as G separate encodings would). Qwen3-VL's DeepStack maps travel with the main features, so every
    row gets them at its image positions too.
    """
    feats = family_of(backbone.config).encode_images(backbone, mb.pixel_values.to(device),
                                                     mb.image_grid_thw.to(device))
    return feats.select(mb.row_images if row_images is None else row_images)


def shared_prompt_positions(backbone, shared: SharedPrompts, grids: torch.Tensor, device) -> torch.Tensor:
    """[3, groups, W] mrope positions of the shared layout: the prompts' own, then each completion continuing from
    its prompt's last position, exactly as in the completion's own row."""
    longest = max(shared.prompt_lengths)
    prompt_ids = shared.input_ids[:, :longest].to(device)
    lengths = torch.tensor(shared.prompt_lengths, device=device)
    prompt_mask = (torch.arange(longest, device=device)[None] < lengths[:, None]).long()
    types = None if shared.mm_token_type_ids is None else shared.mm_token_type_ids[:, :longest].to(device)
    prompt_pos = family_of(backbone.config).rope_index(backbone, prompt_ids, grids, prompt_mask, types).to(device)
    last = prompt_pos.gather(2, (lengths - 1).view(1, -1, 1).expand(3, -1, 1))  # [3, groups, 1]
    seg = shared.segments.to(device)[None]
    continued = last + shared.completion_offsets.to(device)[None]
    prompt_part = torch.nn.functional.pad(prompt_pos, (0, seg.shape[-1] - longest))
    return torch.where(seg == 0, prompt_part, continued).masked_fill(seg < 0, 0)


def _shared_hidden(backbone, mb: MicroBatch, device) -> torch.Tensor:
    """Hidden states of the shared layout, flattened to [groups * W, H]."""
    shared = mb.shared
    input_ids = shared.input_ids.to(device)
    feats = image_features(backbone, mb, device, row_images=list(range(mb.image_grid_thw.shape[0])))
    positions = shared_prompt_positions(backbone, shared, mb.image_grid_thw.to(device), device)
    if text_attention_of(backbone) == FLEX_ATTENTION:
        mask = shared.block_mask(device)
    else:
        mask = shared.attention_bias(backbone.get_input_embeddings().weight.dtype, device)
    out = family_of(backbone.config).language_forward(backbone, input_ids, feats, position_ids=positions,
                                                      attention_mask=mask)
    return out.last_hidden_state.reshape(-1, out.last_hidden_state.shape[-1])


def completion_logps(model, mb: MicroBatch, temperature: float, device) -> torch.Tensor:
    """Per-position log-probs [B, T-1] of the next token under softmax(logits / T), non-zero only on completion
    tokens."""
    backbone, head = split_backbone(model)
    if mb.shared is not None:
        hidden = _shared_hidden(backbone, mb, device)
        flat_dest = mb.shared.dest.to(device)
        rows = hidden[mb.shared.source.to(device)]
        targets = mb.targets.to(device).reshape(-1)[flat_dest]
    else:
        hidden = _unshared_hidden(backbone, mb, device)
        mask = mb.completion_mask.to(device) > 0
        flat_dest = mask.reshape(-1).nonzero().squeeze(1)
        rows = hidden[mask]
        targets = mb.targets.to(device)[mask]
    result = torch.zeros(mb.completion_mask.numel(), dtype=torch.float32, device=device)
    if rows.shape[0] == 0:  # keeps the graph connected so DDP's all-reduce still runs
        return (result + hidden.sum() * 0.0).view(mb.completion_mask.shape)
    if isinstance(head, torch.nn.Linear):
        # The head runs on completion positions only, chunked, and is recomputed in backward:
        # [tokens, vocab] logits never exist for the whole batch, not even saved for autograd.
        logps = grpo_loss.per_token_logps_from_hidden(rows, head.weight, targets, temperature, chunk=LOGP_CHUNK,
                                                      bias=head.bias)
    else:  # a LoRA-wrapped head: plain chunked path
        logps = torch.cat([grpo_loss.selective_log_softmax(head(rows[s:s + LOGP_CHUNK]), targets[s:s + LOGP_CHUNK],
                                                           temperature) for s in range(0, rows.shape[0], LOGP_CHUNK)])
    return result.index_copy(0, flat_dest, logps.float()).view(mb.completion_mask.shape)


def _unshared_hidden(backbone, mb: MicroBatch, device) -> torch.Tensor:
    """Hidden states [B, T-1, H] of the rows as they are (one row per rollout)."""
    extra = {} if mb.mm_token_type_ids is None else {"mm_token_type_ids": mb.mm_token_type_ids.to(device)}
    input_ids = mb.input_ids.to(device)
    if not mb.row_images:
        out = backbone(input_ids=input_ids, attention_mask=mb.attention_mask.to(device),
                       pixel_values=mb.pixel_values.to(device), image_grid_thw=mb.image_grid_thw.to(device), **extra)
    else:
        # Images shared between rows: each encoded once, indexed per row; positions as the model builds them.
        family, mask = family_of(backbone.config), mb.attention_mask.to(device)
        positions = family.rope_index(backbone, input_ids, mb.row_grid_thw.to(device), mask,
                                      extra.get("mm_token_type_ids"))
        out = family.language_forward(backbone, input_ids, image_features(backbone, mb, device), attention_mask=mask,
                                      position_ids=positions)
    return out.last_hidden_state[:, :-1]


class PolicyLogps(torch.nn.Module):
    """The policy as one module whose forward returns completion log-probs.

    accelerate wraps *this* module (DDP / DeepSpeed / FSDP), so the forward goes through the wrapper and gradient
    synchronisation happens, while the log-probs still skip full-vocabulary logits.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, mb: MicroBatch, temperature: float) -> torch.Tensor:
        return completion_logps(self.model, mb, temperature, next(self.model.parameters()).device)

"""GRPO math for suzak's learner: group advantages, chunked per-token log-probs and the policy loss.

Pure torch with no model or trainer state, so the learner can call it on any micro-batch and the tests can
compare it number-for-number with TRL 1.16's GRPOTrainer (tests/unit/test_trl_parity.py).

Run its tests:
    .venv/bin/python -m pytest tests/unit/test_loss.py tests/unit/test_trl_parity.py -q

Loss types (grpo.loss_type):
    r1v      R1-V (TRL 0.14): exp(logp - logp.detach()) * A, no clipping, sequence mean then batch mean.
    clip     PPO-style clipped ratio, aggregated like TRL 1.16 loss_type="grpo" (sequence mean, batch mean).
    dapo     clipped ratio, token mean over every token of the (accumulated) batch, like TRL 1.16 "dapo".
    dr_grpo  clipped ratio, token sum / (sequences * max_completion_length), like TRL 1.16 "dr_grpo".
    bnpo     clipped ratio, token mean over the local batch, like TRL 1.16 "bnpo" (not exposed in config).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from suzak.errors import SuzakError

LOSS_TYPES = ("r1v", "clip", "dapo", "dr_grpo", "bnpo")
SCALE_MODES = ("group", "batch", "none")
TIS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
DEFAULT_LOGP_CHUNK = 512

# A group whose reward std is at most this counts as all-equal (TRL: torch.isclose(std, 0), atol 1e-8).
_ZERO_STD_ATOL = 1e-8


def _check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SuzakError(f"{field}={value!r} is not supported; use one of {', '.join(choices)}")


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Unbiased (Bessel-corrected) std ignoring NaNs; NaN where fewer than two values count (as TRL's nanstd)."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    correction = torch.where(count > 1, count / (count - 1), torch.full_like(var, float("nan")))
    std = torch.sqrt(var * correction)
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def group_advantages(
    rewards: Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> tuple[Tensor, dict[str, float]]:
    """GRPO advantages for rewards laid out as consecutive groups of `group_size` completions of one prompt.

    adv = (r - group mean) / (std + eps), std being the group std ("group"), the batch std ("batch"),
    or no division at all ("none", Dr.GRPO). Std is unbiased, as torch.std / TRL / R1-V.
    NaN rewards (unscorable completions) are left out of the means and stds and get advantage 0, as in TRL 1.16.

    stats: zero_std_groups (groups whose scorable rewards are all equal, so they carry no signal),
    frac_zero_std, num_groups, reward_mean, reward_std.
    """
    _check_choice("grpo.scale_rewards", scale, SCALE_MODES)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    rewards = rewards if rewards.is_floating_point() else rewards.float()
    grouped = rewards.view(-1, group_size)
    centred = grouped - torch.nanmean(grouped, dim=1, keepdim=True)
    # A group of one has no spread; TRL uses 0 there rather than the NaN of an unbiased std.
    group_std = nanstd(grouped, dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(grouped[:, :1])
    if scale == "group":
        centred = centred / (group_std + eps)
    elif scale == "batch":
        batch_std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
        centred = centred / (batch_std + eps)
    adv = torch.nan_to_num(centred.reshape(-1), nan=0.0)

    # NaN std (fewer than two scorable rewards) also means "no signal", so it counts as zero-std here.
    zero_std = ~(group_std.squeeze(1) > _ZERO_STD_ATOL)
    num_groups = grouped.shape[0]
    stats = {
        "zero_std_groups": int(zero_std.sum().item()),
        "frac_zero_std": float(zero_std.float().mean().item()) if num_groups else 0.0,
        "num_groups": num_groups,
        "reward_mean": float(torch.nanmean(rewards).item()) if rewards.numel() else float("nan"),
        "reward_std": float(nanstd(rewards).item()) if rewards.numel() > 1 else 0.0,
    }
    return adv, stats


# ----------------------------------------------------------------------------------------------------------------
# Per-token log-probs
# ----------------------------------------------------------------------------------------------------------------


class _ChunkedSelectedLogProbs(torch.autograd.Function):
    """log_softmax(logits / T).gather(index) a chunk of tokens at a time, forward and backward.

    Only one chunk of [tokens, vocab] float32 exists at any moment; backward keeps just the logits (held by the
    graph anyway) and the per-token logsumexp, recomputing the softmax chunk by chunk. A plain autograd version
    would save every float32 chunk for backward, i.e. the whole batch's full-vocab tensor.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, index: Tensor, row_mask: Tensor, temperature: float, chunk: int) -> Tensor:
        batch, length, _ = logits.shape
        work = _work_dtype(logits)
        out = torch.zeros(index.shape, dtype=work, device=logits.device)
        lse = torch.zeros((batch, length), dtype=work, device=logits.device)
        with torch.no_grad():
            for b, start, end in _chunks(batch, length, chunk):
                part = logits[b, start:end].to(work) / temperature
                lse[b, start:end] = torch.logsumexp(part, dim=-1)
                out[b, start:end] = part.gather(-1, index[b, start:end]) - lse[b, start:end, None]
            out.masked_fill_(~row_mask[..., None], 0.0)
        ctx.save_for_backward(logits, index, row_mask, lse)
        ctx.temperature = temperature
        ctx.chunk = chunk
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        logits, index, row_mask, lse = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        temperature = ctx.temperature
        grad_logits = torch.empty_like(logits)
        grad = grad_out.to(lse.dtype) * row_mask[..., None]
        batch, length, _ = logits.shape
        for b, start, end in _chunks(batch, length, ctx.chunk):
            g = grad[b, start:end]
            probs = torch.exp(logits[b, start:end].to(lse.dtype) / temperature - lse[b, start:end, None])
            # d logp_k / d z_j = (1[j = index_k] - p_j) / T, summed over the K gathered entries.
            part = probs * -g.sum(-1, keepdim=True)
            part.scatter_add_(-1, index[b, start:end], g)
            grad_logits[b, start:end] = (part / temperature).to(logits.dtype)
        return grad_logits, None, None, None, None


def _work_dtype(logits: Tensor) -> torch.dtype:
    # float32 at least: bf16 logsumexp is unstable (TRL avoids it too); float64 input stays float64.
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _chunks(batch: int, length: int, chunk: int):
    # Chunk along the sequence of each row: logits[:, :-1] slices stay views, no full-batch copy is made.
    for b in range(batch):
        for start in range(0, length, chunk):
            yield b, start, min(start + chunk, length)


def selective_log_softmax(
    logits: Tensor,
    index: Tensor,
    temperature: float = 1.0,
    row_mask: Tensor | None = None,
    chunk: int = DEFAULT_LOGP_CHUNK,
) -> Tensor:
    """TRL's selective_log_softmax semantics: log_softmax(logits / T, -1) gathered at `index`, chunked.

    logits [..., V]; index [...] (one log-prob per position) or [..., K] (K per position); row_mask [...] zeros
    give log-prob 0 and no gradient. Returns float32 for bf16/fp16/fp32 logits (float64 for float64): log-prob
    ratios in bf16 would be too coarse for the importance weights (TRL returns the logits dtype off Triton).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    squeeze = index.dim() == logits.dim() - 1
    if squeeze:
        index = index.unsqueeze(-1)
    if index.shape[:-1] != logits.shape[:-1]:
        raise ValueError(f"index shape {tuple(index.shape)} does not match logits shape {tuple(logits.shape)}")
    lead = logits.shape[:-1]
    mask = torch.ones(lead, dtype=torch.bool, device=logits.device) if row_mask is None else row_mask.bool()
    logits3, index3, mask2 = _as_rows(logits, index, mask)
    out = _ChunkedSelectedLogProbs.apply(logits3, index3.long(), mask2, float(temperature), int(chunk))
    out = out.reshape(*lead, index.shape[-1])
    return out.squeeze(-1) if squeeze else out


def _as_rows(logits: Tensor, index: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Bring leading dims to exactly [B, T] (views where possible) for the chunked kernel."""
    if logits.dim() == 2:
        return logits.unsqueeze(0), index.unsqueeze(0), mask.unsqueeze(0)
    if logits.dim() == 3:
        return logits, index, mask
    return (
        logits.reshape(-1, *logits.shape[-2:]),
        index.reshape(-1, *index.shape[-2:]),
        mask.reshape(-1, mask.shape[-1]),
    )


def per_token_logps_from_logits(
    logits: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    chunk: int = DEFAULT_LOGP_CHUNK,
    ignore_index: int = -100,
) -> Tensor:
    """Log-prob of each label under softmax(logits / temperature), float32 (float64 for float64 logits), [B, T].

    logits [B, T, V] must already be aligned with labels [B, T] (logits[:, t] predicts labels[:, t]; the caller
    drops the last position and the prompt). Labels equal to `ignore_index` get log-prob 0 and no gradient.
    Full-vocab log-probs are only ever built for `chunk` tokens at a time (logsumexp per chunk).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits shape {tuple(logits.shape)}")
    valid = labels != ignore_index
    return selective_log_softmax(logits, labels.masked_fill(~valid, 0), temperature, valid, chunk)


class _ChunkedHeadLogProbs(torch.autograd.Function):
    """log_softmax((hidden @ W.T + b) / T).gather(labels), projecting `chunk` tokens at a time.

    Unlike head(...) followed by selective_log_softmax, nothing of size [tokens, vocab] is kept for backward: the
    backward re-projects each chunk (the same recompute TRL 1.16's fused LM head does): one more head matmul for
    no logits held between forward and backward (bench/RESULTS.md, learner memory).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, temperature, chunk):
        device_type = hidden.device.type
        # Run the head in the autocast dtype if autocast is on, then stay out of autocast so that the backward's
        # recomputed logits are bit-identical to the forward's.
        compute = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight.dtype
        work = torch.float64 if compute == torch.float64 else torch.float32
        out = torch.zeros(labels.shape, dtype=work, device=hidden.device)
        lse = torch.zeros(labels.shape, dtype=work, device=hidden.device)
        with torch.no_grad(), torch.autocast(device_type, enabled=False):
            head_weight, head_bias = _cast_head(weight, bias, compute)  # once, not per chunk: V x H is large
            for start in range(0, labels.shape[0], chunk):
                end = min(start + chunk, labels.shape[0])
                logits = _project(hidden[start:end], head_weight, head_bias, compute).to(work) / temperature
                lse[start:end] = torch.logsumexp(logits, dim=-1)
                out[start:end] = logits.gather(-1, labels[start:end, None]).squeeze(-1) - lse[start:end]
            out.masked_fill_(~valid, 0.0)
        ctx.save_for_backward(hidden, weight, bias, labels, valid, lse)
        ctx.temperature, ctx.chunk, ctx.compute = temperature, chunk, compute
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        hidden, weight, bias, labels, valid, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        temperature, compute = ctx.temperature, ctx.compute
        grad = grad_out.to(lse.dtype) * valid
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        # Weight/bias gradients sum over chunks: accumulate in float32 at least, as TRL's kernel does.
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=acc, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            head_weight, head_bias = _cast_head(weight, bias, compute)
            for start in range(0, labels.shape[0], ctx.chunk):
                end = min(start + ctx.chunk, labels.shape[0])
                g = grad[start:end]
                logits = _project(hidden[start:end], head_weight, head_bias, compute).to(lse.dtype) / temperature
                dlogits = torch.exp(logits - lse[start:end, None]) * -g[:, None]
                dlogits.scatter_add_(-1, labels[start:end, None], g[:, None])
                dlogits = dlogits / temperature
                if need_hidden:
                    grad_hidden[start:end] = (dlogits.to(compute) @ head_weight).to(hidden.dtype)
                if need_weight:
                    grad_weight += (dlogits.to(compute).t() @ hidden[start:end].to(compute)).to(acc)
                if need_bias:
                    grad_bias += dlogits.sum(0).to(acc)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def _cast_head(weight: Tensor, bias: Tensor | None, compute: torch.dtype) -> tuple[Tensor, Tensor | None]:
    return weight.to(compute), None if bias is None else bias.to(compute)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, compute: torch.dtype) -> Tensor:
    return torch.nn.functional.linear(hidden.to(compute), weight, bias)


def per_token_logps_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    temperature: float = 1.0,
    chunk: int = DEFAULT_LOGP_CHUNK,
    bias: Tensor | None = None,
    ignore_index: int = -100,
) -> Tensor:
    """Log-prob of each label under softmax((hidden @ weight.T + bias) / temperature) without keeping logits.

    hidden [..., H] (last hidden states aligned with labels [...]), weight [V, H] (lm_head.weight, frozen or
    trainable; a LoRA-wrapped lm_head is not supported). Same values as per_token_logps_from_logits on the
    projected logits, float32 (float64 for float64 inputs); `ignore_index` labels give 0 and no gradient.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    if hidden.shape[:-1] != labels.shape or hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)} and labels {tuple(labels.shape)} "
            "must be [..., H], [V, H] and [...]"
        )
    valid = labels != ignore_index
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.masked_fill(~valid, 0).reshape(-1).long()
    out = _ChunkedHeadLogProbs.apply(
        flat_hidden, weight, bias, flat_labels, valid.reshape(-1), float(temperature), int(chunk)
    )
    return out.reshape(labels.shape)


# ----------------------------------------------------------------------------------------------------------------
# Policy loss
# ----------------------------------------------------------------------------------------------------------------


def rollout_importance_weights(
    old_logps: Tensor,
    rollout_logps: Tensor,
    mask: Tensor,
    mode: str = "token_truncate",
    cap: float | None = 2.0,
    floor: float | None = None,
) -> Tensor:
    """Importance weights pi_learner(old) / pi_server for the learner/vLLM log-prob mismatch, no gradient.

    Mirrors TRL 1.16's vllm_importance_sampling_correction: log-ratio zeroed on padding and where the server gave
    NaN, token modes give [B, T] weights, sequence modes one weight per sequence [B, 1] from the summed log-ratio;
    *_truncate clamps to [floor, cap], *_mask zeroes weights outside [floor, cap].
    """
    _check_choice("tis mode", mode, TIS_MODES)
    with torch.no_grad():
        diff = torch.nan_to_num((old_logps - rollout_logps) * mask, nan=0.0)
        if mode.startswith("sequence"):
            diff = diff.sum(-1, keepdim=True)
        weights = torch.exp(diff)
        if mode.endswith("truncate"):
            if cap is not None or floor is not None:
                weights = torch.clamp(weights, min=floor, max=cap)
        else:
            low = -math.inf if floor is None else floor
            high = math.inf if cap is None else cap
            weights = weights.masked_fill((weights < low) | (weights > high), 0.0)
    return weights


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def policy_loss(
    logps: Tensor,
    old_logps: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "clip",
    beta: float = 0.0,
    ref_logps: Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    rollout_logps: Tensor | None = None,
    tis_cap: float | None = 2.0,
    tis_mode: str = "token_truncate",
    tis_floor: float | None = None,
    delta: float | None = None,
    kl_bias_correction: bool = False,
    max_completion_length: int | None = None,
    num_items_in_batch: float | Tensor | None = None,
    num_seqs_in_batch: int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO policy loss over one micro-batch, and detached 0-dim metric tensors.

    logps (with grad), old_logps, ref_logps, rollout_logps, mask: [B, T]; advantages: [B] (or [B, T]).
    old_logps None means "on-policy": logps.detach(), as TRL. rollout_logps are the server's (vLLM) log-probs:
    the per-token loss (not the KL term) is weighted by rollout_importance_weights(tis_mode, tis_cap, tis_floor);
    tis_cap None turns the weighting off (suzak's grpo.tis_cap=null) while still reporting the log-prob gap.
    delta: TRL's two-sided clip (ratio capped at delta). kl_bias_correction: TRL's use_bias_correction_kl
    (KL term times the ratio; TRL 1.16 defaults it to True, suzak to False = plain k3 as R1-V).

    Gradient accumulation: when the learner sums gradients of several micro-batches of one optimizer step, pass
    the step's totals so the sum equals the full-batch loss: num_items_in_batch (active tokens, dapo) and
    num_seqs_in_batch (sequences; r1v, clip, dr_grpo). Both default to this micro-batch's own counts.
    """
    _check_choice("grpo.loss_type", loss_type, LOSS_TYPES)
    mask = _checked_mask(logps, mask)
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps (log-probs of the frozen reference model)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise SuzakError("loss_type 'dr_grpo' divides by grpo.max_completion_tokens; pass max_completion_length")
    old_logps = logps.detach() if old_logps is None else old_logps
    adv = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages

    ratio_base = logps.detach() if loss_type == "r1v" else old_logps
    ratio = torch.exp(logps - ratio_base)
    per_token_kl = None
    if ref_logps is not None:
        per_token_kl = k3_kl(logps, ref_logps)
        if kl_bias_correction:
            per_token_kl = per_token_kl * ratio

    if loss_type == "r1v":
        per_token_loss = -ratio * adv
    else:
        clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)
        if delta is not None:
            ratio = torch.clamp(ratio, max=delta)
        per_token_loss = -torch.min(ratio * adv, clipped * adv)

    is_weights = None
    if rollout_logps is not None and tis_cap is not None:
        is_weights = rollout_importance_weights(old_logps, rollout_logps, mask, tis_mode, tis_cap, tis_floor)
        per_token_loss = per_token_loss * is_weights
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl

    loss = _aggregate(per_token_loss, mask, loss_type, max_completion_length, num_items_in_batch, num_seqs_in_batch)
    metrics = _metrics(loss, ratio, adv, mask, eps_low, eps_high, per_token_kl, is_weights, old_logps, rollout_logps)
    return loss, metrics


def _checked_mask(logps: Tensor, mask: Tensor) -> Tensor:
    if logps.dim() != 2 or mask.shape != logps.shape:
        raise ValueError(f"logps {tuple(logps.shape)} and mask {tuple(mask.shape)} must both be [B, T]")
    return mask.to(logps.dtype)


def _aggregate(
    per_token_loss: Tensor,
    mask: Tensor,
    loss_type: str,
    max_completion_length: int | None,
    num_items_in_batch: float | Tensor | None,
    num_seqs_in_batch: int | None,
) -> Tensor:
    """Reduce [B, T] (or [B, 1] broadcast) per-token losses to a scalar exactly as TRL 1.16 does per loss type."""
    masked = per_token_loss * mask
    num_seqs = mask.shape[0] if num_seqs_in_batch is None else num_seqs_in_batch
    if loss_type in ("r1v", "clip"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / num_seqs
    if loss_type == "dr_grpo":
        return masked.sum() / (num_seqs * max_completion_length)
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    tokens = mask.sum() if num_items_in_batch is None else torch.as_tensor(num_items_in_batch, dtype=mask.dtype)
    return masked.sum() / tokens.to(mask.device).clamp(min=1.0)


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    if x.shape[-1] == 1 and mask.shape[-1] != 1:  # one value per sequence: each sequence counts once
        return x.mean()
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


@torch.no_grad()
def _metrics(
    loss: Tensor,
    ratio: Tensor,
    adv: Tensor,
    mask: Tensor,
    eps_low: float,
    eps_high: float,
    per_token_kl: Tensor | None,
    is_weights: Tensor | None,
    old_logps: Tensor,
    rollout_logps: Tensor | None,
) -> dict[str, Tensor]:
    """Detached 0-dim tensors (no host sync here); names follow TRL's logged keys where TRL has one."""
    low = ((ratio < 1 - eps_low) & (adv < 0)).to(mask.dtype)
    high = ((ratio > 1 + eps_high) & (adv > 0)).to(mask.dtype)
    metrics = {
        "loss": loss.detach(),
        "clip_ratio/low_mean": _masked_mean(low, mask),
        "clip_ratio/high_mean": _masked_mean(high, mask),
        "clip_ratio/region_mean": _masked_mean(torch.maximum(low, high), mask),
        "ratio/mean": _masked_mean(ratio.detach(), mask),
    }
    if per_token_kl is not None:
        metrics["kl"] = _masked_mean(per_token_kl.detach(), mask)
    if is_weights is not None:
        flat = is_weights.flatten() if is_weights.shape[-1] == 1 else is_weights[mask.bool()]
        metrics["tis_weight/mean"] = _reduce_or_zero(flat, torch.mean)
        metrics["tis_weight/min"] = _reduce_or_zero(flat, torch.min)
        metrics["tis_weight/max"] = _reduce_or_zero(flat, torch.max)
    if rollout_logps is not None:
        gap = (old_logps - rollout_logps).abs()
        # Tokens the server could not score carry NaN: leave them out rather than report NaN or understate as 0.
        gap = gap[mask.bool() & ~torch.isnan(gap)]
        metrics["logprob_gap/mean"] = _reduce_or_zero(gap, torch.mean)
        metrics["logprob_gap/max"] = _reduce_or_zero(gap, torch.max)
    return metrics


def _reduce_or_zero(x: Tensor, reduce) -> Tensor:
    return reduce(x) if x.numel() else torch.zeros((), dtype=x.dtype, device=x.device)

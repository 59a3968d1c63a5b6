"""Faster kernels suzak plugs into transformers' Qwen-VL models: the vision tower's packed windows in a few
batched SDPA calls instead of one call per window, FlexAttention for the language model's shared-prompt rows, and
Liger's fused Triton kernels (RMSNorm, SwiGLU) on a GPU.

    from suzak.kernels import pack_vision_attention, use_flex_for_text, use_liger_kernels
    pack_vision_attention(model)      # after loading, when the vision tower would run sdpa
    use_flex_for_text(model)          # grpo.shared_prompt_attention=flex: the learner then passes a BlockMask
    use_liger_kernels(model)          # model.liger_kernels=true (needs liger-kernel and a CUDA GPU)

Run its tests:  .venv/bin/python -m pytest tests/unit/test_kernels.py -q

Why: without flash-attn, transformers' Qwen2.5-VL / Qwen3-VL vision attention splits the packed patches at every
window (or image) boundary and calls SDPA once per piece. A 7B reference step's 64 images are 2,048 windows in each
of 28 windowed blocks: about 57,000 tiny attention calls per forward, each too small to fill the card, and the
update runs the tower four times (reference, forward, recompute, backward). Windows of one image size mostly share
one length, so gathering the pieces of each length into one batch gives the same per-window attention, exactly,
in a handful of calls. transformers routes the packed (cu_seqlens) inputs only to implementations whose name
contains "flash", hence the name this one is registered under; it needs no flash-attn.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch

PACKED_VISION_ATTENTION = "suzak_flash_free_packed_sdpa"
FLEX_ATTENTION = "flex_attention"  # transformers' own FlexAttention integration
VISION_ATTENTIONS = ("packed", "per_window")


def packed_sdpa_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                          cu_seq_lens_q=None, cu_seq_lens_k=None, is_causal=False, **_):
    """transformers' flash-attention interface over SDPA: query/key/value [1, heads, tokens, head_dim] packed by
    cu_seq_lens; returns ([1, tokens, heads, head_dim], None), each piece attending only within itself."""
    if attention_mask is not None:
        raise ValueError("packed SDPA attention takes cu_seq_lens, not an attention mask")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_q,
                                                                                              cu_seq_lens_k):
        raise ValueError("packed SDPA attention needs the same pieces for queries and keys")
    q, k, v = query[0], key[0], value[0]  # [heads, tokens, head_dim]
    tokens = q.shape[1]
    plan = _plan(cu_seq_lens_q, tokens, q.device)
    dropout = dropout if module.training else 0.0
    if plan.inverse is None:  # one length that tiles the whole sequence: a reshape, no gather
        (length, n, _), = plan.buckets
        out = _batched(q, k, v, n, length, scaling, dropout, is_causal)
        return out.unsqueeze(0), None
    outputs = [_batched(q[:, index], k[:, index], v[:, index], n, length, scaling, dropout, is_causal)
               for length, n, index in plan.buckets]
    return torch.cat(outputs)[plan.inverse].unsqueeze(0), None


class _Plan(NamedTuple):
    buckets: list  # (length, pieces, token index or None)
    inverse: torch.Tensor | None  # bucket order -> token order


_PLANS: dict[int, tuple[torch.Tensor, _Plan]] = {}
"""Recent plans by the id of their cu_seqlens tensor (held, so the id stays its own): the vision tower hands every
windowed block the same tensor, so the lengths come to the host once per forward, not once per block."""
_PLANS_LOCK = threading.Lock()  # a CPU learner runs the reference's forward on a second thread


def _plan(cu_seqlens: torch.Tensor, tokens: int, device) -> _Plan:
    with _PLANS_LOCK:
        cached = _PLANS.get(id(cu_seqlens))
    if cached is not None and cached[0] is cu_seqlens:
        return cached[1]
    bounds = cu_seqlens.tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    if len(by_length) == 1 and len(next(iter(by_length.values()))) * next(iter(by_length)) == tokens:
        length = next(iter(by_length))
        plan = _Plan([(length, tokens // length, None)], None)
    else:
        buckets, order = [], []
        for length, starts in by_length.items():
            index = (torch.tensor(starts)[:, None] + torch.arange(length)[None]).reshape(-1)
            buckets.append((length, len(starts), index.to(device, non_blocking=True)))
            order.append(index)
        inverse = torch.empty(tokens, dtype=torch.long)
        inverse[torch.cat(order)] = torch.arange(tokens)
        plan = _Plan(buckets, inverse.to(device, non_blocking=True))
    with _PLANS_LOCK:
        if len(_PLANS) >= 4:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[id(cu_seqlens)] = (cu_seqlens, plan)
    return plan


def _batched(q, k, v, n: int, length: int, scaling, dropout: float, is_causal: bool) -> torch.Tensor:
    """SDPA over n pieces of `length` tokens laid end to end in [heads, n * length, head_dim] tensors; returns
    [n * length, heads, head_dim]."""
    heads, _, head_dim = q.shape

    def pieces(x):
        return x.reshape(heads, n, length, head_dim).transpose(0, 1)  # [n, heads, length, head_dim]

    out = torch.nn.functional.scaled_dot_product_attention(pieces(q), pieces(k), pieces(v), dropout_p=dropout,
                                                           is_causal=is_causal, scale=scaling)
    return out.permute(0, 2, 1, 3).reshape(n * length, heads, head_dim)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_VISION_ATTENTION, packed_sdpa_attention)


def _vision_config(model):
    return getattr(getattr(model, "config", None), "vision_config", None)


def set_vision_attention(vision_config, mode: str) -> None:
    """Put an sdpa vision tower's config on packed windows ("packed") or transformers' own loop ("per_window")."""
    if mode == "packed":
        _register()
    vision_config._attn_implementation = PACKED_VISION_ATTENTION if mode == "packed" else "sdpa"


def pack_vision_attention(model) -> bool:
    """Switch the model's vision tower from per-window SDPA to packed_sdpa_attention; True when switched.

    Only an sdpa vision tower changes: flash_attention_2 already takes the packed windows in one call, and eager
    stays the plain reference. The language model keeps its own implementation.
    """
    vision = _vision_config(model)
    if vision is None or vision._attn_implementation != "sdpa":
        return False
    set_vision_attention(vision, "packed")
    return True


def vision_attention_of(model) -> str | None:
    """The vision tower's attention implementation (None for a model without one)."""
    vision = _vision_config(model)
    return None if vision is None else vision._attn_implementation


def apply_model_kernels(model, *, vision_attention: str = "packed", liger_kernels: bool = False) -> None:
    """What suzak.models.load_model does to a loaded model (and bench/make_arch to a random one): the packed
    vision windows (vision_attention "packed"; "per_window" keeps transformers' loop) and Liger's kernels."""
    from suzak.errors import SuzakError

    if vision_attention not in VISION_ATTENTIONS:
        raise SuzakError(f"vision_attention {vision_attention!r} is not one of {', '.join(VISION_ATTENTIONS)}")
    if vision_attention == "packed":
        pack_vision_attention(model)
    if liger_kernels:
        use_liger_kernels(model)


def use_flex_for_text(model) -> None:
    """Run the language model's attention through transformers' FlexAttention (compiled on first use); its callers
    pass a BlockMask (trainer/rollouts.SharedPrompts.block_mask). The vision tower keeps its own implementation."""
    import torch.nn.attention.flex_attention  # noqa: F401  (fails early on a torch without it)

    text_config(model)._attn_implementation = FLEX_ATTENTION


def text_config(model):
    """The language model's config of a Qwen-VL (its text_config), or the model's own for a text-only one."""
    config = model.config
    return getattr(config, "text_config", None) or config


def text_attention_of(model) -> str:
    """The language model's attention implementation."""
    return text_config(model)._attn_implementation


def use_liger_kernels(model) -> None:
    """Liger's fused RMSNorm and SwiGLU (Qwen2.5-VL) or RMSNorm (Qwen3-VL, as Liger patches it) on this model's
    modules. Its fused linear cross-entropy stays off: suzak never asks the model for a loss (trainer/forward.py
    computes the log-probs from the hidden states itself)."""
    from suzak.errors import SuzakError

    try:
        from liger_kernel.transformers import monkey_patch
    except ImportError as err:
        raise SuzakError(f"model.liger_kernels needs the liger-kernel package ({err}): pip install liger-kernel, or "
                         "set model.liger_kernels=false") from None
    if not next(model.parameters()).is_cuda:
        raise SuzakError("model.liger_kernels needs the model on a CUDA GPU (Liger's kernels are Triton's): set "
                         "model.liger_kernels=false on this machine")
    patch = {"qwen2_5_vl": monkey_patch.apply_liger_kernel_to_qwen2_5_vl,
             "qwen2_vl": monkey_patch.apply_liger_kernel_to_qwen2_vl,
             "qwen3_vl": monkey_patch.apply_liger_kernel_to_qwen3_vl}[model.config.model_type]
    patch(fused_linear_cross_entropy=False, model=model)

"""The optimizer and its schedule: AdamW (host-offloaded, bitsandbytes 8-bit, or DeepSpeed's CPU Adam) over the
trainable parameters, with transformers-style warm-up and decay.

    from trainer.optim import build_optimizer
    optimizer, scheduler = build_optimizer(policy.model, cfg.grpo.optim, total_steps, offload=policy.offload)
"""

from __future__ import annotations

import math

import torch

from suzak.errors import SuzakError
from trainer.distributed import strategy
from trainer.offload import HostAdamW


class LRSchedule:
    """LR multiplier of step k as transformers' schedulers compute it: linear warm-up from 0, then constant,
    cosine to 0, or linear to 0 (R1-V used transformers' cosine with warm-up 0.1 for SFT, constant for GRPO)."""

    def __init__(self, warmup_steps: int, total_steps: int, kind: str):
        self.warmup, self.total, self.kind = warmup_steps, max(total_steps, 1), kind

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def _param_groups(model, weight_decay: float) -> list[dict]:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not params:
        raise SuzakError("the model has no trainable parameters (check the freeze_* flags)")
    if weight_decay == 0:
        return [{"params": [p for _, p in params], "weight_decay": 0.0}]
    # No decay on biases and norm scales (1-D), as transformers' Trainer does.
    decay = [p for _, p in params if p.ndim >= 2]
    rest = [p for _, p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def build_optimizer(model, optim_cfg, total_steps: int, *, offload: bool = False,
                    momentum_dtype: torch.dtype = torch.float32):
    """AdamW (host-offloaded, or bitsandbytes' 8-bit) over the trainable parameters, and its warm-up + decay
    scheduler. offload: Policy.offload (the fp32 masters and moments live in host RAM, trainer/offload.py)."""
    groups = _param_groups(model, optim_cfg.weight_decay)
    kwargs = dict(lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), eps=1e-8)
    if offload:
        if optim_cfg.optimizer != "adamw":
            raise SuzakError(f"optim.offload=cpu runs AdamW with fp32 states on the host; optim.optimizer="
                             f"{optim_cfg.optimizer} would quantise them: set optim.optimizer=adamw (or offload=gpu)")
        optimizer = HostAdamW(groups, momentum_dtype=momentum_dtype, **kwargs)
    elif optim_cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SuzakError("optim.optimizer=adamw_8bit needs bitsandbytes (`pip install bitsandbytes`, CUDA only); "
                             "or set optimizer: adamw") from None
        optimizer = bnb.optim.AdamW8bit(groups, **kwargs)
    elif strategy().endswith("_offload") and strategy().startswith("zero") and _deepspeed_cpu_adam() is not None:
        optimizer = _deepspeed_cpu_adam()(groups, adamw_mode=True, **kwargs)
    else:
        on_cuda = all(p.is_cuda for g in groups for p in g["params"])
        # fused is the fastest CUDA kernel; CPU keeps the default (foreach) path, which is deterministic.
        optimizer = torch.optim.AdamW(groups, fused=True if on_cuda else None, **kwargs)
    warmup = math.ceil(optim_cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, LRSchedule(warmup, total_steps, optim_cfg.scheduler))
    return optimizer, scheduler


def _deepspeed_cpu_adam():
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
    except Exception:  # noqa: BLE001 - missing or unbuildable op: fall back to torch AdamW
        return None
    return DeepSpeedCPUAdam



"""The learner's policy: loading (after the memory check), freezing, LoRA, gradient checkpointing, the reference.

    from trainer.policy import load_policy
    policy = load_policy(cfg, accelerator.device, stage="grpo")   # Policy(model, processor, reference, ...)

Parameters stay fp32 when optim.master_weights_fp32 (bf16 autocast runs the forward on CUDA, see
trainer/distributed.py), or bf16 with the fp32 masters in host RAM when optim.offload is cpu (trainer/offload.py);
LoRA keeps the frozen base in the compute dtype and only the adapters in fp32.
Module names follow transformers 5.x Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration:
model.visual.{patch_embed,blocks} (vision tower; Qwen3-VL also pos_embed), model.visual.merger (Qwen3-VL also the
DeepStack mergers), model.language_model + lm_head (language model); suzak/families.py names them per family.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from suzak.errors import SuzakError
from suzak.log import get_logger
from trainer.distributed import Precision, resolve_precision, strategy
from trainer.memory import (_DTYPE_NAMES, SKIP_CHECK_ENV, _device_total, _stage_optim, check_fits, momentum_dtype,
                            resolve_offload)
from trainer.offload import HostAdamW, HostReference


@dataclass
class Policy:
    """The trainable policy, its processor, and the frozen reference (None: none needed, or LoRA with adapters off)."""

    model: torch.nn.Module
    processor: object
    ref_model: torch.nn.Module | None
    is_lora: bool
    precision: Precision = field(default_factory=lambda: Precision(torch.float32, None))
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    host_reference: HostReference | None = None
    """Full-parameter training with the optimizer offloaded: the reference's trainable weights in host RAM."""
    offload: bool = False
    """The optimizer keeps the fp32 masters in host RAM (build_optimizer makes a HostAdamW)."""
    momentum_dtype: torch.dtype = torch.float32
    """With offload: the host optimizer's first-moment dtype (optim.offload_momentum_dtype as resolved here)."""

    @contextmanager
    def reference(self):
        """Yields the module whose outputs are the reference model's: the frozen copy, the policy with the
        reference weights swapped in, or the policy with its adapters off."""
        if self.ref_model is not None:
            yield self.ref_model
        elif self.host_reference is not None:
            with self.host_reference.swapped_in(self.model) as model:
                yield model
        elif self.is_lora:
            with self.model.disable_adapter():
                yield self.model
        else:
            raise SuzakError("no reference model was loaded (grpo.beta is 0); set grpo.beta > 0 to use one")


def model_parts(model) -> dict[str, list[torch.nn.Module]]:
    """{'vision': [patch_embed, blocks, ...], 'merger': [merger, ...], 'lm': [language_model, lm_head]} of a
    Qwen2.5-VL or Qwen3-VL (the family names the vision and merger modules)."""
    from suzak.families import family_of

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)
    core = getattr(inner, "model", None)
    visual = getattr(core, "visual", None) or getattr(inner, "visual", None)
    language = getattr(core, "language_model", None)
    head = getattr(inner, "lm_head", None)
    if visual is None or language is None or head is None:
        raise SuzakError(f"{type(inner).__name__} is not laid out like transformers 5.x Qwen2.5-VL / Qwen3-VL "
                         "(model.visual, model.language_model, lm_head); freezing needs that layout")
    vision, merger = family_of(inner.config).parts(visual)
    return {"vision": vision, "merger": merger, "lm": [language, head]}


def apply_freezing(model, model_cfg) -> None:
    """requires_grad=False on the parts the config freezes (tied lm_head/embeddings freeze together)."""
    parts = model_parts(model)
    for part, frozen in (("vision", model_cfg.freeze_vision), ("merger", model_cfg.freeze_merger),
                         ("lm", model_cfg.freeze_lm)):
        if frozen:
            for module in parts[part]:
                module.requires_grad_(False)


def _lora_target_regex(names: list[str]) -> str:
    # Vision MLPs also have gate/up/down_proj: a full-name regex keeps adapters in the language model only.
    return r".*language_model\..*\.(" + "|".join(map(str, names)) + r")$"


def apply_lora(model, lora_cfg, precision: Precision):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                        target_modules=_lora_target_regex(lora_cfg.target_modules), bias="none")
    try:
        peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    except ValueError as e:
        raise SuzakError(f"model.lora.target_modules={lora_cfg.target_modules} matched no language-model module "
                         f"({e}); use names like q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, "
                         "down_proj") from None
    for p in peft_model.parameters():
        if p.requires_grad:
            p.data = p.data.to(precision.param_dtype if precision.autocast_dtype is None else torch.float32)
    return peft_model


def _check_trainable(model, model_cfg) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        raise SuzakError("every parameter is frozen (model.freeze_vision/freeze_merger/freeze_lm, or freeze_lm with "
                         "LoRA): unfreeze at least one part")


def load_policy(cfg, device, *, stage: str = "grpo") -> Policy:
    """Load the policy (and the reference if needed) for a stage, after checking it fits the card."""
    from suzak.models import check_family, load_config, load_model, load_processor, pick_attn_implementation

    device = torch.device(device)
    cfg = resolve_offload(cfg, stage, device)
    optim = _stage_optim(cfg, stage)
    offload = optim.offload == "cpu"
    m = cfg.model
    check_family(load_config(m.name_or_path), m.family)
    precision = resolve_precision(m, optim, device.type)
    if m.lora.enabled and m.freeze_lm:
        raise SuzakError("model.lora.enabled with model.freeze_lm leaves nothing to train: LoRA adapts the language "
                         "model; drop freeze_lm")
    if stage == "grpo" and cfg.grpo.beta > 0 and not m.lora.enabled and strategy().startswith(("zero3", "fsdp")):
        raise SuzakError(f"grpo.beta > 0 with SUZAK_STRATEGY={strategy()} would need a sharded reference model, which "
                         "suzak does not build: use model.lora.enabled=true (reference = adapters off), "
                         "SUZAK_STRATEGY=zero2, or grpo.beta=0")
    total = _device_total(device)
    if total is not None and os.environ.get(SKIP_CHECK_ENV, "") in ("", "0"):
        check_fits(cfg, total, stage=stage)

    # LoRA: the base never changes, so it needs no fp32 master copy.
    load_dtype = precision.compute_dtype if m.lora.enabled else precision.param_dtype
    requested_attn = m.attn_implementation
    if stage == "grpo" and cfg.grpo.share_prompt and requested_attn == "auto":
        requested_attn = "sdpa"  # shared-prompt rows need an arbitrary attention mask, which flash-attn cannot take
    attn = pick_attn_implementation(requested_attn, dtype=_DTYPE_NAMES[precision.compute_dtype])
    # Sharded strategies place the weights themselves when the model is prepared.
    where = None if strategy().startswith(("zero3", "fsdp")) else str(device)
    model = load_model(m.name_or_path, dtype=_DTYPE_NAMES[load_dtype], attn_implementation=attn, device=where,
                       vision_attention=m.vision_attention, liger_kernels=m.liger_kernels)
    model.config.use_cache = False
    if m.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so frozen embeddings/vision stay frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if m.lora.enabled:
        model.requires_grad_(False)
        model = apply_lora(model, m.lora, precision)
    else:
        apply_freezing(model, m)
    _check_trainable(model, m)
    model.train()

    ref_model, host_reference = None, None
    if stage == "grpo" and cfg.grpo.beta > 0 and not m.lora.enabled and offload:
        host_reference = HostReference(model)
    elif stage == "grpo" and cfg.grpo.beta > 0 and not m.lora.enabled:
        ref_model = load_model(m.name_or_path, dtype=_DTYPE_NAMES[precision.compute_dtype],
                               attn_implementation=attn, device=where, vision_attention=m.vision_attention,
                               liger_kernels=m.liger_kernels)
        ref_model.requires_grad_(False)
        ref_model.eval()
    processor = load_processor(m.name_or_path, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    momentum = torch.float32
    if offload:
        trainable, _ = trainable_parameter_count(model)
        momentum = momentum_dtype(cfg, stage, trainable)
        get_logger(stage).info(f"fp32 master weights and AdamW moments in host RAM ({_DTYPE_NAMES[momentum]} first "
                               f"moment){', reference weights in host RAM' if host_reference is not None else ''}")
    return Policy(model=model, processor=processor, ref_model=ref_model, is_lora=m.lora.enabled,
                  precision=precision, device=device, host_reference=host_reference, offload=offload,
                  momentum_dtype=momentum)


def prepare_for_training(accelerator, module, optimizer):
    """accelerator.prepare the module and the optimizer; a HostAdamW stays outside (accelerate would move its
    host state to the card)."""
    if isinstance(optimizer, HostAdamW):
        return accelerator.prepare(module), optimizer
    return accelerator.prepare(module, optimizer)


def trainable_parameter_count(model) -> tuple[int, int]:
    """(trainable, total) parameters, tied weights counted once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)



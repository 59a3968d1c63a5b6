"""The learner's model: memory check before loading, policy loading (freezing, LoRA, checkpointing), optimizer, export.

    from trainer.model_setup import check_fits, load_policy, build_optimizer, export_hf
    check_fits(cfg, torch.cuda.get_device_properties(0).total_memory)   # SuzakError naming the knobs if too big
    policy = load_policy(cfg, accelerator.device, stage="grpo")
    optimizer, scheduler = build_optimizer(policy.model, cfg.grpo.optim, total_steps)
    export_hf(policy, "runs/x/grpo/final")                              # HF folder for transformers and vLLM

    python -m trainer.model_setup Qwen/Qwen2.5-VL-7B-Instruct 79.6 model.lora.enabled=true   # estimate, GiB card

Parameters stay fp32 when optim.master_weights_fp32 (bf16 autocast runs the forward on CUDA, see
trainer/distributed.py); LoRA keeps the frozen base in the compute dtype and only the adapters in fp32.
Module names follow transformers 5.x Qwen2_5_VLForConditionalGeneration: model.visual.{patch_embed,blocks}
(vision tower), model.visual.merger, model.language_model + lm_head (language model).
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from suzak.errors import SuzakError
from trainer.distributed import Precision, resolve_precision, strategy
from trainer.offload import (DEFAULT_BUCKET_BYTES, RUNTIME_HOST_BYTES, HostAdamW, HostReference, host_bytes_needed,
                             host_memory_available, pick_momentum_dtype)

GiB = 1024**3
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

# Public config.json values (../shared/reference/QWEN25VL-ARCH.md): counted on the meta device, nothing downloaded.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
KNOWN_ARCHS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
        vision=dict(_VISION, out_hidden_size=2048), tie_word_embeddings=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False),
        vision=dict(_VISION, out_hidden_size=3584), tie_word_embeddings=False),
}
KNOWN_ARCHS["Qwen/Qwen2.5-VL-3B"] = KNOWN_ARCHS["Qwen/Qwen2.5-VL-3B-Instruct"]
KNOWN_ARCHS["Qwen/Qwen2.5-VL-7B"] = KNOWN_ARCHS["Qwen/Qwen2.5-VL-7B-Instruct"]

SKIP_CHECK_ENV = "SUZAK_SKIP_MEMORY_CHECK"
# What an asleep (level 2) vLLM server keeps on the card: CUDA context, graph pools, NCCL/compile buffers.
SERVER_ASLEEP_BYTES = 2.0 * GiB
OFFLOAD_STAGING_BYTES = DEFAULT_BUCKET_BYTES  # trainer/offload.py streams the step in buckets of this size


# ============================================================================ parameter counts


@dataclass(frozen=True)
class ParamCounts:
    """Parameters per part of a Qwen2.5-VL (tied embeddings counted once), plus the sizes activations depend on."""

    total: int
    vision: int
    merger: int
    lm: int
    lora: int
    """Adapter parameters that model.lora would add (for the estimate's LoRA case)."""
    hidden: int
    layers: int
    vocab: int
    vision_hidden: int
    vision_depth: int


def _part(name: str) -> str:
    """Which trainable part a parameter name belongs to: vision, merger or lm."""
    name = name.removeprefix("base_model.model.")
    if ".visual.merger." in f".{name}":
        return "merger"
    if ".visual." in f".{name}":
        return "vision"
    return "lm"


def _arch_config(name_or_path: str):
    from transformers import Qwen2_5_VLConfig

    if name_or_path in KNOWN_ARCHS:
        arch = KNOWN_ARCHS[name_or_path]
        return Qwen2_5_VLConfig(text_config=dict(arch["text"]), vision_config=dict(arch["vision"]),
                                tie_word_embeddings=arch["tie_word_embeddings"])
    from suzak.models import load_config

    return load_config(name_or_path)


def count_parameters(name_or_path: str, lora_cfg=None) -> ParamCounts:
    """Parameter counts from the architecture alone: known hub ids, a local config.json, or `tiny` (no weights read)."""
    from transformers import AutoModelForImageTextToText

    config = _arch_config(name_or_path)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    parts = {"vision": 0, "merger": 0, "lm": 0}
    for name, p in model.named_parameters():
        parts[_part(name)] += p.numel()
    lora = 0
    if lora_cfg is not None:
        targets = set(lora_cfg.target_modules)
        for name, module in model.named_modules():
            if _part(name) == "lm" and name.rsplit(".", 1)[-1] in targets and isinstance(module, torch.nn.Linear):
                lora += lora_cfg.r * (module.in_features + module.out_features)
    text, vision = config.text_config, config.vision_config
    return ParamCounts(total=sum(parts.values()), lora=lora, hidden=text.hidden_size, layers=text.num_hidden_layers,
                       vocab=text.vocab_size, vision_hidden=vision.hidden_size, vision_depth=vision.depth, **parts)


# ============================================================================ memory estimate


@dataclass
class MemoryEstimate:
    """Per-GPU bytes of one learner process (and the co-located rollout server's share)."""

    params: int
    trainable: int
    weights: float
    grads: float
    optimizer: float
    autocast_copies: float
    reference: float
    activations: float
    server: float
    overhead: float
    device_total: float | None = None
    notes: list[str] = field(default_factory=list)
    generation: float = 0.0
    """Card bytes while the server generates, when it sleeps during the update (0: counted in the sum)."""
    host: float = 0.0
    """Host RAM of an offloaded optimizer and reference."""

    @property
    def update(self) -> float:
        """Card bytes during the learner's update (the server asleep, or its full share)."""
        return (self.weights + self.grads + self.optimizer + self.autocast_copies + self.reference
                + self.activations + self.server + self.overhead)

    @property
    def total(self) -> float:
        """The peak: the larger of the update and the generation phase."""
        return max(self.update, self.generation)

    @property
    def fits(self) -> bool:
        return self.device_total is None or self.total <= self.device_total

    def summary(self) -> str:
        rows = [("policy weights", self.weights), ("gradients", self.grads), ("optimizer states", self.optimizer),
                ("bf16 weight copies (autocast)", self.autocast_copies), ("reference model", self.reference),
                ("activations (rough)", self.activations), ("rollout server share", self.server),
                ("CUDA context + fragmentation", self.overhead)]
        lines = [f"  {name:<31}{value / GiB:8.1f} GiB" for name, value in rows if value]
        cap = f" of {self.device_total / GiB:.1f} GiB" if self.device_total else ""
        if self.generation:
            lines.append(f"  {'= during the update':<31}{self.update / GiB:8.1f} GiB")
            lines.append(f"  {'while the server generates':<31}{self.generation / GiB:8.1f} GiB")
        lines.append(f"  {'total (peak)':<31}{self.total / GiB:8.1f} GiB{cap}")
        if self.host:
            lines.append(f"  {'host RAM (optimizer, reference)':<31}{self.host / GiB:8.1f} GiB")
        head = f"{self.params / 1e9:.2f}B parameters, {self.trainable / 1e9:.3f}B trainable"
        return "\n".join([head, *lines, *(f"  note: {n}" for n in self.notes)])


def _stage_optim(cfg, stage: str):
    if stage not in ("sft", "grpo"):
        raise ValueError(f"stage must be 'sft' or 'grpo', got {stage!r}")
    return cfg.sft.optim if stage == "sft" else cfg.grpo.optim


def _trainable_count(cfg, counts: ParamCounts) -> int:
    m = cfg.model
    if m.lora.enabled:
        return counts.lora
    return (0 if m.freeze_vision else counts.vision) + (0 if m.freeze_merger else counts.merger) + \
        (0 if m.freeze_lm else counts.lm)


def _micro_batch_shape(cfg, stage: str, counts: ParamCounts) -> tuple[int, float]:
    """(tokens in one learner micro-batch, fraction of them that are visual tokens)."""
    visual = cfg.model.max_pixels // (28 * 28)
    if stage == "grpo":
        text = 120 + cfg.grpo.max_completion_tokens // 2
        tokens = cfg.grpo.micro_batch_tokens
    else:
        text = 300
        tokens = cfg.sft.batch_size * (visual + text)
    return tokens, visual / (visual + text)


# Bytes saved for the backward per token per layer, in units of the hidden size, measured with
# saved_tensors_hooks on Qwen2.5-VL blocks (fp32 weights, bf16 autocast, sdpa; weight copies excluded):
# the language model's SwiGLU layers (intermediate ~5.3h) keep ~74h, a vision block ~53h per patch, and a
# checkpointed layer keeps only its fp32 input (4h).
LM_ACT_FACTOR, VISION_ACT_FACTOR, CKPT_ACT_FACTOR = 74, 53, 4


def _activation_bytes(cfg, stage: str, counts: ParamCounts, trainable: int) -> float:
    """Rough activation memory of one micro-batch; the vision tower sees 4 patches per visual token."""
    if not trainable:
        return 0.0
    tokens, visual_frac = _micro_batch_shape(cfg, stage, counts)
    ckpt = cfg.model.gradient_checkpointing

    def stack(n_tokens: float, hidden: int, depth: int, factor: int) -> float:
        if not ckpt:
            return n_tokens * hidden * factor * depth
        return n_tokens * hidden * (CKPT_ACT_FACTOR * depth + factor)  # plus one layer being recomputed

    act = stack(tokens, counts.hidden, counts.layers, LM_ACT_FACTOR)
    vision_trains = not cfg.model.lora.enabled and not (cfg.model.freeze_vision and cfg.model.freeze_merger)
    if vision_trains:
        act += stack(4 * tokens * visual_frac, counts.vision_hidden, counts.vision_depth, VISION_ACT_FACTOR)
    # Logits: the GRPO loop runs the head in 512-token chunks; SFT keeps the answer span's logits (bf16 + fp32 CE).
    logit_tokens = 512 if stage == "grpo" else cfg.sft.batch_size * 300
    return act + logit_tokens * counts.vocab * 12


def estimate_memory(cfg, num_params: int | ParamCounts | None = None, *, stage: str = "grpo",
                    world_size: int | None = None, strategy_name: str | None = None,
                    device_total_bytes: float | None = None) -> MemoryEstimate:
    """Bytes one GPU needs for this config: weights, grads, optimizer, reference, activations, server share.

    num_params: a ParamCounts, a total (split like Qwen2.5-VL-7B), or None to count from the model's config.
    """
    counts = _counts(cfg, num_params)
    world = world_size if world_size is not None else int(os.environ.get("WORLD_SIZE", "1"))
    name = strategy_name or strategy()
    host_optim = offloads(cfg, stage, "cuda", world, name, device_total_bytes, counts)
    if host_optim:
        cfg = with_offload(cfg, stage, "cpu")
    optim = _stage_optim(cfg, stage)
    precision = resolve_precision(cfg.model, optim, "cuda")
    compute = _BYTES[precision.compute_dtype]
    lora = cfg.model.lora.enabled
    trainable = _trainable_count(cfg, counts)
    notes = []

    deepspeed = name.startswith("zero")
    stage_no = int(name[4]) if deepspeed else (3 if name.startswith("fsdp") else 0)
    offload = name.endswith("_offload")
    if lora:
        # Frozen base in the compute dtype, adapters in fp32 (master) or compute dtype.
        weights = counts.total * compute + trainable * _BYTES[precision.param_dtype]
        grads = trainable * _BYTES[precision.param_dtype]
        state_bytes = 2.0 if optim.optimizer == "adamw_8bit" else 2 * _BYTES[precision.param_dtype]
        optimizer = trainable * state_bytes
        autocast_copies = 0.0
    elif deepspeed:
        # DeepSpeed bf16: 16-bit weights and grads, fp32 master copy + Adam moments inside the optimizer.
        weights = counts.total * compute
        grads = trainable * compute
        master = 4 if precision.autocast_dtype is not None else 0
        optimizer = trainable * (master + (2 if optim.optimizer == "adamw_8bit" else 8))
        autocast_copies = 0.0
    elif host_optim:
        # trainer/offload.py: 16-bit weights and grads on the card, fp32 masters + moments in host RAM.
        weights = counts.total * compute
        grads = trainable * compute
        optimizer = 2 * OFFLOAD_STAGING_BYTES  # the streamed step's pinned buckets in flight on the card side
        autocast_copies = 0.0
        momentum = momentum_dtype(cfg, stage, trainable)
        notes.append(f"fp32 master weights and AdamW moments ({_DTYPE_NAMES[momentum]} first moment) in host RAM: "
                     f"{trainable * (8 + _BYTES[momentum]) / GiB:.0f} GiB (grpo/sft.optim.offload)")
    else:
        pbytes = _BYTES[precision.param_dtype]
        weights = counts.total * pbytes
        grads = trainable * pbytes
        optimizer = trainable * (2.0 if optim.optimizer == "adamw_8bit" else 2 * pbytes)
        # Autocast keeps a 16-bit copy of each weight for the backward; with checkpointing (measured on an H100)
        # or FSDP only the layer being (re)computed holds one.
        autocast_copies = counts.total * compute if precision.autocast_dtype is not None else 0.0
        if name.startswith("fsdp") or cfg.model.gradient_checkpointing:
            autocast_copies = autocast_copies / max(counts.layers, 1) * 2
    if world > 1 and stage_no >= 1:
        optimizer /= world
    if world > 1 and stage_no >= 2:
        grads /= world
    if world > 1 and stage_no >= 3:
        weights /= world
    if offload and (deepspeed or name.startswith("fsdp")):
        optimizer = 0.0
        notes.append(f"optimizer states on CPU ({trainable * 12 / GiB:.0f} GiB of host RAM across processes)")
        if stage_no == 3:
            weights, grads = weights * 0.1, grads * 0.1

    reference = 0.0
    host_reference = stage == "grpo" and cfg.grpo.beta > 0 and host_optim
    if stage == "grpo" and cfg.grpo.beta > 0 and not lora:
        reference = counts.total * compute / (world if stage_no >= 3 else 1)
    activations = _activation_bytes(cfg, stage, counts, trainable)
    if host_reference:
        # The reference lives in host RAM; its pass stashes the trainable weights on the card, before any grads
        # or activations exist, so it only counts where it exceeds them.
        reference = max(0.0, trainable * compute - grads - activations)
        notes.append(f"reference weights in host RAM: {trainable * compute / GiB:.0f} GiB")
    server, server_awake = 0.0, 0.0
    if stage == "grpo" and cfg.server.url is None and cfg.server.engine == "vllm" and device_total_bytes:
        server = server_awake = cfg.server.gpu_memory_utilization * device_total_bytes
        if cfg.server.sleep_during_update:
            server = SERVER_ASLEEP_BYTES
            notes.append("the server sleeps during the update (server.sleep_during_update)")
        notes.append(f"the local vLLM server takes server.gpu_memory_utilization={cfg.server.gpu_memory_utilization} "
                     "of the card while it generates (set server.url to run it on another GPU)")
    body = weights + grads + optimizer + autocast_copies + reference + activations
    overhead = 1.5 * GiB + 0.05 * body
    # While the server generates, the learner holds its weights and optimizer state, no grads or activations.
    resident = weights + (0.0 if host_optim else optimizer)
    generation = resident + (0.0 if host_reference else reference) + server_awake + 1.5 * GiB + 0.05 * resident
    return MemoryEstimate(params=counts.total, trainable=trainable, weights=weights, grads=grads, optimizer=optimizer,
                          autocast_copies=autocast_copies, reference=reference, activations=activations,
                          server=server, overhead=overhead, device_total=device_total_bytes, notes=notes,
                          generation=generation if server_awake and cfg.server.sleep_during_update else 0.0,
                          host=host_bytes_needed(trainable, trainable if host_reference else 0,
                                                 _BYTES[momentum_dtype(cfg, stage, trainable)]) if host_optim else 0.0)


def momentum_dtype(cfg, stage: str, trainable: int) -> torch.dtype:
    """The offloaded optimizer's first-moment dtype on this host (optim.offload_momentum_dtype, auto by free RAM)."""
    reference = trainable if stage == "grpo" and cfg.grpo.beta > 0 else 0
    return pick_momentum_dtype(_stage_optim(cfg, stage).offload_momentum_dtype, trainable, reference,
                               host_memory_available())


def with_offload(cfg, stage: str, value: str):
    """A copy of cfg whose stage optimizer has optim.offload=value."""
    cfg = cfg.model_copy(deep=True)
    _stage_optim(cfg, stage).offload = value
    return cfg


def offload_refusal(cfg, stage: str, world: int, strategy_name: str) -> str | None:
    """Why the host-offloaded optimizer cannot serve this config (None: it can)."""
    if cfg.model.lora.enabled:
        return "LoRA trains a few adapters, which need no offload (set optim.offload=gpu)"
    if not _stage_optim(cfg, stage).master_weights_fp32:
        return "it keeps fp32 master weights, and optim.master_weights_fp32 is false"
    if world > 1 or strategy_name not in ("auto", "ddp"):
        return (f"it runs in one process without a sharding strategy (got {world} processes, "
                f"SUZAK_STRATEGY={strategy_name}); with several GPUs use SUZAK_STRATEGY=zero2_offload")
    return None


def offloads(cfg, stage: str, device_type: str, world: int = 1, strategy_name: str = "auto",
             device_total_bytes: float | None = None, counts: ParamCounts | None = None) -> bool:
    """Whether the stage's optimizer lives in host RAM: optim.offload=cpu, or auto where the GPU layout won't fit."""
    setting = _stage_optim(cfg, stage).offload
    if setting == "gpu" or offload_refusal(cfg, stage, world, strategy_name) is not None:
        return False
    if setting == "cpu":
        return True
    if device_type != "cuda" or device_total_bytes is None:
        return False
    resident = estimate_memory(with_offload(cfg, stage, "gpu"), counts, stage=stage, world_size=world,
                               strategy_name=strategy_name, device_total_bytes=device_total_bytes)
    return not resident.fits


def learner_device() -> torch.device:
    """The device this learner process will train on (its LOCAL_RANK GPU, or the CPU)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def resolve_offload(cfg, stage: str, device) -> object:
    """cfg with the stage's optim.offload settled to cpu or off for this device (auto decided by the estimate)."""
    device = torch.device(device)
    world, name = int(os.environ.get("WORLD_SIZE", "1")), strategy()
    setting = _stage_optim(cfg, stage).offload
    refusal = offload_refusal(cfg, stage, world, name)
    if setting == "cpu" and refusal is not None and not cfg.model.lora.enabled:
        raise SuzakError(f"{stage}.optim.offload=cpu cannot be used here: {refusal}")
    if setting == "auto":
        counts = count_parameters(cfg.model.name_or_path, cfg.model.lora) if device.type == "cuda" else None
        setting = "cpu" if offloads(cfg, stage, device.type, world, name, _device_total(device), counts) else "gpu"
    return with_offload(cfg, stage, setting if refusal is None else "gpu")


def _counts(cfg, num_params) -> ParamCounts:
    if isinstance(num_params, ParamCounts):
        return num_params
    if num_params is None:
        return count_parameters(cfg.model.name_or_path, cfg.model.lora)
    # A bare total: split it like the 7B model.
    ref = count_parameters("Qwen/Qwen2.5-VL-7B-Instruct", cfg.model.lora)
    scale = num_params / ref.total
    return ParamCounts(total=int(num_params), vision=int(ref.vision * scale), merger=int(ref.merger * scale),
                       lm=int(num_params - int(ref.vision * scale) - int(ref.merger * scale)),
                       lora=int(ref.lora * math.sqrt(scale)), hidden=ref.hidden, layers=ref.layers,
                       vocab=ref.vocab, vision_hidden=ref.vision_hidden, vision_depth=ref.vision_depth)


def _knobs(cfg, stage: str) -> list[tuple[str, object]]:
    """(description, how to apply it to a config copy or env) for each memory knob not yet turned."""
    m, optim = cfg.model, _stage_optim(cfg, stage)
    knobs: list[tuple[str, object]] = []
    if optim.offload != "cpu" and offload_refusal(cfg, stage, int(os.environ.get("WORLD_SIZE", "1")),
                                                   strategy()) is None:
        knobs.append((f"{stage}.optim.offload=cpu (fp32 masters and AdamW moments in host RAM, bf16 on the card)",
                      lambda c: setattr(_stage_optim(c, stage), "offload", "cpu")))
    if not m.lora.enabled:
        knobs.append(("model.lora.enabled=true (train LoRA adapters; no reference copy needed)",
                      lambda c: setattr(c.model.lora, "enabled", True)))
    name = strategy()
    if not name.endswith("_offload"):
        knobs.append(("SUZAK_STRATEGY=zero2_offload (DeepSpeed ZeRO-2 with optimizer states on CPU; "
                      "with several GPUs also SUZAK_STRATEGY=zero3 to shard the weights)", "zero2_offload"))
    if optim.optimizer != "adamw_8bit":
        knobs.append((f"{stage}.optim.optimizer=adamw_8bit (8-bit Adam states; needs bitsandbytes)",
                      lambda c: setattr(_stage_optim(c, stage), "optimizer", "adamw_8bit")))
    if not m.freeze_vision and not m.lora.enabled:
        knobs.append(("model.freeze_vision=true (vision tower frozen: no grads/optimizer states for it)",
                      lambda c: setattr(c.model, "freeze_vision", True)))
    if not m.gradient_checkpointing:
        knobs.append(("model.gradient_checkpointing=true (recompute activations in the backward)",
                      lambda c: setattr(c.model, "gradient_checkpointing", True)))
    if stage == "grpo" and cfg.server.url is None and cfg.server.gpu_memory_utilization > 0.15:
        lower = round(max(0.1, cfg.server.gpu_memory_utilization / 2), 2)
        knobs.append((f"server.gpu_memory_utilization={lower} (smaller vLLM share; or server.url on another GPU)",
                      lambda c: setattr(c.server, "gpu_memory_utilization", lower)))
    if stage == "grpo" and cfg.grpo.micro_batch_tokens > 4096:
        knobs.append(("grpo.micro_batch_tokens=4096 (smaller learner micro-batches)",
                      lambda c: setattr(c.grpo, "micro_batch_tokens", 4096)))
    return knobs


def check_fits(cfg, device_total_bytes: float, *, num_params=None, stage: str = "grpo",
               world_size: int | None = None) -> MemoryEstimate:
    """The estimate if it fits the card; otherwise SuzakError with the breakdown and what each knob would give."""
    counts = _counts(cfg, num_params)
    est = estimate_memory(cfg, counts, stage=stage, world_size=world_size, device_total_bytes=device_total_bytes)
    if est.fits:
        _check_host_fits(cfg, est, stage)
        return est
    lines = []
    for text, apply in _knobs(cfg, stage):
        if isinstance(apply, str):
            alt = estimate_memory(cfg, counts, stage=stage, world_size=world_size, strategy_name=apply,
                                  device_total_bytes=device_total_bytes)
        else:
            alt_cfg = cfg.model_copy(deep=True)
            apply(alt_cfg)
            alt = estimate_memory(alt_cfg, counts, stage=stage, world_size=world_size,
                                  device_total_bytes=device_total_bytes)
        if alt.total < est.total:
            mark = "fits alone" if alt.fits else "helps"
            lines.append(f"  - {text}: {alt.total / GiB:.1f} GiB ({mark})")
    raise SuzakError(
        f"the {stage} learner for {cfg.model.name_or_path} needs about {est.total / GiB:.1f} GiB per GPU but the card "
        f"has {device_total_bytes / GiB:.1f} GiB:\n{est.summary()}\nKnobs that lower it (combine several):\n"
        + "\n".join(lines) + f"\n(The estimate is rough; set {SKIP_CHECK_ENV}=1 to try anyway.)")


def _check_host_fits(cfg, est: MemoryEstimate, stage: str, available: float | None = None) -> None:
    """An offloaded optimizer (and reference) must fit the host's free RAM, or the run stops before loading."""
    available = host_memory_available() if available is None else available
    if not est.host or available is None or est.host + RUNTIME_HOST_BYTES <= available:
        return
    fixes = ["model.freeze_vision=true (fewer trainable parameters)", "model.lora.enabled=true"]
    if stage == "grpo" and cfg.grpo.beta > 0:
        fixes.insert(0, "grpo.beta=0 (no reference copy in host RAM)")
    raise SuzakError(f"the offloaded optimizer of the {stage} learner needs {est.host / GiB:.1f} GiB of host RAM "
                     f"(fp32 masters + AdamW moments, 10-12 bytes a trainable parameter, plus the reference), and "
                     f"the processes themselves about {RUNTIME_HOST_BYTES / GiB:.0f} GiB, but {available / GiB:.1f} "
                     f"GiB is available: free memory, or use one of: " + "; ".join(fixes)
                     + f". (Set {SKIP_CHECK_ENV}=1 to try anyway.)")


# ============================================================================ loading


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
    """{'vision': [patch_embed, blocks], 'merger': [merger], 'lm': [language_model, lm_head]} of a Qwen2.5-VL."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(inner, "module", inner)
    core = getattr(inner, "model", None)
    visual = getattr(core, "visual", None) or getattr(inner, "visual", None)
    language = getattr(core, "language_model", None)
    head = getattr(inner, "lm_head", None)
    if visual is None or language is None or head is None:
        raise SuzakError(f"{type(inner).__name__} is not laid out like transformers 5.x Qwen2.5-VL "
                         "(model.visual, model.language_model, lm_head); freezing needs that layout")
    return {"vision": [visual.patch_embed, visual.blocks], "merger": [visual.merger], "lm": [language, head]}


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


def _device_total(device: torch.device) -> float | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def load_policy(cfg, device, *, stage: str = "grpo") -> Policy:
    """Load the policy (and the reference if needed) for a stage, after checking it fits the card."""
    from suzak.models import load_model, load_processor, pick_attn_implementation

    device = torch.device(device)
    cfg = resolve_offload(cfg, stage, device)
    optim = _stage_optim(cfg, stage)
    offload = optim.offload == "cpu"
    m = cfg.model
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
    model = load_model(m.name_or_path, dtype=_DTYPE_NAMES[load_dtype], attn_implementation=attn, device=where)
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
                               attn_implementation=attn, device=where)
        ref_model.requires_grad_(False)
        ref_model.eval()
    processor = load_processor(m.name_or_path, min_pixels=m.min_pixels, max_pixels=m.max_pixels)
    momentum = torch.float32
    if offload:
        trainable, _ = trainable_parameter_count(model)
        momentum = momentum_dtype(cfg, stage, trainable)
        print(f"{stage}: fp32 master weights and AdamW moments in host RAM ({_DTYPE_NAMES[momentum]} first moment)"
              f"{', reference weights in host RAM' if host_reference is not None else ''}", flush=True)
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


# ============================================================================ optimizer


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


# ============================================================================ export


def merged_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named weights with LoRA deltas folded in, computed without touching the live model (no merge/unmerge drift).

    Tied tensors stay tied (one converted copy per storage) so save_pretrained drops the alias.
    """
    return dict(iter_merged_weights(model, dtype))


def iter_merged_weights(model, dtype: torch.dtype | None = None):
    """(hf_name, tensor) one at a time, each LoRA delta computed only when its weight is reached.

    Lazy on purpose: computing every delta first holds a full-size fp32 copy of every adapted matrix at once
    (26 GiB for 7B), which ran the H100 out of memory beside the rollout server.
    """
    is_peft = hasattr(model, "get_base_model")
    base = model.get_base_model() if is_peft else model
    lora_modules = {}
    if is_peft:
        from peft.tuners.lora import LoraLayer

        lora_modules = {f"{name}.weight": module for name, module in base.named_modules()
                        if isinstance(module, LoraLayer)}
    converted: dict[int, torch.Tensor] = {}
    for name, tensor in base.state_dict().items():
        if "lora_" in name or "modules_to_save" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        module = lora_modules.get(clean)
        adapters = [a for a in module.active_adapters if a in module.lora_A] if module is not None else []
        if adapters:
            merged = tensor.detach().float()
            for adapter in adapters:
                merged = merged + module.get_delta_weight(adapter).detach().float().to(tensor.device)
            yield clean, merged.to(dtype or tensor.dtype)
            continue
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key not in converted:
            converted[key] = tensor.detach().to(dtype or tensor.dtype)
        yield clean, converted[key]


def _lora_scaling(model) -> float:
    config = getattr(model, "peft_config", {}).get("default")
    if config is None:
        return 1.0
    return config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def merge_lora_state_dict(state_dict: dict, scaling: float, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A peft-named full state dict (e.g. gathered from ZeRO-3/FSDP shards) -> HF names, W + scaling * B @ A."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if "lora_" in key or "modules_to_save" in key:
            continue
        name = key.removeprefix("base_model.model.")
        if key.endswith(".base_layer.weight"):
            prefix = key.removesuffix(".base_layer.weight")
            a, b = state_dict.get(f"{prefix}.lora_A.default.weight"), state_dict.get(f"{prefix}.lora_B.default.weight")
            if a is not None and b is not None:
                value = value.float() + scaling * (b.float() @ a.float())
        name = name.replace(".base_layer.", ".")
        out[name] = value.to(dtype)
    return out


def _swap_in(tmp: Path, target: Path) -> None:
    """Replace `target` with the complete folder `tmp` (rename is atomic; an old copy is moved aside first)."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    os.rename(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_hf(policy: Policy, out_dir, *, state_dict: dict | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write model (LoRA merged) + processor as a Hugging Face folder that transformers and vLLM load; atomic.

    dtype: default the compute dtype (bf16 on CUDA, fp32 on CPU). state_dict: a full HF-named state dict gathered
    by the caller under ZeRO-3/FSDP (accelerator.get_state_dict); otherwise taken from policy.model.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    dtype = dtype or policy.precision.compute_dtype
    model = policy.model
    model = getattr(model, "module", model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if state_dict is None:
        state_dict = merged_state_dict(model, dtype)
    else:
        state_dict = merge_lora_state_dict(state_dict, _lora_scaling(model), dtype)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    old_dtype, old_cache = base.config.dtype, base.config.use_cache
    try:
        base.config.use_cache = True  # inference default for whoever loads the export
        with _no_peft_marker(base):
            base.save_pretrained(tmp, state_dict=state_dict)
        # save_pretrained records the live parameters' dtype (fp32 masters); the files hold `dtype`, and
        # dtype="auto" loaders (transformers, vLLM) should pick that.
        base.config.dtype = dtype
        base.config.save_pretrained(tmp)
        policy.processor.save_pretrained(tmp)
        _swap_in(tmp, out)
    finally:
        base.config.dtype, base.config.use_cache = old_dtype, old_cache
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextmanager
def _no_peft_marker(base):
    # A peft-wrapped base may carry transformers' peft flag, which would make save_pretrained write an adapter.
    flag = getattr(base, "_hf_peft_config_loaded", None)
    if flag:
        base._hf_peft_config_loaded = False
    try:
        yield
    finally:
        if flag:
            base._hf_peft_config_loaded = flag


def push_to_hub(folder, repo_id: str | None = None, *, private: bool = True) -> str:
    """Upload an exported folder to the hub (token from HF_TOKEN, never printed); returns the repo URL."""
    repo_id = repo_id or os.environ.get("HUB_MODEL_ID")
    if not repo_id:
        raise SuzakError("push_to_hub needs a repo: set checkpoint.hub_model_id (or HUB_MODEL_ID), "
                         "e.g. me/qwen25vl-r1v")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise SuzakError("push_to_hub needs HF_TOKEN in the environment (a write token from "
                         "https://huggingface.co/settings/tokens)")
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SuzakError(f"{folder} is not an exported model folder (no config.json); export before pushing")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="suzak export")
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; the token never enters the message
        message = str(e).replace(token, "***")[:300]
        raise SuzakError(f"upload of {folder} to {repo_id} failed: {type(e).__name__}: {message}") from None
    return str(url)


def main(argv: list[str] | None = None) -> None:
    """python -m trainer.model_setup MODEL [GPU_GiB] [key=value ...]: print the estimate for a config."""
    from suzak.config import load_config

    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        print(main.__doc__)
        return
    model = args.pop(0)
    gib = float(args.pop(0)) if args and "=" not in args[0] else 79.6  # an H100 80GB reports 79.6 GiB
    cfg = load_config(None, [f"model.name_or_path={model}", *args])
    est = estimate_memory(cfg, device_total_bytes=gib * GiB)
    print(est.summary())
    try:
        check_fits(cfg, gib * GiB)
        print("fits")
    except SuzakError as e:
        print(e)


if __name__ == "__main__":
    main()

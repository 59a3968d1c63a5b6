"""Will it fit? Parameter counts from the architecture alone, the per-GPU memory estimate of a learner (and the
rollout server beside it), where the optimizer lives (optim.offload), and the check that refuses a config before
anything loads, naming the knobs that would make it fit.

    from trainer.memory import check_fits, estimate_memory
    check_fits(cfg, torch.cuda.get_device_properties(0).total_memory)   # SuzakError naming the knobs if too big

    python -m trainer.memory Qwen/Qwen2.5-VL-7B-Instruct 79.6 model.lora.enabled=true   # estimate, GiB card
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

import torch

from suzak.errors import SuzakError
from trainer.distributed import resolve_precision, strategy
from trainer.offload import (DEFAULT_BUCKET_BYTES, RUNTIME_HOST_BYTES, host_bytes_needed, host_memory_available,
                             pick_momentum_dtype)

GiB = 1024**3
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}

# Public config.json values of the Qwen2.5-VL and Qwen3-VL checkpoints (their hub repos' config.json): counted on
# the meta device here, written into benchmark model folders by bench/make_arch.py. Nothing is downloaded.
_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, patch_size=14, spatial_merge_size=2,
               temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31], in_channels=3,
               hidden_act="silu", tokens_per_second=2)
KNOWN_ARCHS = {
    "Qwen/Qwen2.5-VL-3B-Instruct": dict(
        text=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                  num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True, max_window_layers=70),
        vision=dict(_VISION, out_hidden_size=2048), tie_word_embeddings=True),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                  num_attention_heads=28, num_key_value_heads=4, tie_word_embeddings=False, max_window_layers=28),
        vision=dict(_VISION, out_hidden_size=3584), tie_word_embeddings=False),
}
KNOWN_ARCHS["Qwen/Qwen2.5-VL-3B"] = KNOWN_ARCHS["Qwen/Qwen2.5-VL-3B-Instruct"]
KNOWN_ARCHS["Qwen/Qwen2.5-VL-7B"] = KNOWN_ARCHS["Qwen/Qwen2.5-VL-7B-Instruct"]
for _arch in KNOWN_ARCHS.values():
    _arch.setdefault("family", "qwen25vl")

# Qwen3-VL dense (Qwen/Qwen3-VL-{2B,4B,8B}-Instruct config.json; the Thinking variants share the shapes): patch 16,
# learned position embeddings, DeepStack mergers at deepstack_visual_indexes, interleaved mrope [24, 20, 20].
_TEXT3 = dict(head_dim=128, hidden_act="silu", attention_bias=False, rms_norm_eps=1e-6, max_position_embeddings=262144,
              rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                               "mrope_interleaved": True})
_VISION3 = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16, spatial_merge_size=2,
                temporal_patch_size=2, in_channels=3, hidden_act="gelu_pytorch_tanh", num_position_embeddings=2304,
                deepstack_visual_indexes=[5, 11, 17])
KNOWN_ARCHS.update({
    "Qwen/Qwen3-VL-2B-Instruct": dict(
        family="qwen3vl",
        text=dict(_TEXT3, vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
        vision=dict(_VISION3, out_hidden_size=2048), tie_word_embeddings=True),
    "Qwen/Qwen3-VL-4B-Instruct": dict(
        family="qwen3vl",
        text=dict(_TEXT3, vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
        vision=dict(_VISION3, out_hidden_size=2560), tie_word_embeddings=True),
    "Qwen/Qwen3-VL-8B-Instruct": dict(
        family="qwen3vl",
        text=dict(_TEXT3, vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
        vision=dict(_VISION3, depth=27, hidden_size=1152, intermediate_size=4304, out_hidden_size=4096,
                    deepstack_visual_indexes=[8, 16, 24]), tie_word_embeddings=False),
})
for _size in ("2B", "4B", "8B"):
    KNOWN_ARCHS[f"Qwen/Qwen3-VL-{_size}-Thinking"] = KNOWN_ARCHS[f"Qwen/Qwen3-VL-{_size}-Instruct"]

SKIP_CHECK_ENV = "SUZAK_SKIP_MEMORY_CHECK"
# What an asleep (level 2) vLLM server keeps on the card: CUDA context, graph pools, NCCL/compile buffers.
SERVER_ASLEEP_BYTES = 2.0 * GiB
# What an awake server holds beyond its gpu_memory_utilization share (CUDA contexts of its processes, graph pools,
# push buffers): measured on the H100 beside the 3B and 7B full-parameter learners (bench/RESULTS.md, issue 15).
SERVER_BEYOND_SHARE_BYTES = 5.0 * GiB
OFFLOAD_STAGING_BYTES = DEFAULT_BUCKET_BYTES  # trainer/offload.py streams the step in buckets of this size


# ============================================================================ parameter counts


@dataclass(frozen=True)
class ParamCounts:
    """Parameters per part of a Qwen2.5-VL / Qwen3-VL (tied embeddings counted once), plus the sizes activations
    depend on."""

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
    if ".visual.merger." in f".{name}" or ".visual.deepstack_merger_list." in f".{name}":  # as model.freeze_merger
        return "merger"
    if ".visual." in f".{name}":
        return "vision"
    return "lm"


def known_arch_config(arch: dict, **extra):
    """The transformers config of a KNOWN_ARCHS entry (its family's class); extra: top-level fields (token ids)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    cls = Qwen3VLConfig if arch["family"] == "qwen3vl" else Qwen2_5_VLConfig
    return cls(text_config=dict(arch["text"]), vision_config=dict(arch["vision"]),
               tie_word_embeddings=arch["tie_word_embeddings"], **extra)


def _arch_config(name_or_path: str):
    if name_or_path in KNOWN_ARCHS:
        return known_arch_config(KNOWN_ARCHS[name_or_path])
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
    from suzak.families import FAMILIES

    factor = FAMILIES[cfg.model.family].factor if cfg.model.family in FAMILIES else 28
    visual = cfg.model.max_pixels // (factor * factor)
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
    momentum_bytes = 4

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
        momentum_bytes = _BYTES[momentum]
        notes.append(f"fp32 master weights and AdamW moments ({_DTYPE_NAMES[momentum]} first moment) in host RAM: "
                     f"{trainable * (8 + momentum_bytes) / GiB:.0f} GiB (grpo/sft.optim.offload)")
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
    if stage == "grpo" and cfg.server.url is None and device_total_bytes:
        server = cfg.server.gpu_memory_utilization * device_total_bytes
        # The generation phase is the peak of a sleeping-server run (measured); without sleep the update phase
        # counts the share alone, which the LoRA runs' measured peaks bear out (bench/RESULTS.md).
        server_awake = server + SERVER_BEYOND_SHARE_BYTES
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
                          host=host_bytes_needed(trainable, trainable if host_reference else 0, momentum_bytes)
                          if host_optim else 0.0)


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
    """cfg with the stage's optim.offload settled to cpu or gpu for this device (auto decided by the estimate)."""
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



def _device_total(device: torch.device) -> float | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return float(torch.cuda.get_device_properties(device).total_memory)


def main(argv: list[str] | None = None) -> None:
    """python -m trainer.memory MODEL [GPU_GiB] [key=value ...]: print the estimate for a config."""
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


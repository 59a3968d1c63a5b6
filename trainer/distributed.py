"""Process setup of the learner: one `accelerate.Accelerator` for single-process, DDP, DeepSpeed ZeRO and FSDP2 runs.

    suzak train --config configs/tiny_clevr.yaml                                  # one process (CPU or one GPU)
    torchrun --nproc-per-node 2 -m suzak train --config ...                       # DDP (gloo on CPU, nccl on CUDA)
    SUZAK_STRATEGY=zero2 torchrun --nproc-per-node 4 -m suzak train --config ...  # DeepSpeed ZeRO-2
    accelerate launch --config_file my_zero3.yaml -m suzak train --config ...     # whatever the accelerate file says

Choosing the sharding strategy (SUZAK_STRATEGY, read by `strategy()`):
    auto (default)   what `accelerate launch --config_file` configured, else plain DDP / one process
    ddp              replicate the model, all-reduce gradients
    zero1 / zero2 / zero3                 DeepSpeed ZeRO stage 1/2/3 (needs `pip install deepspeed`)
    zero2_offload / zero3_offload         ZeRO with optimizer states (zero3: also parameters) on CPU
    fsdp2 / fsdp2_offload                 PyTorch FSDP2 (fully_shard) per decoder layer / vision block
R1-V reports ZeRO-1/2 work with in-process weight loading; ZeRO-3 shards the parameters, so every weight push
gathers them first (slower). An accelerate config file works too: its DeepSpeed section may leave
`train_micro_batch_size_per_gpu` and `gradient_accumulation_steps` on "auto"; suzak sets them to 1 because the
training loops drive the accumulation boundary themselves (`micro_batch_context`).

Precision: with optim.master_weights_fp32 (the default) the parameters stay fp32 and the forward runs under bf16
autocast on CUDA (accelerate mixed_precision="bf16"); plain bf16 parameters lose updates at lr 1e-6 because
1e-6 * w is below bf16's resolution of w. On CPU everything is fp32 and no autocast runs, so CPU runs are exact.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from suzak.errors import SuzakError

STRATEGIES = ("auto", "ddp", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "fsdp2", "fsdp2_offload")
# Wrapped as one FSDP2 unit each: the repeated blocks of the language model and of the vision tower.
FSDP_WRAP_CLASSES = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock"]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class Precision:
    """Dtype of the stored parameters, and of the autocast region around the forward (None: no autocast)."""

    param_dtype: torch.dtype
    autocast_dtype: torch.dtype | None

    @property
    def mixed_precision(self) -> str:
        """accelerate's name for the autocast setting."""
        return {None: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.autocast_dtype]

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.autocast_dtype or self.param_dtype


def resolve_precision(model_cfg, optim_cfg, device_type: str) -> Precision:
    """model.dtype + optim.master_weights_fp32 -> how parameters are stored and how the forward runs."""
    if model_cfg.dtype == "auto":
        compute = torch.bfloat16 if device_type == "cuda" else torch.float32
    else:
        compute = _DTYPES[model_cfg.dtype]
    if compute == torch.float32:
        return Precision(torch.float32, None)
    if device_type != "cuda":
        # CPU autocast in bf16 is slow and inexact; low-precision weights on CPU are only used when asked for.
        return Precision(compute, None)
    if optim_cfg.offload == "cpu" and optim_cfg.master_weights_fp32 and not model_cfg.lora.enabled:
        # The fp32 masters live in the host optimizer (trainer/offload.py); the model itself runs in 16 bits.
        return Precision(compute, None)
    if optim_cfg.master_weights_fp32:
        return Precision(torch.float32, compute)
    return Precision(compute, None)


def strategy() -> str:
    """The sharding strategy named by SUZAK_STRATEGY (default auto)."""
    name = os.environ.get("SUZAK_STRATEGY", "auto").strip().lower() or "auto"
    if name not in STRATEGIES:
        raise SuzakError(f"SUZAK_STRATEGY={name!r} is not a strategy; use one of {', '.join(STRATEGIES)}")
    return name


def world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files and prints (global rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op in a single-process run."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _collective_device() -> torch.device:
    # nccl only moves CUDA tensors; gloo only CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_mean(x):
    """Mean of a float or tensor over all processes (the value itself in a single-process run)."""
    is_tensor = torch.is_tensor(x)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x.clone() if is_tensor else float(x)
    t = (x.detach() if is_tensor else torch.tensor(float(x))).to(_collective_device(), torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    t = t / dist.get_world_size()
    return t.to(x.device, x.dtype) if is_tensor else float(t)


def all_reduce_sum(x: float) -> float:
    """Sum of a float over all processes."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return float(x)
    t = torch.tensor(float(x), dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t)


def _init_process_group() -> None:
    """Under torchrun (WORLD_SIZE > 1) start the process group ourselves: gloo on CPU, nccl on CUDA.

    accelerate would pick the same, except on CPU where it prefers MPI when torch was built with it.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise SuzakError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set: launch with "
                         "`torchrun --nproc-per-node N -m suzak ...` or `accelerate launch`")
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    else:
        dist.init_process_group("gloo")


def _deepspeed_config(name: str, optim_cfg, precision: Precision) -> dict:
    stage = int(name[4])
    zero: dict = {"stage": stage, "overlap_comm": True, "contiguous_gradients": True,
                  "reduce_bucket_size": 5e8, "allgather_bucket_size": 5e8}
    if name.endswith("_offload"):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if stage == 3:
        # export_hf needs whole weights: gather them (16-bit) on save.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        # Nominal: the loops accumulate themselves and mark the boundary (see micro_batch_context).
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": optim_cfg.max_grad_norm,
        "bf16": {"enabled": precision.mixed_precision == "bf16"},
        "fp16": {"enabled": precision.mixed_precision == "fp16"},
        "zero_optimization": zero,
        # Allow the torch AdamW of build_optimizer with offload (DeepSpeedCPUAdam is used when importable).
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def _plugins(name: str, optim_cfg, precision: Precision) -> dict:
    """accelerate plugin arguments for SUZAK_STRATEGY (empty: accelerate's own environment decides)."""
    if name in ("auto", "ddp"):
        return {}
    if name.startswith("zero"):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            raise SuzakError(f"SUZAK_STRATEGY={name} needs DeepSpeed: `pip install deepspeed` (the Docker image "
                             "has it), or use SUZAK_STRATEGY=fsdp2 / ddp") from None
        from accelerate.utils import DeepSpeedPlugin

        config = _deepspeed_config(name, optim_cfg, precision)
        return {"deepspeed_plugin": DeepSpeedPlugin(hf_ds_config=config, zero3_init_flag=name.startswith("zero3"))}
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=FSDP_WRAP_CLASSES,
        reshard_after_forward=True, cpu_offload=name.endswith("_offload"), state_dict_type="FULL_STATE_DICT",
        cpu_ram_efficient_loading=False, activation_checkpointing=False)
    return {"fsdp_plugin": plugin}


def _fix_deepspeed_auto(accelerator) -> None:
    """An accelerate config file may leave batch sizes on 'auto', which needs a prepared DataLoader; we have none."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps"):
        if config.get(key, "auto") == "auto" or key == "gradient_accumulation_steps":
            config[key] = 1
    config.pop("train_batch_size", None)


def make_accelerator(cfg, optim_cfg=None):
    """The Accelerator of this process (optim_cfg: the stage's optimizer config, default cfg.grpo.optim).

    Safe to call again in the same process (SFT then GRPO): the accelerator state is rebuilt, the process group kept.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    optim_cfg = optim_cfg if optim_cfg is not None else cfg.grpo.optim
    name = strategy()
    _init_process_group()
    use_cuda = torch.cuda.is_available()
    precision = resolve_precision(cfg.model, optim_cfg, "cuda" if use_cuda else "cpu")
    # A second stage may ask for another precision; accelerate refuses to change an initialised state.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=not use_cuda, mixed_precision=precision.mixed_precision,
                              **_plugins(name, optim_cfg, precision))
    _fix_deepspeed_auto(accelerator)
    accelerator.suzak_precision = precision  # read by load_policy's callers and the loops
    return accelerator


def is_sharded(accelerator) -> bool:
    """True under DeepSpeed or FSDP, where weights/optimizer state live in shards and saving is collective."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


@contextmanager
def micro_batch_context(accelerator, model, last: bool):
    """Wrap one micro-batch's forward+backward of a gradient-accumulation step.

    Not `last`: skip the DDP all-reduce (no_sync) and tell DeepSpeed this is not an accumulation boundary.
    `last`: gradients are reduced and DeepSpeed steps its optimizer inside `accelerator.backward`, so the
    following `optimizer.step()` (a no-op wrapper under DeepSpeed) and `zero_grad()` behave on every strategy.
    """
    # accelerate's own `accumulate()` flips this flag too; it only supports a fixed number of micro-batches.
    accelerator.gradient_state._set_sync_gradients(last)
    try:
        if last:
            yield
        else:
            with accelerator.no_sync(model):
                yield
    finally:
        accelerator.gradient_state._set_sync_gradients(True)


def autocast(accelerator):
    """The forward's autocast region (a no-op when the run has no mixed precision)."""
    return accelerator.autocast()

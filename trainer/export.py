"""Exporting the policy: HF-named weights with LoRA folded in, an atomic Hugging Face folder that transformers and
vLLM load, and the upload to the hub.

    from trainer.export import export_hf, push_to_hub
    export_hf(policy, "runs/x/grpo/final")
"""

from __future__ import annotations

import math
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from suzak.errors import SuzakError

if TYPE_CHECKING:
    from trainer.policy import Policy


def merged_state_dict(model, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """HF-named weights with LoRA deltas folded in, computed without touching the live model (no merge/unmerge drift).

    Tied tensors stay tied (one converted copy per storage) so save_pretrained drops the alias.
    """
    return dict(iter_merged_weights(model, dtype))


def iter_merged_weights(model, dtype: torch.dtype | None = None):
    """(hf_name, tensor) one at a time, each LoRA delta computed only when its weight is reached.

    Lazy on purpose: computing every delta first holds a full-size fp32 copy of every adapted matrix at once,
    which ran the H100 out of memory beside the rollout server (bench/RESULTS.md, issues 7 and 9).
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


def hub_target(repo_id: str | None = None) -> tuple[str, str]:
    """(repo, token) of a push: checked before a run trains, so a missing one fails in seconds, not at the end."""
    repo_id = repo_id or os.environ.get("HUB_MODEL_ID")
    if not repo_id:
        raise SuzakError("push_to_hub needs a repo: set checkpoint.hub_model_id (or HUB_MODEL_ID), "
                         "e.g. me/qwen25vl-r1v")
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise SuzakError("push_to_hub needs HF_TOKEN in the environment or .env (a write token from "
                         "https://huggingface.co/settings/tokens)")
    return repo_id, token


def push_to_hub(folder, repo_id: str | None = None, *, private: bool = True) -> str:
    """Upload an exported folder to the hub (token from HF_TOKEN, never printed); returns the repo URL."""
    repo_id, token = hub_target(repo_id)
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



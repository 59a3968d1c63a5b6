"""Weights as the rollout server wants them: HF checkpoint names, LoRA merged, in the server's dtype.

Used by trainer/grpo.py before every push (`suzak train`). vLLM's Qwen2.5-VL loader takes transformers 5.x names
(`model.visual.*`, `model.language_model.*`, `lm_head.weight`) and fuses q/k/v and gate/up itself.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def server_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' follows the server's own default: bf16 on CUDA, fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def _clean_name(name: str) -> str:
    # peft: base_model.model.<hf name>, with LoRA-wrapped linears holding their weight under .base_layer
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


@contextmanager
def merged_lora(model):
    """Temporarily merge LoRA adapters into the base weights (unmerged afterwards, so training continues unchanged)."""
    is_peft = hasattr(model, "merge_adapter") and hasattr(model, "peft_config")
    if is_peft:
        model.merge_adapter()
    try:
        yield model
    finally:
        if is_peft:
            model.unmerge_adapter()


@contextmanager
def server_weights(model, dtype: str = "auto"):
    """`with server_weights(model) as weights: transport.push(weights, v)`: (hf_name, tensor) for every base weight.

    LoRA stays merged until the block ends: the ipc transport shares the tensors' memory and the server reads
    them during the push, so unmerging any earlier would hand it the base weights. Adapter tensors are skipped.
    """
    device = next(model.parameters()).device
    target = server_dtype(dtype, device)
    with merged_lora(model):
        yield ((_clean_name(name), tensor.detach().to(target).contiguous())
               for name, tensor in model.state_dict().items()
               if "lora_" not in name and "modules_to_save" not in name)

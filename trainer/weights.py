"""Weights as the rollout server wants them: HF checkpoint names, LoRA merged, in the server's dtype.

Used by trainer/grpo.py before every push (`suzak train`). vLLM's Qwen2.5-VL and Qwen3-VL loaders take transformers
5.x names (`model.visual.*`, `model.language_model.*`, `lm_head.weight`) and fuses q/k/v and gate/up itself.
"""

from __future__ import annotations

from contextlib import contextmanager

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
def server_weights(model, dtype: str = "auto"):
    """`with server_weights(model) as weights: transport.push(weights, v)`: (hf_name, tensor) for every base weight.

    Under LoRA the merged tensors are built out of place (W + scale * B @ A): merging and unmerging in place
    on a bf16 base is not exact and would let the frozen base (and so the reference) drift with every push.
    Each is built when the transport reaches it; the ipc transport keeps what it shares alive until the server's reply.
    """
    device = next(model.parameters()).device
    target = server_dtype(dtype, device)
    if hasattr(model, "get_base_model"):
        from trainer.export import iter_merged_weights

        yield ((name, t.contiguous()) for name, t in iter_merged_weights(model, target))
        return
    yield ((_clean_name(name), tensor.detach().to(target).contiguous())
           for name, tensor in model.state_dict().items())

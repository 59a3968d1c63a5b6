"""Images of prompts: load a reference (path, http(s) URL, data: URL), resize it to the pixel budget, encode it.

Shared by the rollout server, its client, the learner and the evaluator, so every side sees identical pixels:

    from suzak.images import load_image, resize_to_budget, encode_image_data_url
    img = resize_to_budget(load_image("data/clevr/0001.png"), min_pixels=3136, max_pixels=401408)
    ref = encode_image_data_url(img)    # 'data:image/png;base64,...', a valid wire ContentPart.image

The budget follows the model's own rule (qwen-vl-utils' smart_resize, factor 28 = patch 14 x merge 2 for
Qwen2.5-VL, 32 = patch 16 x merge 2 for Qwen3-VL: `factor=` below, from suzak.families): both sides a multiple
of the factor, area within [min_pixels, max_pixels], aspect ratio kept. An image already at
that size passes through the model's processor unchanged, so what the learner encodes is what vLLM sees.
Imports PIL only (qwen-vl-utils, which pulls in torch, is imported on first resize); no vLLM here.
The rollout server loads with an `ImagePolicy`: size read from the header and checked before decoding, a byte
cap, allowed folders and URLs, and one error for every path it will not open.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from suzak.errors import SuzakError

if TYPE_CHECKING:
    from PIL import Image

PATCH_FACTOR = 28
"""Qwen2.5-VL: 14-pixel patches merged 2x2, so one visual token covers 28x28 pixels (Qwen3-VL: 32, its family's
factor); the default of every `factor` argument here."""
HTTP_TIMEOUT_S = 30.0


def _where(field: str | None) -> str:
    return f" (field {field})" if field else ""


def describe_ref(ref: str, limit: int = 80) -> str:
    """A short printable form of an image reference (data: URLs are long)."""
    if ref.startswith("data:"):
        return ref[: ref.find(",") + 1] + f"...({len(ref)} chars)" if "," in ref else ref[:limit]
    return ref if len(ref) <= limit else ref[:limit] + "..."


SERVER_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
"""Formats the rollout server decodes (PIL's other plugins, some of which call external tools, stay off)."""


@dataclass(frozen=True)
class ImagePolicy:
    """What a loader may open and how large, for images named by someone else (the rollout server's clients).

    roots: folders local paths must resolve into (symlinks followed first); None: any path; (): no paths.
    allow_urls: fetch http(s) URLs (no redirects followed). max_bytes: cap on an image's encoded size.
    max_pixels: width x height, read from the header and refused before decoding.
    """

    roots: tuple[str, ...] | None = None
    allow_urls: bool = True
    max_bytes: int = 64 << 20
    max_pixels: int | None = None
    formats: tuple[str, ...] | None = SERVER_FORMATS


def _too_many_pixels(width: int, height: int, max_pixels: int, field: str | None) -> SuzakError:
    return SuzakError(
        f"image{_where(field)} has {width}x{height} = {width * height} pixels, over the server's max_pixels "
        f"{max_pixels}: resize it first (RolloutClient.prepare_images / suzak.images.resize_to_budget "
        "does it) or start the server with a larger model.max_pixels")


def _decode(fp, source: str, field: str | None, policy: ImagePolicy | None = None,
            unavailable: SuzakError | None = None) -> Image.Image:
    """Open lazily, check the header's size against the policy, then decode; every failure is a SuzakError.

    unavailable: the error to raise instead of a decoding error (the server's uniform answer for paths)."""
    from PIL import Image

    max_pixels = policy.max_pixels if policy else None
    try:
        img = Image.open(fp, formats=list(policy.formats) if policy and policy.formats else None)
    except Image.DecompressionBombError as e:
        if max_pixels is not None:
            raise SuzakError(f"image{_where(field)} is over the server's max_pixels {max_pixels} ({e}): resize it "
                             "first (RolloutClient.prepare_images / suzak.images.resize_to_budget does it)") from None
        raise SuzakError(f"image {source}{_where(field)} is too large to open safely ({e})") from None
    except Exception as e:  # PIL raises many types for a bad file (OSError, SyntaxError, struct.error ...)
        raise unavailable or SuzakError(f"cannot decode image {source}{_where(field)}: {e}; give a PNG/JPEG/WebP "
                                        "file") from None
    if max_pixels is not None and img.width * img.height > max_pixels:
        raise _too_many_pixels(img.width, img.height, max_pixels, field)
    try:
        img.load()
    except Exception as e:
        raise unavailable or SuzakError(f"cannot decode image {source}{_where(field)}: {e}; give a PNG/JPEG/WebP "
                                        "file") from None
    return img


def _read_data_url(ref: str, field: str | None, max_bytes: int | None = None) -> bytes:
    header, sep, data = ref.partition(",")
    if not sep or ";base64" not in header:
        raise SuzakError(f"image data URL {describe_ref(ref)}{_where(field)} must look like "
                         "'data:image/png;base64,<base64 bytes>'")
    if max_bytes is not None and len(data) * 3 // 4 > max_bytes:
        raise SuzakError(f"image data URL{_where(field)} holds about {len(data) * 3 // 4} bytes, over the server's "
                         f"limit of {max_bytes} per image")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SuzakError(f"image data URL{_where(field)} holds invalid base64: {e}") from None


def _read_http(ref: str, field: str | None, timeout_s: float, max_bytes: int | None = None,
               follow_redirects: bool = True) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", ref, timeout=timeout_s, follow_redirects=follow_redirects) as resp:
            if resp.status_code != 200:
                raise SuzakError(f"cannot download image {ref}{_where(field)}: HTTP {resp.status_code}"
                                 + (" (redirects are not followed)" if resp.is_redirect and not follow_redirects
                                    else ""))
            chunks, size = [], 0
            for chunk in resp.iter_bytes():
                size += len(chunk)
                if max_bytes is not None and size > max_bytes:
                    raise SuzakError(f"image {ref}{_where(field)} is over the limit of {max_bytes} bytes per image")
                chunks.append(chunk)
            return b"".join(chunks)
    except httpx.HTTPError as e:
        raise SuzakError(f"cannot download image {ref}{_where(field)}: {e}") from None


def _read_file(ref: str, field: str | None) -> bytes:
    path = Path(ref.removeprefix("file://")).expanduser()
    try:
        is_file = path.is_file()
    except (OSError, RuntimeError):
        is_file = False
    if not is_file:
        hint = "it is a folder" if path.is_dir() else "no such file"
        raise SuzakError(f"image file not found: {path}{_where(field)} ({hint}); paths are read on the "
                         "server's machine: send the image as a data: URL (suzak.images.encode_image_data_url) "
                         "when the server runs elsewhere")
    try:
        return path.read_bytes()
    except OSError as e:
        raise SuzakError(f"cannot read image file {path}{_where(field)}: {e}") from None


def _unavailable(ref: str, field: str | None, policy: ImagePolicy) -> SuzakError:
    """The server's one answer for a path it will not open: missing, outside the roots, unreadable or not an image
    all read the same, so a client cannot probe which files exist."""
    where = ("under the server's allowed image roots (server.allowed_image_roots)" if policy.roots
             else "(this server opens no local paths: server.allowed_image_roots is empty)"
             if policy.roots is not None else "")
    return SuzakError(f"image file not found: {describe_ref(ref, 300)}{_where(field)}: no readable image file at this "
                      f"path {where}".rstrip() + "; paths are read on the server's machine: send the image as a "
                      "data: URL (suzak.images.encode_image_data_url) when the server runs elsewhere")


def _inside(path: Path, roots: tuple[str, ...]) -> bool:
    for root in roots:
        try:
            path.relative_to(os.path.realpath(os.path.expanduser(root)))
            return True
        except ValueError:
            continue
    return False


def _open_path(ref: str, field: str | None, policy: ImagePolicy) -> Image.Image:
    """A local path under the policy: resolved (symlinks followed) into an allowed root, a regular file under the
    byte cap, a known image format; anything else is the same `_unavailable` error."""
    unavailable = _unavailable(ref, field, policy)
    if policy.roots is not None and not policy.roots:
        raise unavailable
    try:
        path = Path(os.path.realpath(Path(ref.removeprefix("file://")).expanduser(), strict=True))
        if policy.roots is not None and not _inside(path, policy.roots):
            raise unavailable
        st = path.stat()
    except (OSError, RuntimeError, ValueError):
        raise unavailable from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > policy.max_bytes:
        raise unavailable
    try:
        fh = open(path, "rb")
    except OSError:
        raise unavailable from None
    with fh:
        return _decode(fh, ref, field, policy, unavailable=unavailable)


def load_image(ref: str, *, field: str | None = None, timeout_s: float = HTTP_TIMEOUT_S,
               policy: ImagePolicy | None = None) -> Image.Image:
    """Open an image given by local path (or file://), http(s) URL or base64 data: URL, as RGB.

    `field` names where the reference came from (e.g. 'prompts.0.messages.0.content.1.image'), so the
    error says which image of a request is broken. `policy` (the rollout server's) limits what is opened and
    checks the pixel count from the header before decoding; without it any path or URL is opened.
    """
    if not isinstance(ref, str) or not ref.strip():
        raise SuzakError(f"image reference{_where(field)} is empty: give a path, an http(s) URL or a data: URL")
    ref = ref.strip()
    if ref.startswith("data:"):
        raw = _read_data_url(ref, field, policy.max_bytes if policy else None)
        img = _decode(io.BytesIO(raw), "data URL", field, policy)
    elif ref.startswith(("http://", "https://")):
        if policy is not None and not policy.allow_urls:
            raise SuzakError(f"image URLs are off on this server (server.allow_image_urls){_where(field)}: send the "
                             "image as a data: URL (suzak.images.encode_image_data_url)")
        raw = _read_http(ref, field, timeout_s, policy.max_bytes if policy else None,
                         follow_redirects=policy is None)
        img = _decode(io.BytesIO(raw), ref, field, policy)
    elif policy is not None:
        img = _open_path(ref, field, policy)
    else:
        img = _decode(io.BytesIO(_read_file(ref, field)), ref, field)
    try:
        return to_rgb(img)
    except Exception as e:
        raise SuzakError(f"cannot convert image {describe_ref(ref)}{_where(field)} to RGB: {e}") from None


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
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {ratio}")
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
def budget_size(height: int, width: int, min_pixels: int, max_pixels: int,
                factor: int = PATCH_FACTOR) -> tuple[int, int]:
    """(height, width) the model sees for an image of this size: qwen-vl-utils' smart_resize at `factor`."""
    try:
        return tuple(_smart_resize()(height, width, factor=factor, min_pixels=min_pixels,
                                     max_pixels=max_pixels))
    except (ValueError, AssertionError) as e:
        raise SuzakError(f"image of {width}x{height} cannot be resized to [{min_pixels}, {max_pixels}] pixels: {e}") \
            from None


def visual_tokens(height: int, width: int, min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR) -> int:
    """Number of <|image_pad|> tokens the image expands to in the prompt (one per factor x factor block)."""
    h, w = budget_size(height, width, min_pixels, max_pixels, factor)
    return (h // factor) * (w // factor)


def resize_to_budget(img: Image.Image, min_pixels: int, max_pixels: int, factor: int = PATCH_FACTOR) -> Image.Image:
    """Resize to the model's input size for this budget (bicubic, as qwen-vl-utils); a no-op when already there."""
    from PIL import Image

    img = to_rgb(img)
    height, width = budget_size(img.height, img.width, min_pixels, max_pixels, factor)
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
    if img.width * img.height > max_pixels:
        raise _too_many_pixels(img.width, img.height, max_pixels, field)


def is_file(path: Path) -> bool:
    """Path.is_file, False (not an error) for a path that cannot be stat-ed (a symlink loop, a long name)."""
    try:
        return path.is_file()
    except (OSError, RuntimeError):
        return False


def open_image(path: Path, where: str = ""):
    """Open an image file as RGB, naming the file (and the jsonl line) when it is missing or corrupt."""
    from PIL import Image

    suffix = f" (referenced by {where})" if where else ""
    if not is_file(path):
        raise SuzakError(f"image not found: {path}{suffix}; check image_path and the image folder "
                         "(--data / data.image_root)")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except Exception as e:  # PIL: UnidentifiedImageError, OSError, SyntaxError, DecompressionBombError ...
        raise SuzakError(f"image {path}{suffix} is corrupt or not an image ({e}); re-download or remove it") from None

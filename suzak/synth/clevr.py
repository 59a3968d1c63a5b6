"""CLEVR-CoGenT style counting scenes drawn with numpy + PIL (no Blender, no per-pixel Python loops).

Cubes, spheres and cylinders in two sizes, two materials (matte rubber, shiny metal) and CLEVR's eight
colours stand on a gray floor seen by a tilted pinhole camera: objects further back are smaller and
higher in the image, shaded by one key light, with soft shadows, drawn back to front. Every object keeps
at least half of its silhouette visible, so the count is always readable from the picture.
Sample i depends only on (seed, i, parameters), so any index can be regenerated on its own.

    python -m suzak.synth.clevr --seed 0 --index 3 --split B --out /tmp/clevr.png
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, ImageDraw

from suzak.errors import SuzakError
from suzak.synth.sample import SynthSample

# CLEVR's own RGB values (properties.json of the CLEVR generator).
COLORS: dict[str, tuple[int, int, int]] = {
    "gray": (87, 87, 87),
    "red": (173, 35, 35),
    "blue": (42, 75, 215),
    "green": (29, 105, 20),
    "brown": (129, 74, 25),
    "purple": (129, 38, 192),
    "cyan": (41, 208, 208),
    "yellow": (255, 238, 51),
}
SHAPES = ("cube", "sphere", "cylinder")
SIZES = {"large": 0.7, "small": 0.35}  # world radius, as in CLEVR
MATERIALS = ("rubber", "metal")
SPLITS = ("A", "B")
TOTAL_COUNT_QUESTION = "How many items are there in the image?"

_PALETTE_1 = ("gray", "blue", "brown", "yellow")
_PALETTE_2 = ("red", "green", "purple", "cyan")
COGENT_PALETTES: dict[str, dict[str, tuple[str, ...]]] = {
    "A": {"cube": _PALETTE_1, "cylinder": _PALETTE_2, "sphere": tuple(COLORS)},
    "B": {"cube": _PALETTE_2, "cylinder": _PALETTE_1, "sphere": tuple(COLORS)},
}

# Attribute filters for non-total questions; each names the attributes the question constrains.
FILTER_KINDS = (
    ("color", "shape"),
    ("size", "shape"),
    ("material",),
    ("color",),
    ("shape",),
    ("size",),
    ("material", "shape"),
    ("size", "color", "shape"),
)

# Depths are quantised so each (shape, size, material, depth, rotation) silhouette is rendered once per process.
DEPTHS = tuple(round(4.0 + 0.1 * k, 1) for k in range(61))
CUBE_ROTATIONS = 9  # rotation bins over the cube's 90 degree symmetry
_SS = 2  # supersampling factor for anti-aliased edges
_CUBE_HALF = 0.75  # cube half-side as a fraction of the size radius (CLEVR shrinks cubes similarly)
_CYL_HEIGHT = 1.9  # cylinder height as a multiple of its radius
_LIGHT = (np.array([-0.45, 0.8, -0.4]) / np.linalg.norm([-0.45, 0.8, -0.4])).astype(np.float32)
_SOFTBOX = np.array([-0.55, -0.83], dtype=np.float32)  # horizontal (x, z) direction of the metal-only softbox
_MIN_VISIBLE = 0.5
_MAX_SCENE_TRIES = 60
_MAX_OBJECT_TRIES = 80
_KIND_TAG = 0xC1E7  # keeps clevr and geo random streams apart for the same (seed, i)


@dataclass(frozen=True)
class Camera:
    """Tilted pinhole camera over the floor; all image-size dependent geometry lives here."""

    width: int
    height: int

    @property
    def focal(self) -> float:
        return 0.6 * self.width

    @property
    def _k(self) -> float:
        # Chosen so the nearest depth lands at 93% of the height and the furthest at 36%.
        return (0.93 - 0.36) * self.height / (1 / DEPTHS[0] - 1 / DEPTHS[-1])

    def ground_y(self, depth: float) -> float:
        return 0.36 * self.height - self._k / DEPTHS[-1] + self._k / depth

    def screen_x(self, x: float, depth: float) -> float:
        return self.width / 2 + self.focal * x / depth

    def world_x(self, sx: float, depth: float) -> float:
        return (sx - self.width / 2) * depth / self.focal

    def scale(self, depth: float) -> float:
        return self.focal / depth

    def pitch(self, depth: float) -> float:
        """Angle between the view ray and the floor: flatter for far objects, so their tops look thinner."""
        return math.atan((self._k / self.focal) / depth)


@dataclass
class SceneObject:
    shape: str
    size: str
    color: str
    material: str
    x: float  # world units, left/right
    depth: float  # distance from the camera along the floor
    rotation: int  # cube rotation bin (0 for other shapes)

    def describe(self) -> str:
        return f"a {self.size} {self.color} {self.material} {self.shape}"

    def footprint(self) -> float:
        radius = SIZES[self.size]
        return radius * _CUBE_HALF * math.sqrt(2) if self.shape == "cube" else radius


@dataclass(frozen=True)
class Patch:
    """A pre-shaded object image with premultiplied alpha; (ox, oy) is its top-left relative to the ground point."""

    alpha: np.ndarray
    diffuse: np.ndarray
    specular: np.ndarray
    ox: int
    oy: int


# ----------------------------------------------------------------------------------------------- shading
def _view_dir(pitch: float) -> np.ndarray:
    return np.array([0.0, math.sin(pitch), -math.cos(pitch)], dtype=np.float32)


def _shade(normals: np.ndarray, mask: np.ndarray, material: str, pitch: float, band: np.ndarray | float) -> tuple:
    """Per-pixel diffuse factor (multiplies the colour) and white specular, both zero outside mask.

    band is an extra glossy streak for flat metal faces (0 for curved shapes, which get highlights anyway).
    """
    view = _view_dir(pitch)
    lambert = np.clip(normals @ _LIGHT, 0.0, None)
    if material != "metal":
        half = (_LIGHT + view) / np.linalg.norm(_LIGHT + view)
        specular = 0.06 * np.clip(normals @ half, 0.0, None) ** 6
        return (0.38 + 0.72 * lambert) * mask, specular * mask
    # Metal is faked as a mirror of a studio: bright sky above, gray floor below, the key light as a sharp
    # spot and a tall softbox to the front-left that puts a streak on vertical sides and lights some cube faces.
    reflect = 2 * (normals @ view)[..., None] * normals - view
    sky = np.clip(reflect[..., 1], 0.0, 1.0)
    key = np.clip(reflect @ _LIGHT, 0.0, None) ** 40
    flat = reflect[..., [0, 2]] / (np.linalg.norm(reflect[..., [0, 2]], axis=-1, keepdims=True) + 1e-6)
    softbox = np.clip(flat @ _SOFTBOX, 0.0, None) ** 12 * (1.0 - sky)
    diffuse = 0.1 + 0.35 * lambert + 0.55 * sky + 0.5 * softbox + 0.3 * band
    specular = 0.9 * key + 0.35 * softbox + 0.45 * band
    return diffuse * mask, specular * mask


def _grid(x0: float, y0: float, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Supersampled pixel-centre coordinates (local screen px) of a w x h patch whose corner is (x0, y0)."""
    xs = x0 + (np.arange(w * _SS, dtype=np.float32) + 0.5) / _SS
    ys = y0 + (np.arange(h * _SS, dtype=np.float32) + 0.5) / _SS
    return np.meshgrid(xs, ys)


def _downsample(*arrays: np.ndarray) -> list[np.ndarray]:
    out = []
    for a in arrays:
        h, w = a.shape[0] // _SS, a.shape[1] // _SS
        small = a.reshape(h, _SS, w, _SS).mean(axis=(1, 3)).astype(np.float32)
        small.flags.writeable = False
        out.append(small)
    return out


def _cube_corners(half: float, rotation: int) -> np.ndarray:
    angle = (rotation / CUBE_ROTATIONS) * (math.pi / 2)
    c, s = math.cos(angle), math.sin(angle)
    pts = []
    for y in (0.0, 2 * half):
        for sx, sz in ((-1, -1), (1, -1), (1, 1), (-1, 1)):
            x, z = sx * half, sz * half
            pts.append((c * x - s * z, y, s * x + c * z))
    return np.array(pts)


def _project_local(points: np.ndarray, scale: float, pitch: float) -> np.ndarray:
    """World offsets from the ground point -> screen offsets (weak perspective at the object's depth)."""
    px = points[:, 0] * scale
    py = -(points[:, 1] * math.cos(pitch) + points[:, 2] * math.sin(pitch)) * scale
    return np.stack([px, py], axis=1)


def _extent(shape: str, radius_px: float, pitch: float, rotation: int) -> tuple[float, float, float, float]:
    """Silhouette bounds (left, top, right, bottom) in screen px relative to the ground contact point."""
    cos_p, sin_p = math.cos(pitch), math.sin(pitch)
    if shape == "sphere":
        return -radius_px, -radius_px * cos_p - radius_px, radius_px, -radius_px * cos_p + radius_px
    if shape == "cylinder":
        top = -_CYL_HEIGHT * radius_px * cos_p
        return -radius_px, top - radius_px * sin_p, radius_px, radius_px * sin_p
    pts = _project_local(_cube_corners(_CUBE_HALF, rotation), radius_px, pitch)
    return pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()


def _sphere_normals(x, y, radius_px, pitch):
    cy = -radius_px * math.cos(pitch)
    u, v = x / radius_px, (y - cy) / radius_px
    rr = u * u + v * v
    mask = rr <= 1.0
    nz = np.sqrt(np.clip(1.0 - rr, 0.0, None))
    up = np.array([0.0, math.cos(pitch), math.sin(pitch)], dtype=np.float32)
    right = np.array([1.0, 0.0, 0.0], dtype=np.float32)
    normals = u[..., None] * right - v[..., None] * up + nz[..., None] * _view_dir(pitch)
    return normals, mask


def _cylinder_normals(x, y, radius_px, pitch):
    ry = radius_px * math.sin(pitch)
    top_y = -_CYL_HEIGHT * radius_px * math.cos(pitch)
    u = np.clip(x / radius_px, -1.0, 1.0)
    in_width = np.abs(x) <= radius_px
    front_curve = ry * np.sqrt(1.0 - u * u)
    top = ((x / radius_px) ** 2 + ((y - top_y) / max(ry, 1e-6)) ** 2) <= 1.0
    body = in_width & (y >= top_y) & (y <= front_curve)
    side = np.stack([u, np.zeros_like(u), -np.sqrt(1.0 - u * u)], axis=-1)
    normals = np.where(top[..., None], np.array([0.0, 1.0, 0.0], dtype=np.float32), side)
    return normals, top | body


def _cube_normals(x0, y0, w, h, radius_px, pitch, rotation):
    """Face ids are painted with PIL polygons; each visible face then gets its world normal."""
    corners = _cube_corners(_CUBE_HALF, rotation)
    screen = (_project_local(corners, radius_px, pitch) - (x0, y0)) * _SS
    faces = [((4, 5, 6, 7), np.array([0.0, 1.0, 0.0]))]  # top is always visible from above
    for a, b in ((0, 1), (1, 2), (2, 3), (3, 0)):
        mid = (corners[a] + corners[b]) / 2
        normal = np.array([mid[0], 0.0, mid[2]]) / math.hypot(mid[0], mid[2])
        if normal[2] < 0:  # facing the camera
            faces.append(((a, b, b + 4, a + 4), normal))
    ids = Image.new("L", (w * _SS, h * _SS), 0)
    draw = ImageDraw.Draw(ids)
    for k, (idx, _) in enumerate(faces, start=1):
        draw.polygon([tuple(screen[i]) for i in idx], fill=k)
    id_arr = np.asarray(ids)
    lut = np.zeros((len(faces) + 1, 3), dtype=np.float32)
    for k, (_, normal) in enumerate(faces, start=1):
        lut[k] = normal
    return lut[id_arr], id_arr > 0


@lru_cache(maxsize=8192)
def _frame(shape: str, size: str, depth: float, rotation: int, cam: Camera) -> tuple[int, int, int, int]:
    """Pixel frame (x0, y0, w, h) of an object's patch relative to its ground point; cheap, used for layout."""
    left, top, right, bottom = _extent(shape, SIZES[size] * cam.scale(depth), cam.pitch(depth), rotation)
    x0, y0 = math.floor(left) - 1, math.floor(top) - 1
    return x0, y0, math.ceil(right) + 1 - x0, math.ceil(bottom) + 1 - y0


# Large enough to hold every (shape, size, material, depth, rotation) at one image size (~2.7k patches).
@lru_cache(maxsize=3072)
def _patch(shape: str, size: str, material: str, depth: float, rotation: int, cam: Camera) -> Patch:
    radius_px = SIZES[size] * cam.scale(depth)
    pitch = cam.pitch(depth)
    x0, y0, w, h = _frame(shape, size, depth, rotation, cam)
    x, y = _grid(x0, y0, w, h)
    if shape == "sphere":
        normals, mask = _sphere_normals(x, y, radius_px, pitch)
    elif shape == "cylinder":
        normals, mask = _cylinder_normals(x, y, radius_px, pitch)
    else:
        normals, mask = _cube_normals(x0, y0, w, h, radius_px, pitch, rotation)
    band = 0.0
    if shape == "cube":  # a diagonal reflection streak is what makes a flat face read as polished
        band = np.exp(-((((x - x0) / w) + 0.7 * ((y - y0) / h) - 0.75) / 0.12) ** 2)
    diffuse, specular = _shade(normals, mask, material, pitch, band)
    alpha, diffuse, specular = _downsample(mask.astype(np.float32), diffuse, specular)
    return Patch(alpha, diffuse, specular, x0, y0)


@lru_cache(maxsize=512)
def _shadow(shape: str, size: str, depth: float, cam: Camera) -> Patch:
    """Soft elliptical shadow cast away from the light, as premultiplied darkening alpha."""
    radius = SIZES[size]
    scale, pitch = cam.scale(depth), cam.pitch(depth)
    height = {"sphere": radius, "cube": _CUBE_HALF * radius, "cylinder": 0.5 * _CYL_HEIGHT * radius}[shape]
    shift = -np.array([_LIGHT[0], _LIGHT[2]]) / _LIGHT[1] * height
    cx, cy = shift[0] * scale, -shift[1] * scale * math.sin(pitch)
    rx = 1.3 * radius * scale
    ry = max(rx * math.sin(pitch), 1.0)
    x0, y0 = math.floor(cx - rx) - 1, math.floor(cy - ry) - 1
    w, h = math.ceil(2 * rx) + 3, math.ceil(2 * ry) + 3
    xs = x0 + np.arange(w) + 0.5
    ys = y0 + np.arange(h) + 0.5
    q = ((xs[None, :] - cx) / rx) ** 2 + ((ys[:, None] - cy) / ry) ** 2
    alpha = (0.5 * np.clip(1.0 - q, 0.0, 1.0) ** 1.5).astype(np.float32)
    alpha.flags.writeable = False
    return Patch(alpha, alpha, alpha, x0, y0)  # only alpha is read for shadows


@lru_cache(maxsize=8)
def _floor(cam: Camera) -> np.ndarray:
    """Gray floor, lighter towards the camera and the middle, like CLEVR's area lights."""
    ys = np.linspace(0.0, 1.0, cam.height, dtype=np.float32)[:, None]
    xs = np.linspace(-1.0, 1.0, cam.width, dtype=np.float32)[None, :]
    level = 128.0 * (0.86 + 0.2 * ys) * (1.0 - 0.1 * xs * xs)
    floor = np.repeat(level[..., None], 3, axis=2).astype(np.float32)
    floor.flags.writeable = False
    return floor


# ------------------------------------------------------------------------------------------------ layout
def _placement(obj: SceneObject, cam: Camera) -> tuple[int, int]:
    return round(cam.screen_x(obj.x, obj.depth)), round(cam.ground_y(obj.depth))


def _bbox(obj: SceneObject, cam: Camera) -> tuple[int, int, int, int]:
    x0, y0, w, h = _frame(obj.shape, obj.size, obj.depth, obj.rotation, cam)
    gx, gy = _placement(obj, cam)
    return gx + x0, gy + y0, gx + x0 + w, gy + y0 + h


def _overlap(a: tuple, b: tuple) -> int:
    return max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))


def _sample_attributes(rng: np.random.Generator, split: str) -> tuple[str, str, str, str]:
    shape = SHAPES[rng.integers(len(SHAPES))]
    palette = COGENT_PALETTES[split][shape]
    color = palette[rng.integers(len(palette))]
    size = ("large", "small")[rng.integers(2)]
    material = MATERIALS[rng.integers(2)]
    return shape, size, color, material


def _fits(obj: SceneObject, placed: list[SceneObject], cam: Camera) -> bool:
    box = _bbox(obj, cam)
    if box[0] < 1 or box[1] < 1 or box[2] > cam.width - 1 or box[3] > cam.height - 1:
        return False
    for other in placed:
        if math.hypot(obj.x - other.x, obj.depth - other.depth) < obj.footprint() + other.footprint() + 0.15:
            return False
        other_box = _bbox(other, cam)
        far_box = box if obj.depth > other.depth else other_box
        if _overlap(box, other_box) > 0.3 * (far_box[2] - far_box[0]) * (far_box[3] - far_box[1]):
            return False
    return True


def _try_layout(rng: np.random.Generator, count: int, split: str, cam: Camera) -> list[SceneObject] | None:
    placed: list[SceneObject] = []
    for _ in range(count):
        shape, size, color, material = _sample_attributes(rng, split)
        rotation = int(rng.integers(CUBE_ROTATIONS)) if shape == "cube" else 0
        for _ in range(_MAX_OBJECT_TRIES):
            depth = DEPTHS[rng.integers(len(DEPTHS))]
            sx = rng.uniform(0.06, 0.94) * cam.width
            obj = SceneObject(shape, size, color, material, cam.world_x(sx, depth), depth, rotation)
            if _fits(obj, placed, cam):
                placed.append(obj)
                break
        else:
            return None
    return placed


def _back_to_front(objects: list[SceneObject]) -> list[int]:
    return sorted(range(len(objects)), key=lambda k: -objects[k].depth)


def _visible_fractions(objects: list[SceneObject], cam: Camera) -> list[float]:
    """Share of each object's silhouette left uncovered once nearer objects are drawn over it."""
    labels = np.zeros((cam.height, cam.width), dtype=np.uint8)
    solids, boxes = {}, {}
    for k in _back_to_front(objects):
        obj = objects[k]
        patch = _patch(obj.shape, obj.size, obj.material, obj.depth, obj.rotation, cam)
        x0, y0, x1, y1 = boxes[k] = _bbox(obj, cam)
        solids[k] = patch.alpha > 0.5
        labels[y0:y1, x0:x1][solids[k]] = k + 1
    fractions = []
    for k in range(len(objects)):
        x0, y0, x1, y1 = boxes[k]
        seen = np.count_nonzero(labels[y0:y1, x0:x1][solids[k]] == k + 1)
        fractions.append(seen / max(int(np.count_nonzero(solids[k])), 1))
    return fractions


def sample_layout(rng: np.random.Generator, count: int, split: str, cam: Camera) -> tuple[list, list[float]]:
    """count non-intersecting objects inside the image, each at least half visible; retries whole scenes."""
    for _ in range(_MAX_SCENE_TRIES):
        objects = _try_layout(rng, count, split, cam)
        if objects is None:
            continue
        visible = _visible_fractions(objects, cam)
        if min(visible) >= _MIN_VISIBLE:
            return objects, visible
    raise SuzakError(
        f"could not place {count} separate objects in a {cam.width}x{cam.height} CLEVR image; "
        "lower max_objects or use a larger image_size"
    )


# ----------------------------------------------------------------------------------------------- drawing
def _composite(canvas: np.ndarray, patch: Patch, gx: int, gy: int, rgb: np.ndarray | None) -> None:
    """Premultiplied-alpha 'over' of one patch onto the canvas; rgb None means darken (a shadow)."""
    h, w = patch.alpha.shape
    x0, y0 = gx + patch.ox, gy + patch.oy
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + w, canvas.shape[1]), min(y0 + h, canvas.shape[0])
    if cx1 <= cx0 or cy1 <= cy0:
        return
    sl = (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))
    region = canvas[cy0:cy1, cx0:cx1]
    keep = 1.0 - patch.alpha[sl][..., None]
    if rgb is None:
        region *= keep
    else:
        region *= keep
        region += rgb[sl]


def render_scene(objects: list[SceneObject], cam: Camera, brightness: float = 1.0) -> Image.Image:
    """Floor, then every shadow, then objects back to front so nearer ones occlude further ones."""
    canvas = _floor(cam) * np.float32(brightness)
    for obj in objects:
        _composite(canvas, _shadow(obj.shape, obj.size, obj.depth, cam), *_placement(obj, cam), None)
    for k in _back_to_front(objects):
        obj = objects[k]
        patch = _patch(obj.shape, obj.size, obj.material, obj.depth, obj.rotation, cam)
        color = np.array(COLORS[obj.color], dtype=np.float32)
        rgb = patch.diffuse[..., None] * color + patch.specular[..., None] * np.float32(255.0)
        _composite(canvas, patch, *_placement(obj, cam), rgb)
    np.clip(canvas, 0.0, 255.0, out=canvas)
    return Image.fromarray(canvas.astype(np.uint8), "RGB")


# --------------------------------------------------------------------------------------------- questions
def phrase(filters: dict[str, str], plural: bool = True) -> str:
    """'large red metal cubes' style noun phrase for a filter dict (missing attributes are skipped)."""
    words = [filters[a] for a in ("size", "color", "material") if a in filters]
    noun = filters.get("shape", "object")
    words.append(noun + "s" if plural else noun)
    return " ".join(words)


def attribute_question(filters: dict[str, str]) -> str:
    return f"How many {phrase(filters)} are there?"


def matches(obj: SceneObject, filters: dict[str, str]) -> bool:
    return all(getattr(obj, attr) == value for attr, value in filters.items())


def _choose_filters(rng: np.random.Generator, objects: list[SceneObject], split: str) -> dict[str, str]:
    kind = FILTER_KINDS[rng.integers(len(FILTER_KINDS))]
    if rng.random() < 0.8:  # ask about something present so most answers are >= 1
        target = objects[rng.integers(len(objects))]
        return {attr: getattr(target, attr) for attr in kind}
    shape, size, color, material = _sample_attributes(rng, split)  # keeps colour/shape pairs legal in the split
    values = {"shape": shape, "size": size, "color": color, "material": material}
    return {attr: values[attr] for attr in kind}


def _listing(items: list[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + ", and " + items[-1]


def thinking_text(objects: list[SceneObject], cam: Camera, filters: dict[str, str] | None) -> str:
    ordered = sorted(objects, key=lambda o: cam.screen_x(o.x, o.depth))
    seen = f"Going from left to right, I see {_listing([o.describe() for o in ordered])}."
    if filters is None:
        n = len(objects)
        return f"<think> {seen} That makes {n} item{'s' if n != 1 else ''}. </think>"
    hits = [o.describe() for o in ordered if matches(o, filters)]
    if not hits:
        return f"<think> {seen} None of them are {phrase(filters)}. That makes 0 {phrase(filters)}. </think>"
    noun = phrase(filters, plural=len(hits) != 1)
    return f"<think> {seen} The {phrase(filters)} among them: {_listing(hits)}. That makes {len(hits)} {noun}. </think>"


# ----------------------------------------------------------------------------------------------- samples
def _check_params(i, seed, split, min_objects, max_objects, image_size, total_count_fraction) -> None:
    if split not in SPLITS:
        raise SuzakError(f"CLEVR split must be 'A' or 'B' (CoGenT condition), got {split!r}")
    if not (isinstance(seed, int) and seed >= 0 and isinstance(i, int) and i >= 0):
        raise SuzakError(f"CLEVR seed and index must be non-negative integers, got seed={seed!r} index={i!r}")
    if not (1 <= min_objects <= max_objects <= 16):
        raise SuzakError(f"need 1 <= min_objects <= max_objects <= 16, got min={min_objects} max={max_objects}")
    w, h = image_size
    if w < 28 or h < 28:
        raise SuzakError(f"CLEVR image_size must be at least 28x28 pixels, got {tuple(image_size)}")
    if not 0.0 <= total_count_fraction <= 1.0:
        raise SuzakError(f"total_count_fraction must be in [0, 1], got {total_count_fraction}")


def clevr_sample(
    i: int,
    seed: int,
    split: str = "A",
    *,
    min_objects: int = 3,
    max_objects: int = 10,
    image_size: tuple[int, int] = (480, 320),
    total_count_fraction: float = 1.0,
) -> SynthSample:
    """Sample number i of the stream (seed, split, params); cheap to call for any i in any order."""
    _check_params(i, seed, split, min_objects, max_objects, image_size, total_count_fraction)
    cam = Camera(int(image_size[0]), int(image_size[1]))
    rng = np.random.default_rng([_KIND_TAG, SPLITS.index(split), seed, i])
    count = int(rng.integers(min_objects, max_objects + 1))
    objects, visible = sample_layout(rng, count, split, cam)
    filters = None if rng.random() < total_count_fraction else _choose_filters(rng, objects, split)
    image = render_scene(objects, cam, brightness=float(rng.uniform(0.92, 1.08)))
    answer = len(objects) if filters is None else sum(matches(o, filters) for o in objects)
    meta = {
        "kind": "clevr",
        "index": i,
        "seed": seed,
        "split": split,
        "image_size": [cam.width, cam.height],
        "question_type": "total" if filters is None else "attribute",
        "filters": filters or {},
        "count": answer,
        "objects": [
            {**vars(o), "bbox": list(_bbox(o, cam)), "visible_fraction": round(v, 3)}
            for o, v in zip(objects, visible)
        ],
    }
    return SynthSample(
        image=image,
        problem=TOTAL_COUNT_QUESTION if filters is None else attribute_question(filters),
        answer=str(answer),
        thinking=thinking_text(objects, cam, filters),
        meta=meta,
    )


def clevr_samples(n: int, seed: int, split: str = "A", start: int = 0, **kw) -> Iterator[SynthSample]:
    """Samples start .. start+n-1 of the stream; keyword arguments as for clevr_sample."""
    if n < 0:
        raise SuzakError(f"number of CLEVR samples must be >= 0, got {n}")
    for i in range(start, start + n):
        yield clevr_sample(i, seed, split, **kw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Render one synthetic CLEVR-CoGenT sample.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--split", default="A", choices=SPLITS)
    parser.add_argument("--total-count-fraction", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=Path("clevr_sample.png"))
    args = parser.parse_args(argv)
    sample = clevr_sample(args.index, args.seed, args.split, total_count_fraction=args.total_count_fraction)
    sample.image.save(args.out)
    print(f"{args.out}: {sample.problem} -> {sample.answer}\n{sample.thinking}")


if __name__ == "__main__":
    main()

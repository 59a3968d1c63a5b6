"""Write synthetic datasets to disk in the formats suzak (and R1-V) read, optionally in parallel.

Formats:
  hf          datasets DatasetDict {"train": ...} saved with save_to_disk; columns image / problem / solution
              ("<answer> 3 </answer>") / thinking ("<think> ... </think>"), i.e. R1-V's GRPO columns plus the SFT one.
  superclevr  out/superclevr_test200_counting_problems.jsonl + out/images/superCLEVR_new_025000.png ...
              ({"image_path", "question", "ground_truth": int}), exactly the SuperCLEVR benchmark layout.
  geoqa       out/geoqa_test_prompts.jsonl + out/Geo170K/images/test/0.png ... (ground_truth a string like "140°").

    suzak data synth clevr --n 1000 --split A --out data/clevr_a --preview data/clevr_a.png --workers 2
    python -c "from suzak.synth.writers import write_dataset; write_dataset('geo', 100, 0, Path('g'), 'geoqa')"
"""

from __future__ import annotations

import io
import json
import multiprocessing as mp
import tempfile
import textwrap
from pathlib import Path
from typing import Any, Iterator

from PIL import Image, ImageDraw, ImageFont

from suzak.errors import SuzakError
from suzak.synth import SynthSample, clevr_sample, geo_sample

KINDS = ("clevr", "geo")
FORMATS = ("hf", "superclevr", "geoqa")
SUPERCLEVR_FILE = "superclevr_test200_counting_problems.jsonl"
SUPERCLEVR_FIRST_INDEX = 25000  # the benchmark's images are superCLEVR_new_025000 .. 025199
GEOQA_FILE = "geoqa_test_prompts.jsonl"
GEOQA_IMAGE_DIR = "Geo170K/images/test"
PNG_COMPRESS_LEVEL = 3  # zlib level 3 is ~3x faster than PIL's default 6 for a few % larger files

# Set in each worker (or the main process) by _init_spec so jobs only carry an index.
_SPEC: dict[str, Any] = {}


# ----------------------------------------------------------------------------------------------- per item
def _init_spec(spec: dict[str, Any]) -> None:
    _SPEC.clear()
    _SPEC.update(spec)


def make_sample(kind: str, i: int, seed: int, split: str, gen_kw: dict) -> SynthSample:
    if kind == "clevr":
        return clevr_sample(i, seed, split, **gen_kw)
    return geo_sample(i, seed, **gen_kw)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _image_relpath(fmt: str, i: int) -> str:
    if fmt == "superclevr":
        return f"images/superCLEVR_new_{SUPERCLEVR_FIRST_INDEX + i:06d}.png"
    return f"{GEOQA_IMAGE_DIR}/{i}.png"


def _build_row(i: int) -> dict[str, Any]:
    """One output row; for the jsonl formats the image file is written here, inside the worker."""
    spec = _SPEC
    sample = make_sample(spec["kind"], i, spec["seed"], spec["split"], spec["gen_kw"])
    fmt = spec["fmt"]
    if fmt == "hf":
        return {
            "image": {"bytes": _png_bytes(sample.image), "path": None},
            "problem": sample.problem,
            "solution": sample.solution,
            "thinking": sample.thinking,
        }
    rel = _image_relpath(fmt, i)
    sample.image.save(Path(spec["out"]) / rel, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    truth: int | str = int(sample.answer) if fmt == "superclevr" else sample.answer
    return {"image_path": f"./{rel}", "question": sample.problem, "ground_truth": truth}


def iter_rows(spec: dict[str, Any], n: int, workers: int, desc: str = "synth") -> Iterator[dict[str, Any]]:
    """Rows 0..n-1 in order, built in a process pool when workers > 0, with a progress bar."""
    from suzak.log import Progress, get_logger

    bar = Progress(desc, n, unit="img", logger=get_logger("synth"))
    try:
        if workers > 0:
            # spawn, not fork: the caller may hold threads (tqdm, datasets, torch) that fork would copy mid-state.
            ctx = mp.get_context("spawn")
            chunk = max(1, min(64, n // (workers * 8)))
            with ctx.Pool(workers, initializer=_init_spec, initargs=(spec,)) as pool:
                for i, row in enumerate(pool.imap(_build_row, range(n), chunksize=chunk)):
                    bar.update(i + 1)
                    yield row
        else:
            _init_spec(spec)
            for i in range(n):
                row = _build_row(i)
                bar.update(i + 1)
                yield row
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------ formats
def _hf_generator(spec: dict[str, Any], n: int, workers: int) -> Iterator[dict[str, Any]]:
    yield from iter_rows(spec, n, workers, desc=f"synth {spec['kind']} (hf)")


def _write_hf(spec: dict[str, Any], n: int, workers: int, out: Path) -> None:
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "problem": datasets.Value("string"),
            "solution": datasets.Value("string"),
            "thinking": datasets.Value("string"),
        }
    )
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # our own bar counts images; datasets' would only repeat it
    try:
        # A private cache dir: rows stream to disk instead of memory, and no stale cache can be reused.
        with tempfile.TemporaryDirectory(prefix=".synth-cache-", dir=out.parent) as cache:
            ds = datasets.Dataset.from_generator(
                _hf_generator,
                features=features,
                gen_kwargs={"spec": spec, "n": n, "workers": workers},
                cache_dir=cache,
            )
            datasets.DatasetDict({"train": ds}).save_to_disk(str(out))
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()


def _write_jsonl(spec: dict[str, Any], n: int, workers: int, out: Path, fmt: str) -> None:
    (out / Path(_image_relpath(fmt, 0)).parent).mkdir(parents=True, exist_ok=True)
    name = SUPERCLEVR_FILE if fmt == "superclevr" else GEOQA_FILE
    tmp = out / (name + ".partial")
    with tmp.open("w") as fh:
        for row in iter_rows(spec, n, workers, desc=f"synth {spec['kind']} ({fmt})"):
            fh.write(json.dumps(row) + "\n")
    tmp.replace(out / name)  # only a finished run leaves a jsonl that loaders will pick up


# ------------------------------------------------------------------------------------------------ preview
def _wrap(text: str, width: int) -> list[str]:
    lines: list[str] = []
    for para in text.split("\n"):
        lines += textwrap.wrap(para, width) or [""]
    return lines


def _preview_font(size: int) -> ImageFont.ImageFont:
    """DejaVu has the geometry symbols (∥ ⊥ △) that PIL's bundled font lacks; fall back to it if absent."""
    try:
        return ImageFont.truetype("DejaVuSans.ttf", size)
    except OSError:
        return ImageFont.load_default(size=size)


def write_preview(kind: str, seed: int, split: str, gen_kw: dict, path: Path, count: int = 16, cols: int = 4) -> Path:
    """A grid of the first `count` samples with each question and answer printed under its image."""
    samples = [make_sample(kind, i, seed, split, gen_kw) for i in range(count)]
    thumb_w = 240
    thumb_h = max(1, round(thumb_w * samples[0].image.height / samples[0].image.width))
    font = _preview_font(11)
    texts = [_wrap(s.problem, 38)[:10] + [f"answer: {s.answer}"] for s in samples]
    text_h = 14 * max(len(t) for t in texts) + 8
    rows = (count + cols - 1) // cols
    grid = Image.new("RGB", (cols * thumb_w, rows * (thumb_h + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for k, (sample, lines) in enumerate(zip(samples, texts)):
        x, y = (k % cols) * thumb_w, (k // cols) * (thumb_h + text_h)
        grid.paste(sample.image.convert("RGB").resize((thumb_w, thumb_h), Image.Resampling.BILINEAR), (x, y))
        for j, line in enumerate(lines):
            fill = (180, 0, 0) if j == len(lines) - 1 else "black"
            draw.text((x + 4, y + thumb_h + 4 + 14 * j), line, fill=fill, font=font)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


# ------------------------------------------------------------------------------------------------ entry
def _check_args(kind: str, n: int, out: Path, fmt: str, workers: int) -> None:
    if kind not in KINDS:
        raise SuzakError(f"synthetic data kind must be one of {KINDS}, got {kind!r}")
    if fmt not in FORMATS:
        raise SuzakError(f"dataset format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "superclevr" and kind != "clevr":
        raise SuzakError("format 'superclevr' holds integer counts; use it with kind 'clevr' (geo: 'geoqa' or 'hf')")
    if fmt == "geoqa" and kind != "geo":
        raise SuzakError(
            "format 'geoqa' is for geometry problems; use it with kind 'geo' (clevr: 'superclevr' or 'hf')"
        )
    if not isinstance(n, int) or n < 1:
        raise SuzakError(f"number of samples (--n) must be a positive integer, got {n!r}")
    if not isinstance(workers, int) or workers < 0:
        raise SuzakError(f"workers must be an integer >= 0, got {workers!r}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SuzakError(f"output {out} already exists and is not an empty folder; delete it or pick another --out")


def write_dataset(
    kind: str,
    n: int,
    seed: int,
    out: Path,
    fmt: str,
    split: str = "A",
    preview: Path | None = None,
    workers: int = 0,
    **gen_kw,
) -> Path:
    """Generate samples 0..n-1 of (kind, seed, split, gen_kw) into `out` in format `fmt`; returns `out`.

    gen_kw goes to clevr_sample / geo_sample (e.g. image_size, max_objects, total_count_fraction, templates);
    split only applies to CLEVR. The result is identical for any number of workers.
    """
    out = Path(out)
    _check_args(kind, n, out, fmt, workers)
    # Generate item 0 up front so bad generator arguments fail before any pool or folder is created.
    try:
        make_sample(kind, 0, seed, split, gen_kw)
    except TypeError as e:
        raise SuzakError(f"bad generator option for {kind}: {e}") from None
    out.parent.mkdir(parents=True, exist_ok=True)
    spec = {"kind": kind, "seed": seed, "split": split, "gen_kw": dict(gen_kw), "fmt": fmt, "out": str(out)}
    if fmt == "hf":
        _write_hf(spec, n, workers, out)
    else:
        out.mkdir(parents=True, exist_ok=True)
        _write_jsonl(spec, n, workers, out, fmt)
    if preview is not None:
        write_preview(kind, seed, split, gen_kw, Path(preview), count=min(16, n))
    return out

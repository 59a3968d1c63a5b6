"""Data sources: hub datasets, save_to_disk folders, R1-V benchmark JSONL + images, and the synthetic generators.

    from suzak.tasks.sources import load_examples
    examples = load_examples(get_task("clevr_count"), "leonardPKU/clevr_cogen_a_train")   # hub id
    examples = load_examples(task, "data/clevr_a")                                        # save_to_disk folder
    examples = load_examples(task, "data/superclevr/superclevr_test200_counting_problems.jsonl")
    examples = load_examples(task, "synth", synth=SynthConfig(n=100, split="B"))

Every bad input is a SuzakError naming the file, line or column and the fix.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from suzak.errors import SuzakError
from suzak.images import is_file
from suzak.tasks import Example, Task, answer_from_solution

HF_COLUMNS = ("image", "problem", "solution")
JSONL_COLUMNS = ("image_path", "question", "ground_truth")
BENCHMARK_FILES = {
    "superclevr": "superclevr_test200_counting_problems.jsonl",
    "geoqa": "geoqa_test_prompts.jsonl",
}


def load_examples(task: Task, source: str, *, split: str = "train", image_root: str | None = None,
                  limit: int | None = None, synth=None, check_images: bool = True) -> list[Example]:
    """Load a task's examples from any supported source (see the module docstring)."""
    if source == "synth":
        examples = synth_examples(task, synth)
    else:
        path = Path(source).expanduser()
        if path.suffix == ".jsonl" or (path.is_dir() and _find_jsonl(path, task) is not None):
            examples = jsonl_examples(task, path if path.suffix == ".jsonl" else _find_jsonl(path, task),
                                      image_root=image_root, limit=limit, check_images=check_images)
        elif path.is_dir():
            examples = hf_examples(task, _load_from_disk(path, split), str(path), limit)
        elif path.exists() or source.startswith((".", "/", "~")):
            raise SuzakError(f"data source {source} is neither a .jsonl file nor a dataset folder")
        else:
            examples = hf_examples(task, _load_hub(source, split), source, limit)
    if limit is not None:
        examples = examples[:limit]
    if not examples:
        raise SuzakError(f"data source {source} holds no examples; check the path/split ('{split}')")
    return examples


# --------------------------------------------------------------------------- JSONL (R1-V benchmark format)


def _find_jsonl(folder: Path, task: Task) -> Path | None:
    preferred = folder / BENCHMARK_FILES.get(task.benchmark, "")
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*.jsonl"))
    return found[0] if len(found) == 1 else None


def _ground_truth(task: Task, value: Any, where: str) -> tuple[Any, str]:
    if task.answer_type == "number":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, str) and value.strip().lstrip("-").isdigit():
                return int(value), value.strip()
            raise SuzakError(f"{where}: ground_truth must be an integer count for {task.name}, got {value!r}")
        return value, str(value)
    if not isinstance(value, (str, int, float)) or isinstance(value, bool) or str(value).strip() == "":
        raise SuzakError(f"{where}: ground_truth must be a non-empty string (e.g. \"140°\") for {task.name}, "
                         f"got {value!r}")
    return str(value), str(value).strip()


def read_jsonl_rows(path: Path):
    """(line number, object) for every non-blank line; a bad line is a SuzakError naming file and line."""
    try:
        fh = Path(path).open("rb")
    except OSError as e:
        raise SuzakError(f"cannot read {path}: {e.strerror or e}") from None
    with fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise SuzakError(f"{path}:{lineno}: not UTF-8 text (byte {raw[e.start:e.start + 1]!r} at column "
                                 f"{e.start + 1}); save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SuzakError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise SuzakError(f"{path}:{lineno}: each line must be a JSON object")
            yield lineno, row


def jsonl_examples(task: Task, path: Path, *, image_root: str | None = None, limit: int | None = None,
                   check_images: bool = True) -> list[Example]:
    """Read `{"image_path", "question", "ground_truth"}` lines; image paths resolve against image_root or the file's
    folder."""
    if not path.is_file():
        raise SuzakError(f"benchmark file {path} not found")
    root = Path(image_root) if image_root else path.parent
    examples = []
    for lineno, row in read_jsonl_rows(path):
        where = f"{path}:{lineno}"
        missing = [c for c in JSONL_COLUMNS if c not in row]
        if missing:
            raise SuzakError(f"{where}: missing field(s) {missing}; each line needs {list(JSONL_COLUMNS)}")
        gt, answer = _ground_truth(task, row["ground_truth"], where)
        if not isinstance(row["image_path"], str) or not row["image_path"].strip():
            raise SuzakError(f"{where}: image_path must be a file path (a string), got {row['image_path']!r}")
        if not isinstance(row["question"], str):
            raise SuzakError(f"{where}: question must be a string, got {row['question']!r}")
        try:
            image_path = (root / row["image_path"]).resolve()
        except (RuntimeError, OSError) as e:  # a symlink loop (RuntimeError before Python 3.13)
            raise SuzakError(f"{where}: image {row['image_path']} cannot be resolved ({e}); fix the link") from None
        if check_images and not is_file(image_path):
            raise SuzakError(f"{where}: image {row['image_path']} not found under {root} "
                             f"(looked at {image_path}); unzip the images next to the jsonl or pass data.image_root")
        examples.append(Example(id=str(row.get("id", lineno - 1)), problem=row["question"], answer=answer,
                                image_path=str(image_path), ground_truth=gt,
                                meta={"source_line": lineno, "image_path_raw": row["image_path"]}))
        if limit is not None and len(examples) >= limit:
            break
    return examples


# --------------------------------------------------------------------------- Hugging Face datasets


def _load_from_disk(path: Path, split: str):
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise SuzakError(f"{path} is not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SuzakError(f"{path} has splits {list(ds)}; set data.split to one of them (got '{split}')")
        ds = ds[split]
    return ds


def _load_hub(repo_id: str, split: str):
    import datasets

    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false") or \
        os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("0", "", "false")
    try:
        return datasets.load_dataset(repo_id, split=split)
    except Exception as e:  # datasets raises many types for offline / missing repos
        hint = ("HF_HUB_OFFLINE is set and the dataset is not in the local cache. " if offline else "")
        raise SuzakError(
            f"could not load hub dataset '{repo_id}' (split '{split}'): {type(e).__name__}: {str(e)[:200]}. {hint}"
            f"Download it first (`huggingface-cli download {repo_id} --repo-type=dataset --local-dir ./data/...`) "
            f"and point data.source at the folder, or use data.source=synth") from None


def hf_examples(task: Task, ds, name: str, limit: int | None) -> list[Example]:
    """Rows with R1-V's columns image / problem / solution (+ thinking for SFT data)."""
    columns = list(ds.column_names)
    missing = [c for c in HF_COLUMNS if c not in columns]
    if missing:
        raise SuzakError(f"dataset {name} lacks column(s) {missing}; it has {columns}. "
                         f"suzak reads R1-V's format: image / problem / solution (\"<answer> 3 </answer>\")")
    n = len(ds) if limit is None else min(limit, len(ds))
    examples = []
    for i in range(n):
        row = ds[i]
        answer = answer_from_solution(row["solution"])
        if answer == "":
            raise SuzakError(f"dataset {name} row {i}: empty solution {row['solution']!r}")
        if row["image"] is None:
            raise SuzakError(f"dataset {name} row {i}: image is missing")
        examples.append(Example(id=f"{i}", problem=row["problem"], answer=answer, image=row["image"],
                                thinking=row.get("thinking"), ground_truth=answer, meta={"row": i}))
    return examples


# --------------------------------------------------------------------------- synthetic


def synth_examples(task: Task, synth=None) -> list[Example]:
    """Generate examples in memory with the task's synthetic generator (CLEVR scenes or geometry diagrams)."""
    from suzak.config import SynthConfig
    from suzak import synth as generators

    cfg = synth or SynthConfig()
    if task.synth_kind == "clevr":
        samples = generators.clevr_samples(cfg.n, cfg.seed, split=cfg.split, min_objects=cfg.min_objects,
                                           max_objects=cfg.max_objects, image_size=(cfg.image_width, cfg.image_height),
                                           total_count_fraction=cfg.total_count_fraction)
    else:
        samples = generators.geo_samples(cfg.n, cfg.seed, image_size=(cfg.image_width, cfg.image_height))
    examples = []
    for i, s in enumerate(samples):
        gt = int(s.answer) if task.answer_type == "number" else s.answer
        thinking = s.thinking
        if cfg.thinking == "enumerate" and task.answer_type == "number":
            thinking = enumerate_thinking(int(s.answer))
        examples.append(Example(id=f"synth-{cfg.seed}-{i}", problem=s.problem, answer=s.answer, image=s.image,
                                thinking=thinking, ground_truth=gt, meta=dict(s.meta)))
    return examples


def enumerate_thinking(count: int) -> str:
    """'<think> 1 2 3 </think>': counting aloud, one object per step (an empty count says so)."""
    steps = " ".join(str(k) for k in range(1, count + 1)) or "none"
    return f"<think> {steps} </think>"

"""Benchmark registry: which task, file, completion budget and published scores each `suzak eval` benchmark has.

    from evaluator.benchmarks import get_benchmark, load_benchmark
    examples = load_benchmark("superclevr", "data/superclevr", cfg)      # the 200-problem jsonl + ./images
    examples = load_benchmark("clevr-synth", "B", cfg)                   # held-out synthetic CLEVR, CoGenT B

Benchmarks:
- superclevr: R1-V's SuperCLEVR-200 counting file (ground_truth int), max_new_tokens 256.
- geoqa: R1-V's GeoQA test file (754 lines, ground_truth str), max_new_tokens 1024.
- clevr-synth: synthetic CLEVR counting scenes from a held-out seed (eval.synth_seed, eval.synth_n);
  the CoGenT condition is data.synth.split unless `--data A|B` (or the names clevr-synth-a / clevr-synth-b) pick one.
- geo-synth: synthetic geometry problems from the held-out seed.
The real benchmarks are files users download themselves; a missing file is a SuzakError that says where
to get it and which layout suzak expects (the formats R1-V's own scripts read).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from suzak.errors import SuzakError
from suzak.tasks import Example, Task, get_task
from suzak.tasks.sources import jsonl_examples, synth_examples

SUPERCLEVR_FILE = "superclevr_test200_counting_problems.jsonl"
GEOQA_FILE = "geoqa_test_prompts.jsonl"
SUPERCLEVR_IMAGES_URL = "https://www.cs.jhu.edu/~zhuowan/zhuowan/SuperCLEVR/to_be_released/images.zip"
R1V_PROMPTS_URL = "https://github.com/Deep-Agent/R1-V/tree/main/src/eval/prompts"
GEO170K_URL = "https://huggingface.co/datasets/Luckyjhg/Geo170K"


@dataclass(frozen=True)
class Reference:
    """A published score, in percent, measured with R1-V's eval prompt and r1v scoring."""

    model: str
    before: float | None
    after: float | None
    note: str = ""


@dataclass(frozen=True)
class Benchmark:
    name: str
    task_name: str
    """Task whose prompts and scoring rules apply (suzak.tasks.TASKS)."""
    max_new_tokens: int
    file: str | None = None
    """File name of the benchmark jsonl (None: generated in memory)."""
    default_dir: str | None = None
    """Folder searched when neither --data nor eval.data is given."""
    synth_split: str | None = None
    """CoGenT condition fixed by the name (clevr-synth-a/-b); None: data.synth.split or --data."""
    references: tuple[Reference, ...] = ()
    download: str = ""
    """How to get the data and the layout suzak expects (shown when it is missing)."""

    @property
    def task(self) -> Task:
        return get_task(self.task_name)

    @property
    def synthetic(self) -> bool:
        return self.file is None


_SUPERCLEVR_DOWNLOAD = f"""Get the SuperCLEVR-200 counting benchmark (R1-V's eval set):
  1. the problems: {SUPERCLEVR_FILE} from R1-V's repo ({R1V_PROMPTS_URL});
  2. the images: wget {SUPERCLEVR_IMAGES_URL}
     and unzip it next to the jsonl, so that ./images/superCLEVR_new_025000.png exists.
Expected layout:
  data/superclevr/{SUPERCLEVR_FILE}
  data/superclevr/images/superCLEVR_new_025000.png ... superCLEVR_new_025199.png
Then run: suzak eval superclevr --data data/superclevr --model <model>"""

_GEOQA_DOWNLOAD = f"""Get the GeoQA test benchmark (R1-V's eval set, 754 problems):
  1. the problems: {GEOQA_FILE} from R1-V's repo ({R1V_PROMPTS_URL});
  2. the images, next to the jsonl:
       git lfs install; git clone {GEO170K_URL}; cd Geo170K; unzip images.zip
Expected layout:
  data/geoqa/{GEOQA_FILE}
  data/geoqa/Geo170K/images/test/0.png ...
Then run: suzak eval geoqa --data data/geoqa --model <model>"""

# Published numbers (R1V-FORMATS.md "Reported results"); users report not reproducing some of them.
_SUPERCLEVR_REFS = (
    Reference("Qwen2-VL-2B-Instruct", 48.0, 82.5, "R1-V README, GRPO 100 steps"),
    Reference("Qwen2.5-VL-3B-Instruct", 55.0, 89.5, "GRPO 100 steps; seed README only"),
    Reference("users (issues)", 42.5, 71.5, "reported reproductions"),
)
_GEOQA_REFS = (
    Reference("Qwen2-VL-7B-Instruct", 30.63, 38.72, "R1-V README, GRPO 2 epochs"),
    Reference("Qwen2.5-VL-3B-Instruct", 35.41, 47.48, "R1-V README, GRPO 1 epoch"),
    Reference("users (issues), 3B", 13.5, None, "reported base reproduction"),
)

BENCHMARKS: dict[str, Benchmark] = {
    "superclevr": Benchmark("superclevr", "superclevr", 256, SUPERCLEVR_FILE, "data/superclevr",
                            references=_SUPERCLEVR_REFS, download=_SUPERCLEVR_DOWNLOAD),
    "geoqa": Benchmark("geoqa", "geoqa", 1024, GEOQA_FILE, "data/geoqa", references=_GEOQA_REFS,
                       download=_GEOQA_DOWNLOAD),
    "clevr-synth": Benchmark("clevr-synth", "clevr_count", 256),
    "clevr-synth-a": Benchmark("clevr-synth-a", "clevr_count", 256, synth_split="A"),
    "clevr-synth-b": Benchmark("clevr-synth-b", "clevr_count", 256, synth_split="B"),
    "geo-synth": Benchmark("geo-synth", "geoqa", 1024),
}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise SuzakError(f"unknown benchmark '{name}' (eval.benchmarks / suzak eval); known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[name]


def max_new_tokens_for(bench: Benchmark, cfg) -> int:
    """eval.max_new_tokens when set, else the benchmark's own budget (R1-V: SuperCLEVR 256, GeoQA 1024)."""
    return cfg.eval.max_new_tokens or bench.max_new_tokens


def load_benchmark(name: str, data: str | None, cfg) -> list[Example]:
    """The benchmark's examples (at most cfg.eval.limit). data: jsonl or folder (file benchmarks), A/B (clevr-synth)."""
    bench = get_benchmark(name)
    if bench.synthetic:
        return _synth_benchmark(bench, data, cfg)
    path = resolve_data_path(bench, data if data is not None else cfg.eval.data)
    try:
        return jsonl_examples(bench.task, path, limit=cfg.eval.limit)
    except SuzakError as e:
        # The loader names the line and image; add where the files come from, since that is the usual fix.
        raise SuzakError(f"{e}\n{bench.download}") from None


def resolve_data_path(bench: Benchmark, data: str | None) -> Path:
    """The benchmark jsonl: --data as a file, or the benchmark's file inside --data (default: bench.default_dir)."""
    given = Path(data).expanduser() if data else Path(bench.default_dir)
    candidate = given / bench.file if given.is_dir() else given
    if candidate.is_file():
        return candidate
    if given.is_dir():
        others = sorted(p.name for p in given.glob("*.jsonl"))
        if len(others) == 1:  # a renamed copy of the benchmark file is fine when it is the only jsonl there
            return given / others[0]
    where = "--data / eval.data" if data else f"the default folder {bench.default_dir} (no --data given)"
    raise SuzakError(f"{bench.name} benchmark data not found: looked for {candidate} ({where}).\n{bench.download}")


def _synth_benchmark(bench: Benchmark, data: str | None, cfg) -> list[Example]:
    split = bench.synth_split or _split_from_data(bench, data) or cfg.data.synth.split
    n = cfg.eval.synth_n if cfg.eval.limit is None else min(cfg.eval.synth_n, cfg.eval.limit)
    # Same scene/diagram settings as training, but the held-out seed, so the problems are unseen.
    synth = cfg.data.synth.model_copy(update={"n": n, "seed": cfg.eval.synth_seed, "split": split})
    examples = synth_examples(bench.task, synth)
    for ex in examples:
        ex.meta.setdefault("split", split)
    return examples


def _split_from_data(bench: Benchmark, data: str | None) -> str | None:
    if data is None:
        return None
    split = data.strip().upper()
    if bench.task.synth_kind == "clevr" and split in ("A", "B"):
        return split
    if bench.task.synth_kind == "clevr":
        hint = "--data A or --data B picks the CoGenT condition"
    else:
        hint = "geo-synth takes no --data"
    file_bench = "superclevr" if bench.task.synth_kind == "clevr" else "geoqa"
    raise SuzakError(f"{bench.name} is generated in memory (seed eval.synth_seed, n eval.synth_n); {hint}. "
                     f"To evaluate synthetic files written by `suzak data synth ... --format {file_bench}`, "
                     f"run `suzak eval {file_bench} --data {data}`.")


def describe_data(bench: Benchmark, data: str | None, cfg) -> str:
    """One line for summary.json saying exactly which problems were evaluated."""
    if bench.synthetic:
        split = bench.synth_split or _split_from_data(bench, data) or cfg.data.synth.split
        extra = f" split={split}" if bench.task.synth_kind == "clevr" else ""
        return f"synth seed={cfg.eval.synth_seed} n={cfg.eval.synth_n}{extra}"
    return str(resolve_data_path(bench, data if data is not None else cfg.eval.data))

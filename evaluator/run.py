"""`suzak eval`: greedy evaluation of a model on SuperCLEVR, GeoQA or synthetic benchmarks, via the rollout server.

    suzak eval superclevr --model Qwen/Qwen2.5-VL-3B-Instruct --data data/superclevr
    suzak eval geoqa --server http://127.0.0.1:8000 --data data/geoqa --limit 100
    suzak eval clevr-synth --model runs/default/export --data B        # held-out synthetic CoGenT-B scenes
    suzak eval superclevr --rescore runs/eval/superclevr-X/predictions.jsonl --scoring strict

Outputs in --out (default runs/eval/<benchmark>-<timestamp>): predictions.jsonl (id, image_path, question,
ground_truth, output, extracted, correct), summary.json, report.html and the resolved config.yaml.
`evaluate()` is the reusable core: `suzak train` calls it on each set of eval.benchmarks (after SFT, every
eval.every_steps GRPO steps, after GRPO) with its own client, so training-time and standalone numbers agree.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from suzak import wire
from suzak.config import save_config
from suzak.errors import SuzakError
from suzak.files import write_atomic
from suzak.log import Progress, get_logger
from suzak.prompts import example_prompt
from suzak.tasks import Example, Task
from suzak.tasks.sources import read_jsonl_rows
from evaluator.benchmarks import Benchmark, describe_data, get_benchmark, load_benchmark, max_new_tokens_for
from evaluator.report import print_table, write_report

log = get_logger("eval")

PREDICTION_FIELDS = ("id", "image_path", "question", "ground_truth", "output", "extracted", "correct")
FAILURE_KINDS = ("no_tag", "unparsable", "wrong")
DEFAULT_BATCH_SIZE = 32  # prompts per HTTP request: big enough to keep vLLM busy, small enough for a short body


# --------------------------------------------------------------------------- the reusable core


def greedy_sampling(max_new_tokens: int) -> wire.SamplingParams:
    """R1-V's eval decoding: greedy (do_sample=False), one completion, no log-probs needed."""
    return wire.SamplingParams(n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=max_new_tokens, logprobs=False)


def prediction_record(example: Example, output: str, score) -> dict:
    """One line of predictions.jsonl, exactly PREDICTION_FIELDS; ground_truth keeps the benchmark's type."""
    return {
        "id": example.id,
        "image_path": example.image_path,
        "question": example.problem,
        "ground_truth": example.ground_truth if example.ground_truth is not None else example.answer,
        "output": output,
        "extracted": score.extracted,
        "correct": bool(score.correct),
    }


def summarize(records: list[dict], failures: list[str | None], *, benchmark: str, scoring: str, prompt: str,
              model: str, max_new_tokens: int | None, seconds: float, data: str | None = None) -> dict:
    """summary.json: accuracy as a fraction with its Wilson 95% interval, and the failures by kind."""
    from suzak.tasks.scoring import wilson_interval

    n = len(records)
    correct = sum(1 for r in records if r["correct"])
    lo, hi = wilson_interval(correct, n)
    counts = {kind: sum(1 for f in failures if f == kind) for kind in FAILURE_KINDS}
    summary = {
        "benchmark": benchmark, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
        "ci95": [lo, hi], "failures": counts, "scoring": scoring, "prompt": prompt, "model": model,
        "max_new_tokens": max_new_tokens, "seconds": round(seconds, 3),
    }
    if data is not None:
        summary["data"] = data
    return summary


def evaluate(client, task: Task, examples: list[Example], *, scoring: str = "r1v", prompt: str = "eval",
             max_new_tokens: int | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
             progress: bool | Callable[[int, int], None] = False, system: bool = False,
             benchmark: str | None = None, model: str | None = None, min_pixels: int | None = None,
             max_pixels: int | None = None) -> tuple[list[dict], dict]:
    """Greedy-decode every example through `client` (a RolloutClient or anything with .generate/.info) and score it.

    Returns (records, summary): records are predictions.jsonl lines in example order; summary is summary.json.
    min_pixels / max_pixels default to the server's own budget from client.info(), as does model (the label).
    """
    if batch_size < 1:
        raise SuzakError(f"batch_size must be >= 1, got {batch_size}")
    max_new_tokens = max_new_tokens or task.default_max_new_tokens
    info = client.info()  # the served model's visual-token size (28 or 32 px), and the defaults below
    factor = getattr(info, "patch_factor", 28)
    min_pixels = min_pixels if min_pixels is not None else info.min_pixels
    max_pixels = max_pixels if max_pixels is not None else info.max_pixels
    model = model or info.model
    sampling = greedy_sampling(max_new_tokens)
    report = _progress_callback(progress, len(examples))
    start = time.perf_counter()
    records, failures = [], []
    for lo in range(0, len(examples), batch_size):
        batch = examples[lo:lo + batch_size]
        prompts = [example_prompt(task, ex, prompt=prompt, system=system, min_pixels=min_pixels,
                                  max_pixels=max_pixels, factor=factor) for ex in batch]
        response = client.generate(wire.GenerateRequest(prompts=prompts, sampling=sampling))
        if len(response.results) != len(batch):
            raise RuntimeError(f"server answered {len(response.results)} results for {len(batch)} prompts")
        for ex, result in zip(batch, response.results):
            output = result.completions[0].text
            score = task.score(output, ex.ground_truth if ex.ground_truth is not None else ex.answer, scoring)
            records.append(prediction_record(ex, output, score))
            failures.append(score.failure)
        report(len(records))
    report(None)
    summary = summarize(records, failures, benchmark=benchmark or task.name, scoring=scoring, prompt=prompt,
                        model=model, max_new_tokens=max_new_tokens, seconds=time.perf_counter() - start)
    return records, summary


def _progress_callback(progress, total: int) -> Callable[[int | None], None]:
    """progress=True: a bar (periodic lines when redirected); a callable: called with (done, total); False: silent.
    None closes the bar."""
    if callable(progress):
        return lambda done: progress(done, total) if done is not None else None
    if not progress:
        return lambda done: None
    bar = Progress("eval", total, unit="problem")

    def update(done: int | None) -> None:
        if done is None:
            bar.close()
        else:
            bar.update(done)

    return update


# --------------------------------------------------------------------------- outputs


def write_outputs(out_dir: str | Path, records: list[dict], summary: dict, *, images: dict[str, Any] | None = None,
                  image_base: str | Path | None = None) -> dict[str, Path]:
    """predictions.jsonl, summary.json and report.html in out_dir; each written whole, then renamed into place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({k: r[k] for k in PREDICTION_FIELDS}, ensure_ascii=False) + "\n" for r in records)
    paths = {"predictions": write_atomic(out / "predictions.jsonl", lines),
             "summary": write_atomic(out / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")}
    paths["report"] = write_report(out / "report.html", records, summary, images=images, image_base=image_base)
    return paths


def save_synth_images(examples: list[Example], folder: Path) -> None:
    """Synthetic examples live in memory; write them as PNGs so predictions.jsonl can point at real files."""
    folder.mkdir(parents=True, exist_ok=True)
    for ex in examples:
        if ex.image_path is None and ex.image is not None:
            path = folder / f"{ex.id}.png"
            ex.image.save(path)
            ex.image_path = str(path.resolve())


# --------------------------------------------------------------------------- rescoring


def rescore(path: str | Path, bench: Benchmark, scoring: str, *, prompt: str) -> tuple[list[dict], dict]:
    """Score the outputs saved in a predictions.jsonl again (e.g. under other rules), with no model.

    Each line needs ground_truth and output (R1-V's own `model_output` is accepted too). model, prompt and
    max_new_tokens come from a summary.json beside the file when there is one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise SuzakError(f"--rescore: {path} not found; give a predictions.jsonl written by `suzak eval`")
    start = time.perf_counter()
    records, failures = [], []
    for lineno, row in read_jsonl_rows(path):
        where = f"{path}:{lineno}"
        output = row.get("output", row.get("model_output"))
        if "ground_truth" not in row or output is None:
            raise SuzakError(f"{where}: each line needs 'ground_truth' and 'output' to be rescored")
        if not isinstance(output, str):
            raise SuzakError(f"{where}: 'output' must be a string, got {type(output).__name__}")
        try:
            score = bench.task.score(output, row["ground_truth"], scoring)
        except (SuzakError, ValueError, TypeError) as e:
            raise SuzakError(f"{where}: bad ground_truth {row['ground_truth']!r} for {bench.name}: {e}") from None
        records.append({"id": str(row.get("id", lineno - 1)), "image_path": row.get("image_path"),
                        "question": row.get("question", ""), "ground_truth": row["ground_truth"], "output": output,
                        "extracted": score.extracted, "correct": bool(score.correct)})
        failures.append(score.failure)
    if not records:
        raise SuzakError(f"--rescore: {path} holds no predictions")
    before = _sibling_summary(path)
    summary = summarize(records, failures, benchmark=bench.name, scoring=scoring,
                        prompt=before.get("prompt", prompt), model=before.get("model", f"rescore of {path}"),
                        max_new_tokens=before.get("max_new_tokens"), seconds=time.perf_counter() - start,
                        data=before.get("data"))
    return records, summary


def _sibling_summary(path: Path) -> dict:
    sibling = path.parent / "summary.json"
    try:
        data = json.loads(sibling.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- the server


def connect(url: str, cfg):
    """A RolloutClient to a running server, waiting until it is ready (SUZAK_SERVER_TOKEN authorizes admin routes)."""
    from vllm_server.client import RolloutClient

    client = RolloutClient.for_config(url, cfg, token=os.environ.get("SUZAK_SERVER_TOKEN"))
    if not client.health():  # `--server URL` names a running server: say so now rather than wait in silence
        raise SuzakError(f"no rollout server answers at {url}: start one (`suzak serve --config ...`) or check "
                         "--server / server.url")
    client.wait_ready(cfg.server.startup_timeout_s)
    return client


# --------------------------------------------------------------------------- the command


def default_out_dir(benchmark: str) -> Path:
    return Path("runs") / "eval" / f"{benchmark}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def _apply_args(args, cfg, bench: Benchmark) -> None:
    """Fold the command-line flags into cfg so that the saved config.yaml says exactly what ran."""
    arg = lambda name: getattr(args, name, None)  # noqa: E731 - the learner may pass a partial namespace
    if arg("scoring"):
        cfg.eval.scoring = arg("scoring")
    if arg("prompt"):
        cfg.eval.prompt = arg("prompt")
    if arg("limit") is not None:
        if arg("limit") < 1:
            raise SuzakError(f"--limit must be >= 1, got {arg('limit')}")
        cfg.eval.limit = arg("limit")
    if arg("data") and not bench.synthetic:  # for synthetic benchmarks --data is the CoGenT condition, not a path
        cfg.eval.data = arg("data")
    if arg("model") and arg("server"):
        raise SuzakError("give --model (a local server is started for it) or --server (a running one), not both")
    if arg("model"):
        cfg.model.name_or_path = arg("model")
        cfg.server.url = None
    if arg("server"):
        cfg.server.url = arg("server")
    cfg.eval.benchmarks = [bench.name]
    cfg.eval.max_new_tokens = max_new_tokens_for(bench, cfg)


def main(args, cfg) -> int:
    """Entry of `suzak eval` (suzak/cli.py): evaluate or rescore, write the outputs, print the table."""
    from rich.console import Console

    console = Console()
    bench = get_benchmark(args.benchmark)
    _apply_args(args, cfg, bench)
    out = Path(getattr(args, "out", None) or default_out_dir(bench.name))
    check_eval_out(out, getattr(args, "rescore", None))
    log.info(f"{bench.name}: outputs go to {out}")
    if getattr(args, "rescore", None):
        records, summary = rescore(args.rescore, bench, cfg.eval.scoring, prompt=cfg.eval.prompt)
        image_base = Path(args.rescore).expanduser().parent  # relative image paths were relative to the old output
        paths = write_outputs(out, records, summary, image_base=image_base)
    else:
        data = getattr(args, "data", None) if bench.synthetic else cfg.eval.data
        records, summary, images = _run_model(bench, data, cfg, out)
        paths = write_outputs(out, records, summary, images=images)
    save_config(cfg, out)
    print_table(summary, bench.references, console=console)
    log.info(f"wrote {paths['predictions']}, {paths['summary'].name}, {paths['report'].name}, config.yaml")
    return 0


OUTPUT_FILES = ("predictions.jsonl", "summary.json", "report.html", "config.yaml")


def check_eval_out(out: Path, rescore: str | None = None) -> None:
    """Refuse an --out that would destroy something: the file --rescore reads (or its folder, whose summary.json
    it reads too), a training run's folder, a file where a folder belongs, or a folder where a file belongs."""
    if out.exists() and not out.is_dir():
        raise SuzakError(f"--out {out} is a file: give a folder (it is created when missing)")
    for name in OUTPUT_FILES + ("predictions.jsonl.tmp", "summary.json.tmp"):
        if (out / name).is_dir():
            raise SuzakError(f"{out / name} is a folder, where `suzak eval` writes its {name}: choose another --out")
    for name in ("images", "server"):
        if (out / name).exists() and not (out / name).is_dir():
            raise SuzakError(f"{out / name} is a file, where `suzak eval` keeps its {name}/ folder: choose another "
                             "--out")
    if any((out / name).exists() for name in ("sft", "grpo", "sft_metrics.jsonl", "grpo_metrics.jsonl")):
        raise SuzakError(f"--out {out} is a training run's folder (it has sft/, grpo/ or *_metrics.jsonl); the "
                         "evaluation would write over its config.yaml and summary.json: choose another --out")
    if rescore:
        source = Path(rescore).expanduser()
        try:
            same_folder = out.resolve() == source.resolve().parent
            same_file = any((out / name).resolve() == source.resolve() for name in OUTPUT_FILES)
        except (OSError, RuntimeError):
            same_folder = same_file = False
        if same_folder or same_file:
            raise SuzakError(f"--out {out} would overwrite {source} (and the summary.json beside it) that --rescore "
                             "reads: choose another --out, e.g. " + str(source.parent.with_name(
                                 source.parent.name + "-rescored")))


def _run_model(bench: Benchmark, data: str | None, cfg, out: Path) -> tuple[list[dict], dict, dict]:
    # Load (and check) the data before a server is started: a missing file should fail in a second, not minutes.
    examples = load_benchmark(bench.name, data, cfg)
    data_desc = describe_data(bench, data, cfg)
    images = {ex.id: ex.image for ex in examples if ex.image is not None}
    if bench.synthetic:
        save_synth_images(examples, out / "images")
    out.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if cfg.server.url:
            log.info(f"connecting to the rollout server at {cfg.server.url}")
            client = connect(cfg.server.url, cfg)
            label = None  # the server's own model name
        else:
            from vllm_server.client import LocalServer

            log_path = out / "server" / "server.log"
            log.info(f"starting a local rollout server for {cfg.model.name_or_path} (log: {log_path})")
            server = stack.enter_context(LocalServer(cfg, log_path))  # entered once the engine is loaded
            client = connect(server.url, cfg)
            label = cfg.model.name_or_path
        # The system prompt belongs to the training setup, so it comes only with the training prompt.
        system = cfg.data.system_prompt and cfg.eval.prompt == "train"
        records, summary = evaluate(client, bench.task, examples, scoring=cfg.eval.scoring, prompt=cfg.eval.prompt,
                                    max_new_tokens=cfg.eval.max_new_tokens, batch_size=DEFAULT_BATCH_SIZE,
                                    progress=cfg.logging.progress, system=system, benchmark=bench.name, model=label)
    summary["data"] = data_desc
    return records, summary, images

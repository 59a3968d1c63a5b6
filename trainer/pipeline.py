"""The whole job: model -> data -> SFT -> rollout server -> GRPO -> eval -> report.

    suzak train                                   # embedded default: tiny model, synthetic CLEVR CoGenT-A
    suzak train --config configs/qwen25vl_3b_clevr.yaml --out runs/3b-clevr
    suzak train --stages grpo,eval                # only some stages (finished stages are skipped anyway)

Every stage leaves its result in the output folder and is skipped when that result exists, so rerunning the
same command resumes where it stopped; SFT and GRPO also resume mid-stage from their checkpoints. --no-resume
(checkpoint.resume=false) moves the earlier outputs into out_dir/previous-<time>/ and starts over. A local rollout
server that dies during GRPO is restarted and given the current weights.
Outputs: config.yaml, sft/final, grpo/final, *_metrics.jsonl, eval/*.json, summary.json, report.html.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

from suzak.config import RunConfig, save_config
from suzak.errors import SuzakError
from suzak.files import write_atomic
from suzak.log import get_logger
from suzak.tasks import Example, get_task
from trainer.report import set_label

STAGES = ("model", "data", "sft", "grpo", "eval")


log = get_logger()


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(data, indent=2))


def stage_model(cfg: RunConfig) -> str:
    from suzak.models import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    log.info(f"model: {path}")
    return str(path)


def stage_data(cfg: RunConfig, out: Path) -> list[Example]:
    from suzak.tasks.sources import load_examples

    task = get_task(cfg.data.task)
    start = time.time()
    examples = load_examples(task, cfg.data.source, split=cfg.data.split, image_root=cfg.data.image_root,
                             limit=cfg.data.limit, synth=cfg.data.synth)
    log.info(f"data: {len(examples)} {task.name} examples from {cfg.data.source} ({time.time() - start:.1f} s)")
    if cfg.data.source == "synth" and not (out / "data_preview.png").exists():
        _preview(examples[:16], out / "data_preview.png")
    return examples


def _preview(examples: list[Example], path: Path) -> None:
    from trainer.report import image_grid

    image_grid([(e.load_image(), f"{e.problem}\nanswer: {e.answer}") for e in examples], path)


def stage_sft(cfg: RunConfig, task, examples: list[Example], out: Path) -> str:
    final = out / "sft" / "final"
    if (final / "config.json").exists():
        log.info(f"sft: done earlier ({final})")
        return str(final)
    if not cfg.sft.enabled:
        return cfg.model.name_or_path
    from trainer.sft import run_sft

    log.info("sft: starting")
    return str(run_sft(cfg, examples, task, out))


def _start_server(cfg: RunConfig, model_path: str, out: Path, early=None):
    """(LocalServer, client): a local rollout server on the given weights, ready; (None, client) when server.url
    points at a running one.

    `early` is a LocalServer spawned by `_spawn_server_during_sft` on the base weights: it is waited for and handed
    `model_path`'s weights instead of starting another."""
    from vllm_server.client import LocalServer, RolloutClient

    if cfg.server.url:
        client = RolloutClient.for_config(cfg.server.url, cfg, token=os.environ.get("SUZAK_SERVER_TOKEN"))
        client.wait_ready(cfg.server.startup_timeout_s)
        return None, client
    if early is not None:
        early.wait()
        client = RolloutClient.for_config(early.url, cfg)
        log.info(f"server: loading {model_path} into the server started during SFT")
        _ensure_server_has(client, cfg, Path(model_path), version=0)
        return early, client
    log.info(f"server: starting a local vLLM server on {model_path} (log: {out / 'server.log'})")
    server = LocalServer(_server_config(cfg, model_path), out / "server.log").wait()
    return server, RolloutClient.for_config(server.url, cfg)


def _server_config(cfg: RunConfig, model_path: str) -> RunConfig:
    server_cfg = cfg.model_copy(deep=True)
    server_cfg.model.name_or_path = model_path
    return server_cfg


def _spawn_server_during_sft(cfg: RunConfig, stages: list[str], out: Path):
    """server.start_during_sft: spawn the local server on the base weights now, so that its start-up overlaps SFT."""
    sft_will_run = cfg.sft.enabled and "sft" in stages and not (out / "sft" / "final" / "config.json").exists()
    wanted = cfg.server.start_during_sft
    if wanted == "auto":
        import torch

        wanted = torch.cuda.is_available()
    if not (wanted and cfg.server.url is None and sft_will_run and "grpo" in stages):
        return None
    from vllm_server.client import LocalServer

    log.info(f"server: starting a local vLLM server during SFT (log: {out / 'server.log'})")
    return LocalServer(cfg, out / "server.log").spawn()


class EvalSet(NamedTuple):
    """One held-out set the pipeline evaluates: a benchmark of eval.benchmarks (a synthetic one gives CoGenT-A/B)."""
    benchmark: str
    examples: list[Example]


def eval_sets(cfg: RunConfig) -> dict[str, EvalSet]:
    """The sets of eval.benchmarks, loaded up front so a missing benchmark file fails before any training.

    clevr-synth gives the held-out CoGenT-A and CoGenT-B sets (named A and B); clevr-synth-a/-b one of them;
    geo-synth and the file benchmarks (superclevr, geoqa: eval.data) one set each, named after the benchmark."""
    from evaluator.benchmarks import get_benchmark, load_benchmark

    sets: dict[str, EvalSet] = {}
    for name in cfg.eval.benchmarks:
        bench = get_benchmark(name)
        if name == "clevr-synth":
            for split in ("A", "B"):
                sets[split] = EvalSet(name, load_benchmark(name, split, cfg))
        else:
            sets[bench.synth_split or name] = EvalSet(name, load_benchmark(name, None, cfg))
    return sets


def _evaluate(cfg: RunConfig, client, eval_set: EvalSet, *, progress: bool):
    """One greedy pass of the evaluator over a held-out set, with the run's eval settings and pixel budget."""
    from evaluator.benchmarks import get_benchmark, max_new_tokens_for
    from evaluator.run import evaluate

    bench = get_benchmark(eval_set.benchmark)
    return evaluate(client, bench.task, eval_set.examples, scoring=cfg.eval.scoring, prompt=cfg.eval.prompt,
                    max_new_tokens=max_new_tokens_for(bench, cfg), batch_size=64, progress=progress,
                    benchmark=eval_set.benchmark, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)


def evaluate_sets(cfg: RunConfig, client, label: str, out: Path, sets: dict[str, EvalSet]) -> dict[str, float]:
    """Evaluate the server's current weights on each held-out set; results are cached as eval/<label>_<set>.json."""
    accs = {}
    for name, eval_set in sets.items():
        path = out / "eval" / f"{label}_{name}.json"
        if path.exists():
            accs[name] = json.loads(path.read_text())["summary"]["accuracy"]
            continue
        records, summary = _evaluate(cfg, client, eval_set, progress=cfg.logging.progress)
        shown = [dict(rec, thumbnail=_thumbnail(ex)) for rec, ex in zip(records[:24], eval_set.examples)]
        _write_json(path, {"summary": summary, "records": shown})
        accs[name] = summary["accuracy"]
        log.info(f"eval {label} {set_label(name)}: {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']})")
    return accs


def stage_grpo(cfg: RunConfig, task, examples: list[Example], model_path: str, out: Path,
               sets: dict[str, EvalSet], early_server=None):
    """Start the server on the SFT weights (or load them into `early_server`), evaluate them, run GRPO, evaluate
    again, export."""
    from trainer.grpo import GRPOLearner
    from trainer.monitor import Monitor

    final = out / "grpo" / "final"
    want_eval = bool(sets)
    server, client = _start_server(cfg, model_path, out, early_server)
    results = {}
    with server or contextlib.nullcontext():
        if want_eval:
            results["sft"] = evaluate_sets(cfg, client, "sft", out, sets)
        if cfg.grpo.enabled and not (final / "config.json").exists():
            grpo_cfg = cfg.model_copy(deep=True)
            grpo_cfg.model.name_or_path = model_path
            learner = GRPOLearner(grpo_cfg, task, examples, client, out / "grpo",
                                  eval_hook=_eval_hook(cfg, sets) if cfg.eval.every_steps else None)
            monitor = Monitor(out, cfg.logging, cfg.grpo.steps, "grpo")
            try:
                client = _run_learner(learner, monitor, cfg, model_path, out, server, client)
            finally:
                monitor.close()
            learner.export(final)
            log.info(f"grpo: exported {final}")
        elif (final / "config.json").exists():
            _ensure_server_has(client, cfg, final)
        if want_eval and cfg.grpo.enabled:
            results["grpo"] = evaluate_sets(cfg, client, "grpo", out, sets)
    return results


MAX_SERVER_RESTARTS = 2


def _run_learner(learner, monitor, cfg: RunConfig, model_path: str, out: Path, server, client):
    """learner.run, restarting a local server (a LocalServer) that died under it (up to MAX_SERVER_RESTARTS times);
    returns the client of the server it ends with.

    The learner keeps its state: the new server gets the current weights pushed as the current policy version
    and GRPO goes on from the step it was at (the prompts drawn for the step that failed are skipped). A remote
    server (server.url), or one that is still up, leaves the error as it was."""
    from vllm_server.client import RolloutClient

    restarts = 0
    while True:
        try:
            learner.run(monitor)
            return client
        except SuzakError as e:
            code = _server_exit_code(server.process if server is not None else None, client)
            if code is None:
                raise
            where = f"the local rollout server stopped (exit code {code}; log: {out / 'server.log'})"
            if restarts >= MAX_SERVER_RESTARTS or cfg.server.sleep_during_update:
                raise SuzakError(f"{where} at GRPO step {learner.step_index}: {e}. Rerun the same command to resume "
                                 f"from the newest checkpoint in {out / 'grpo' / 'checkpoints'}") from None
            restarts += 1
            log.info(f"grpo: {where} at step {learner.step_index} ({str(e)[:300]}); restarting it "
                 f"({restarts}/{MAX_SERVER_RESTARTS}) and pushing the step-{learner.step_index} weights again")
            client.close()
            server.restart(_server_config(cfg, model_path))
            client = RolloutClient.for_config(server.url, cfg)
            learner.client, learner.transport = client, None
            learner.cfg.checkpoint.resume = False  # in memory the learner is already where it was


def _server_exit_code(process, client, wait_s: float = 15.0) -> int | None:
    """The exit code of a local server that stopped (it exits within seconds once its engine died), else None."""
    import subprocess

    if process is None:
        return None
    if process.poll() is not None:
        return process.returncode
    try:
        if client.ready():
            return None  # up and serving: the error was something else
    except SuzakError:
        pass  # its engine died: the server is on its way out
    try:
        return process.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        return None


def _ensure_server_has(client, cfg: RunConfig, folder: Path, version: int | None = None) -> None:
    """Load a checkpoint folder's weights into the running server (files transport), as `version` (default: the
    server's next): the exported GRPO weights on a resumed run, or the SFT weights for a server started during SFT."""
    from trainer.weight_push import FilesTransport

    transport = FilesTransport(folder.parent / "push")
    transport.init(client)
    from safetensors.torch import load_file

    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    transport.push(tensors.items(), version=client.info().policy_version + 1 if version is None else version)


def _thumbnail(example: Example, size: int = 200) -> str:
    import base64
    import io

    img = example.load_image().copy()
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _eval_hook(cfg: RunConfig, sets):
    def hook(client, step):
        metrics = {}
        for name, eval_set in sets.items():
            _, summary = _evaluate(cfg, client, eval_set, progress=False)
            metrics[f"eval/{name}"] = summary["accuracy"]
        return metrics

    return hook


OUT_DIRS = ("sft", "grpo", "eval", "tb")
OUT_FILES = ("config.yaml", "summary.json", "report.html", "curves.png", "data_preview.png", "sft_metrics.jsonl",
             "grpo_metrics.jsonl", "server.log", "server_config.yaml")
STAGE_OUTPUTS = {"sft": ("sft", "sft_metrics.jsonl", "wandb_sft_id.txt", "tb/sft"),
                 "grpo": ("grpo", "grpo_metrics.jsonl", "wandb_grpo_id.txt", "tb/grpo"),
                 "eval": ("eval",)}


def check_out_dir(out: Path) -> None:
    """Fail at once, naming the path, when the output folder cannot hold a training run: it (or one of its folders)
    is a file, one of its files is a folder, or it holds another kind of output (a `suzak eval` folder)."""
    if out.exists() and not out.is_dir():
        raise SuzakError(f"output folder {out} is a file: give --out a folder (it is created when missing)")
    for name in OUT_DIRS:
        if (out / name).exists() and not (out / name).is_dir():
            raise SuzakError(f"{out / name} is a file, where the run keeps its {name}/ folder: move it away or choose "
                             "another --out")
    for name in OUT_FILES:
        if (out / name).is_dir():
            raise SuzakError(f"{out / name} is a folder, where the run writes its {name}: move it away or choose "
                             "another --out")
    if (out / "predictions.jsonl").exists():
        raise SuzakError(f"{out} holds a `suzak eval` output (predictions.jsonl); a training run would write over "
                         "it: choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SuzakError(f"cannot create the output folder {out}: {e}") from None


def start_over(out: Path, stages: list[str]) -> Path | None:
    """checkpoint.resume=false (--no-resume): move the earlier outputs of these stages (checkpoints, exports,
    metrics, cached evaluations, summary and report) into out/previous-<time>/ instead of writing over them."""
    from trainer.monitor import aside_name

    names = [n for stage in stages for n in STAGE_OUTPUTS.get(stage, ())]
    names += ["eval"] if {"sft", "grpo"} & set(stages) else []
    names += ["summary.json", "report.html", "curves.png"]
    present = [n for n in dict.fromkeys(names) if (out / n).exists()]
    if not any(n not in ("summary.json", "report.html", "curves.png") for n in present):
        return None
    aside = aside_name(out / "x", f"previous-{time.strftime('%Y%m%d-%H%M%S')}")
    for name in present:
        (aside / name).parent.mkdir(parents=True, exist_ok=True)
        os.replace(out / name, aside / name)
    log.info(f"--no-resume: the earlier {', '.join(present)} moved to {aside}")
    return aside


def check_grpo_config(cfg: RunConfig, task) -> None:
    """GRPO settings that cannot work, refused before any model loads (not minutes in, after SFT)."""
    g = cfg.grpo
    problems = []
    unknown = sorted(set(g.reward_weights) - set(task.reward_functions(g.reward_mode)))
    if unknown:
        problems.append(f"grpo.reward_weights names unknown reward(s) {unknown}; known: "
                        f"{sorted(task.reward_functions(g.reward_mode))}")
    if g.temperature == 0 and g.num_generations > 1:
        problems.append(f"grpo.temperature=0 makes the {g.num_generations} completions of a group identical, so "
                        "every advantage is 0 and nothing is learned: use a temperature > 0 (R1-V: 0.9)")
    if g.max_completion_tokens >= cfg.server.max_model_len:
        problems.append(f"grpo.max_completion_tokens={g.max_completion_tokens} leaves no room for the prompt in "
                        f"server.max_model_len={cfg.server.max_model_len}: lower it or raise server.max_model_len")
    if problems:
        raise SuzakError("invalid GRPO config:\n  " + "\n  ".join(problems))


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None) -> dict:
    """Run the selected stages (default: all) and write summary.json + report.html."""
    stages = list(STAGES) if not stages or stages == ["all"] else stages
    bad = [s for s in stages if s not in STAGES + ("report",)]
    if bad:
        raise SuzakError(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    out = Path(cfg.out_dir)
    if "grpo" in stages and cfg.grpo.enabled:
        check_grpo_config(cfg, get_task(cfg.data.task))
    if cfg.checkpoint.push_to_hub:
        from trainer.export import hub_target

        hub_target(cfg.checkpoint.hub_model_id)  # a missing repo or token fails now, not after hours of training
    check_out_dir(out)
    if not cfg.checkpoint.resume:
        start_over(out, stages)
    save_config(cfg, out)
    log.info(f"output folder: {out.resolve()}")
    sets = eval_sets(cfg) if "eval" in stages else {}
    started = time.time()
    task = get_task(cfg.data.task)
    model_path = stage_model(cfg)
    cfg = cfg.model_copy(deep=True)
    cfg.model.name_or_path = model_path
    early_server = _spawn_server_during_sft(cfg, stages, out)
    try:
        examples = stage_data(cfg, out) if {"data", "sft", "grpo"} & set(stages) else []
        sft_path = stage_sft(cfg, task, examples, out) if "sft" in stages else str(out / "sft" / "final")
    except BaseException:
        if early_server is not None:
            early_server.stop()
        raise
    if not Path(sft_path).exists():
        sft_path = model_path
    results = {}
    if "grpo" in stages or "eval" in stages:
        results = stage_grpo(cfg, task, examples, sft_path, out, sets,
                             early_server=early_server) if "grpo" in stages else _eval_only(cfg, sft_path, out, sets)
    summary = {**results, "seed": cfg.seed, "seconds": round(time.time() - started, 1)}
    _write_json(out / "summary.json", summary)
    from trainer.report import print_table, write_report

    print_table(summary)
    write_report(out, summary)
    log.info(f"summary: {out / 'summary.json'}  report: {out / 'report.html'}")
    if cfg.checkpoint.push_to_hub:
        push_final(cfg, out)
    return summary


def final_model(cfg: RunConfig, out: Path) -> Path | None:
    """The run's final export: grpo/final, or sft/final when GRPO is off (None before either exists)."""
    for folder in (out / "grpo" / "final", out / "sft" / "final") if cfg.grpo.enabled else (out / "sft" / "final",):
        if (folder / "config.json").is_file():
            return folder
    return None


def push_final(cfg: RunConfig, out: Path) -> None:
    """checkpoint.push_to_hub: upload the final export once; pushed.json records it, so a rerun does not re-upload.

    A failed upload stops the run with an error that names the local folder: the weights stay on disk."""
    from trainer.export import hub_target, push_to_hub

    folder = final_model(cfg, out)
    if folder is None:
        raise SuzakError(f"checkpoint.push_to_hub: no exported model in {out} (grpo/final or sft/final) to push")
    repo, _ = hub_target(cfg.checkpoint.hub_model_id)
    record = out / "pushed.json"
    if record.exists() and json.loads(record.read_text()) == {"repo": repo, "folder": str(folder)}:
        log.info(f"hub: {folder} already pushed to {repo} (pushed.json)")
        return
    log.info(f"hub: uploading {folder} to {repo}")
    try:
        push_to_hub(folder, repo)
    except SuzakError as e:
        raise SuzakError(f"{e}\nThe model is safe on disk at {folder}; rerun the same `suzak train` command "
                         f"(finished stages are skipped) to retry the upload.") from None
    _write_json(record, {"repo": repo, "folder": str(folder)})
    log.info(f"hub: pushed {folder} to https://huggingface.co/{repo}")


def _eval_only(cfg: RunConfig, model_path: str, out: Path, sets: dict[str, EvalSet]) -> dict:
    server, client = _start_server(cfg, model_path, out)
    with server or contextlib.nullcontext():
        return {"sft": evaluate_sets(cfg, client, "sft", out, sets)}

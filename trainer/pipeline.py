"""The whole job: model -> data -> SFT -> rollout server -> GRPO -> eval -> report.

    suzak train                                   # embedded default: tiny model, synthetic CLEVR CoGenT-A
    suzak train --config configs/qwen25vl_3b_clevr.yaml --out runs/3b-clevr
    suzak train --stages grpo,eval                # only some stages (finished stages are skipped anyway)

Every stage leaves its result in the output folder and is skipped when that result exists, so rerunning the
same command resumes where it stopped; SFT and GRPO also resume mid-stage from their checkpoints.
Outputs: config.yaml, sft/final, grpo/final, *_metrics.jsonl, eval/*.json, summary.json, report.html.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from suzak.config import RunConfig, save_config
from suzak.errors import SuzakError
from suzak.tasks import Example, get_task

STAGES = ("model", "data", "sft", "grpo", "eval")


_STARTED = time.time()


def _log(msg: str) -> None:
    print(f"[suzak {time.time() - _STARTED:6.1f}s] {msg}", flush=True)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def stage_model(cfg: RunConfig) -> str:
    from suzak.models import resolve_model_path

    path = resolve_model_path(cfg.model.name_or_path)
    _log(f"model: {path}")
    return str(path)


def stage_data(cfg: RunConfig, out: Path) -> list[Example]:
    from suzak.tasks.sources import load_examples

    task = get_task(cfg.data.task)
    start = time.time()
    examples = load_examples(task, cfg.data.source, split=cfg.data.split, image_root=cfg.data.image_root,
                             limit=cfg.data.limit, synth=cfg.data.synth)
    _log(f"data: {len(examples)} {task.name} examples from {cfg.data.source} ({time.time() - start:.1f} s)")
    if cfg.data.source == "synth" and not (out / "data_preview.png").exists():
        _preview(examples[:16], out / "data_preview.png")
    return examples


def _preview(examples: list[Example], path: Path) -> None:
    from trainer.report import image_grid

    image_grid([(e.load_image(), f"{e.problem}\nanswer: {e.answer}") for e in examples], path)


def stage_sft(cfg: RunConfig, task, examples: list[Example], out: Path) -> str:
    final = out / "sft" / "final"
    if (final / "config.json").exists():
        _log(f"sft: done earlier ({final})")
        return str(final)
    if not cfg.sft.enabled:
        return cfg.model.name_or_path
    from trainer.sft import run_sft

    _log("sft: starting")
    return str(run_sft(cfg, examples, task, out))


def _start_server(cfg: RunConfig, model_path: str, out: Path, early=None):
    """A local rollout server on the given weights, unless server.url points at a running one.

    `early` is a server spawned by `_spawn_server_during_sft` on the base weights: it is waited for and handed
    `model_path`'s weights instead of starting another."""
    from vllm_server.client import RolloutClient, start_local_server, wait_local_server

    if cfg.server.url:
        client = RolloutClient(cfg.server.url, token=os.environ.get("SUZAK_SERVER_TOKEN"),
                               timeout=cfg.server.request_timeout_s)
        client.wait_ready(cfg.server.startup_timeout_s)
        return None, client
    if early is not None:
        process, url = early
        wait_local_server(process, url, cfg.server.startup_timeout_s, out / "server.log")
        client = RolloutClient(url, timeout=cfg.server.request_timeout_s)
        _log(f"server: loading {model_path} into the server started during SFT")
        _ensure_server_has(client, cfg, Path(model_path), version=0)
        return process, client
    server_cfg = cfg.model_copy(deep=True)
    server_cfg.model.name_or_path = model_path
    _log(f"server: starting a local {cfg.server.engine} server on {model_path} (log: {out / 'server.log'})")
    process, url = start_local_server(server_cfg, out / "server.log")
    client = RolloutClient(url, timeout=cfg.server.request_timeout_s)
    return process, client


def _spawn_server_during_sft(cfg: RunConfig, stages: list[str], out: Path):
    """server.start_during_sft: spawn the local server on the base weights now, so that its start-up overlaps SFT."""
    sft_will_run = cfg.sft.enabled and "sft" in stages and not (out / "sft" / "final" / "config.json").exists()
    wanted = cfg.server.start_during_sft
    if wanted == "auto":
        import torch

        wanted = torch.cuda.is_available()
    if not (wanted and cfg.server.url is None and sft_will_run and "grpo" in stages):
        return None
    from vllm_server.client import spawn_local_server

    _log(f"server: starting a local {cfg.server.engine} server during SFT (log: {out / 'server.log'})")
    return spawn_local_server(cfg, out / "server.log")


def _eval_sets(cfg: RunConfig) -> dict[str, list[Example]]:
    """Held-out synthetic CoGenT-A and CoGenT-B sets (a seed the training data never used)."""
    from suzak.tasks.sources import synth_examples

    task = get_task(cfg.data.task)
    sets = {}
    for split in ("A", "B"):
        synth = cfg.data.synth.model_copy(update={"n": cfg.eval.synth_n, "seed": cfg.eval.synth_seed, "split": split})
        sets[split] = synth_examples(task, synth)
    return sets


def _evaluate(cfg: RunConfig, client, examples: list[Example], *, progress: bool):
    """One greedy pass of the evaluator over a held-out set, with the run's eval settings and pixel budget."""
    from evaluator.run import evaluate

    task = get_task(cfg.data.task)
    return evaluate(client, task, examples, scoring=cfg.eval.scoring, prompt=cfg.eval.prompt,
                    max_new_tokens=cfg.eval.max_new_tokens or task.default_max_new_tokens, batch_size=64,
                    progress=progress, min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)


def evaluate_sets(cfg: RunConfig, client, label: str, out: Path, sets: dict[str, list[Example]]) -> dict[str, float]:
    """Evaluate the server's current weights on each held-out set; results are cached as eval/<label>_<set>.json."""
    accs = {}
    for name, examples in sets.items():
        path = out / "eval" / f"{label}_{name}.json"
        if path.exists():
            accs[name] = json.loads(path.read_text())["summary"]["accuracy"]
            continue
        records, summary = _evaluate(cfg, client, examples, progress=cfg.logging.progress)
        shown = [dict(rec, thumbnail=_thumbnail(ex)) for rec, ex in zip(records[:24], examples)]
        _write_json(path, {"summary": summary, "records": shown})
        accs[name] = summary["accuracy"]
        _log(f"eval {label} CoGenT-{name}: {summary['accuracy']:.3f} ({summary['correct']}/{summary['n']})")
    return accs


def stage_grpo(cfg: RunConfig, task, examples: list[Example], model_path: str, out: Path, want_eval: bool,
               early_server=None):
    """Start the server on the SFT weights (or load them into `early_server`), evaluate them, run GRPO, evaluate
    again, export."""
    from trainer.grpo import GRPOLearner
    from trainer.monitor import Monitor

    final = out / "grpo" / "final"
    sets = _eval_sets(cfg) if want_eval else {}
    process, client = _start_server(cfg, model_path, out, early_server)
    results = {}
    try:
        if want_eval:
            results["sft"] = evaluate_sets(cfg, client, "sft", out, sets)
        if cfg.grpo.enabled and not (final / "config.json").exists():
            grpo_cfg = cfg.model_copy(deep=True)
            grpo_cfg.model.name_or_path = model_path
            learner = GRPOLearner(grpo_cfg, task, examples, client, out / "grpo",
                                  eval_hook=_eval_hook(cfg, sets) if cfg.eval.every_steps else None)
            monitor = Monitor(out, cfg.logging, cfg.grpo.steps, "grpo")
            try:
                learner.run(monitor)
            finally:
                monitor.close()
            learner.export(final)
            _log(f"grpo: exported {final}")
        elif (final / "config.json").exists():
            _ensure_server_has(client, cfg, final)
        if want_eval and cfg.grpo.enabled:
            results["grpo"] = evaluate_sets(cfg, client, "grpo", out, sets)
    finally:
        if process is not None:
            from vllm_server.client import stop_local_server

            stop_local_server(process)
    return results


def _ensure_server_has(client, cfg: RunConfig, folder: Path, version: int | None = None) -> None:
    """Load a checkpoint folder's weights into the running server (files transport), as `version` (default: the
    server's next): the exported GRPO weights on a resumed run, or the SFT weights for a server started during SFT."""
    from vllm_server.client import files_transport

    transport = files_transport(folder.parent / "push")
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
        for name, examples in sets.items():
            _, summary = _evaluate(cfg, client, examples, progress=False)
            metrics[f"eval/{name}"] = summary["accuracy"]
        return metrics

    return hook


def run_pipeline(cfg: RunConfig, stages: list[str] | None = None) -> dict:
    """Run the selected stages (default: all) and write summary.json + report.html."""
    stages = list(STAGES) if not stages or stages == ["all"] else stages
    bad = [s for s in stages if s not in STAGES + ("report",)]
    if bad:
        raise SuzakError(f"unknown stage(s) {bad}; stages: {', '.join(STAGES)}")
    out = Path(cfg.out_dir)
    global _STARTED
    _STARTED = time.time()
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out)
    _log(f"output folder: {out.resolve()}")
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
            from vllm_server.client import stop_local_server

            stop_local_server(early_server[0])
        raise
    if not Path(sft_path).exists():
        sft_path = model_path
    results = {}
    if "grpo" in stages or "eval" in stages:
        results = stage_grpo(cfg, task, examples, sft_path, out, want_eval="eval" in stages,
                             early_server=early_server) if "grpo" in stages else _eval_only(cfg, sft_path, out)
    summary = {**results, "seed": cfg.seed, "seconds": round(time.time() - started, 1)}
    _write_json(out / "summary.json", summary)
    from trainer.report import print_table, write_report

    print_table(summary)
    write_report(out, summary)
    _log(f"summary: {out / 'summary.json'}  report: {out / 'report.html'}")
    return summary


def _eval_only(cfg: RunConfig, model_path: str, out: Path) -> dict:
    sets = _eval_sets(cfg)
    process, client = _start_server(cfg, model_path, out)
    try:
        return {"sft": evaluate_sets(cfg, client, "sft", out, sets)}
    finally:
        if process is not None:
            from vllm_server.client import stop_local_server

            stop_local_server(process)

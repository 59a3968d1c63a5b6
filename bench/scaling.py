"""How the GRPO step grows with G, completion length and image size (max_pixels), on one server and learner.

    python -m bench.scaling --arch 7b --prompts 16                 # H100: one warm-up, then 7 points
    python -m bench.scaling --plot bench/scaling_7b_h100.json      # the table (Markdown) and a PNG from a result
    python -m bench.scaling --arch tiny --prompts 2 --G-values 2 4 --completions 8 --visual-tokens-values 16

The reference point is bench/grpo_step.py's (G=8, 256 completion tokens, 512 visual tokens, 300 text tokens);
each other point changes one of the three. All points share one `suzak serve` (sized for the largest) and one
learner, whose config is changed between points, so a point costs its steps and not a server start. Writes
`$OUT/scaling_<arch>.json` when OUT is set, and prints `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from bench import grpo_step
from bench.common import run_and_emit, versions
from bench.make_arch import ARCH_CHOICES, install_random_init_loader


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Step time against G, completion length and image size.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="7b")
    p.add_argument("--prompts", type=int, default=16, help="prompts per step (the reference step has 64)")
    p.add_argument("--G-values", dest="g_values", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--completions", type=int, nargs="+", default=[128, 256, 512])
    p.add_argument("--visual-tokens-values", dest="visual_values", type=int, nargs="+", default=[256, 512, 1024])
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=1, help="timed steps per point")
    p.add_argument("--plot", type=Path, help="only draw the table and PNG of a saved result")
    args, rest = p.parse_known_args(argv)
    return args, rest


def points(args) -> list[dict]:
    """The reference point (the middle value of each list), then one list's other values at a time."""
    mid = {"G": args.g_values[len(args.g_values) // 2], "completion": args.completions[len(args.completions) // 2],
           "visual_tokens": args.visual_values[len(args.visual_values) // 2]}
    out = [dict(mid, varies="reference")]
    for key, values in (("G", args.g_values), ("completion", args.completions), ("visual_tokens", args.visual_values)):
        out += [dict(mid, **{key: v}, varies=key) for v in values if v != mid[key]]
    return out


def step_args(args, rest: list[str], point: dict) -> argparse.Namespace:
    """grpo_step's arguments for one point (its defaults for everything this bench does not vary)."""
    base = ["--arch", args.arch, "--prompts", str(args.prompts), "--G", str(point["G"]),
            "--completion", str(point["completion"]), "--visual-tokens", str(point["visual_tokens"]),
            "--steps", str(args.steps), "--warmup", "0"]
    if args.text_tokens is not None:
        base += ["--text-tokens", str(args.text_tokens)]
    return grpo_step.parse_args(base + rest)


def largest(args, rest: list[str]) -> argparse.Namespace:
    """A point as large as every point in each dimension: the server and pixel limits are sized from it."""
    return step_args(args, rest, {"G": max(args.g_values), "completion": max(args.completions),
                                  "visual_tokens": max(args.visual_values)})


def set_point(learner, ns: argparse.Namespace, processor, task) -> dict:
    """Point the learner at this point's prompts and sampling shape; returns the prompts' shape."""
    from trainer.grpo import PromptSampler

    examples, shape = grpo_step.make_examples(ns, processor, task)
    learner.examples = examples
    learner.sampler = PromptSampler(len(examples), learner.cfg.seed)
    learner.cfg.grpo.num_generations = ns.G
    learner.cfg.grpo.max_completion_tokens = ns.completion
    return shape


def run(args, rest: list[str]) -> dict:
    from suzak.models import load_processor
    from suzak.tasks import get_task
    from vllm_server.client import LocalServer, RolloutClient

    grpo_step.preflight(grpo_step.LEARNER_MODULES + grpo_step.SERVER_MODULES)
    install_random_init_loader()
    big = largest(args, rest)
    ctx = grpo_step.prepare(big)
    cfg = ctx["cfg"]
    task = grpo_step.RandomRewardTask(get_task(cfg.data.task), seed=cfg.seed)
    processor = load_processor(ctx["model_dir"], min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    token = f"{os.getpid()}-{time.time_ns()}"
    results = []
    try:
        t0 = time.perf_counter()
        with LocalServer(cfg, ctx["run_dir"] / "server.log", env=grpo_step.server_env(ctx["model_dir"], token),
                         timeout_s=1800) as server:
            server_start = round(time.perf_counter() - t0, 1)
            client = grpo_step.TokenCountingClient(RolloutClient(server.url, timeout=cfg.server.request_timeout_s))
            try:
                reference = points(args)[0]
                learner = grpo_step.build_learner(cfg, task, [], client, ctx["run_dir"] / "grpo")
                learner.push_weights()
                ns = step_args(args, rest, reference)
                set_point(learner, ns, processor, task)
                grpo_step.time_steps(ns, learner, client, warmup=1, steps=0)  # warm-up at the reference point
                for point in points(args):
                    ns = step_args(args, rest, point)
                    shape = set_point(learner, ns, processor, task)
                    records = grpo_step.time_steps(ns, learner, client, warmup=0, steps=args.steps)
                    results.append(summarize_point(point, shape, records))
                    print(f"[scaling] {results[-1]}", flush=True)
            finally:
                client.close()
    finally:
        grpo_step.reap_server(token)
    return {"bench": "scaling", "arch": args.arch, "device": ctx["device_name"], "prompts": args.prompts,
            "train": ctx["mode"], "server_start_s": server_start, "points": results,
            "versions": versions(), "share_prompt": cfg.grpo.share_prompt}


def summarize_point(point: dict, shape: dict, records: list[dict]) -> dict:
    step_s = sum(r["step_s"] for r in records) / len(records)
    tokens = records[0]["tokens"]
    phases = {k: round(sum(r["phases_s"].get(k, 0.0) for r in records) / len(records), 3)
              for k in records[0]["phases_s"]}
    return {**point, "text_tokens": shape["text_tokens"], "image_size": shape["image_size"],
            "step_s": round(step_s, 3), "tokens": tokens, "tokens_per_s_per_gpu": round(tokens / step_s, 1),
            "generate_s": phases.get("generate"), "update_s": phases.get("update"),
            "weight_sync_s": phases.get("weight_sync")}


# ----------------------------------------------------------------------------------------------- report


def table(result: dict) -> str:
    rows = ["| varies | G | completion | visual tokens | step s | generate s | update s | tokens/s/GPU |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in result["points"]:
        rows.append(f"| {p['varies']} | {p['G']} | {p['completion']} | {p['visual_tokens']} | {p['step_s']:.1f} | "
                    f"{p['generate_s']:.1f} | {p['update_s']:.1f} | {p['tokens_per_s_per_gpu']:,.0f} |")
    return "\n".join(rows)


def plot(result: dict, out: Path) -> Path:
    """One panel per varied quantity: step time split into generate and update, against the value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = next(p for p in result["points"] if p["varies"] == "reference")
    keys = [("G", "G (completions per prompt)"), ("completion", "completion tokens"),
            ("visual_tokens", "visual tokens per image (max_pixels / 784)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), sharey=True)
    for ax, (key, label) in zip(axes, keys):
        series = sorted([p for p in result["points"] if p["varies"] in (key, "reference")], key=lambda p: p[key])
        xs = [p[key] for p in series]
        ax.plot(xs, [p["step_s"] for p in series], "o-", label="step")
        ax.plot(xs, [p["update_s"] for p in series], "s--", label="update (learner)")
        ax.plot(xs, [p["generate_s"] for p in series], "^:", label="generate (server)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_xlabel(label)
        ax.axvline(reference[key], color="grey", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("seconds per step")
    axes[0].legend()
    fig.suptitle(f"GRPO step, {result['arch']} ({result['train']}), {result['prompts']} prompts, {result['device']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


def main(argv: list[str] | None = None) -> int:
    args, rest = parse_args(argv)
    if args.plot:
        result = json.loads(args.plot.read_text())
        print(table(result))
        print(f"plot: {plot(result, args.plot.with_suffix('.png'))}")
        return 0
    return run_and_emit("scaling", lambda: run(args, rest), f"scaling_{args.arch}.json")


if __name__ == "__main__":
    sys.exit(main())

"""The learner's update alone, no rollout server: time it, and optionally profile where its time goes.

    python -m bench.learner_step --arch 3b --train full --prompts 16 --steps 2 --warmup 1 [--profile]
    python -m bench.learner_step --arch tiny --prompts 2 --G 2 --completion 8 --steps 1 --warmup 0    # CPU smoke
    python -m bench.learner_step --arch 3b --train full --prompts 16 --visual-tokens 187 --text-tokens 80 \
        --variants "base:vision=per_window" "packed:vision=packed" "flex:vision=packed,lm=flex" "nockpt:ckpt=off"

The same learner as bench.grpo_step (GRPOLearner.update: the reference pass, the loss's forward and backward with
gradient checkpointing, the optimizer, offloaded or not), fed rollouts of exactly --completion random tokens per
completion instead of a server's, at the reference shape. Without a server it starts in seconds, so learner
changes can be compared on the device cheaply. --profile wraps one timed update in torch.profiler and prints the
top operators by device time and by host time (and writes a Chrome trace to $OUT when set).
--variants compares learner settings that can be switched on the live learner (vision=packed|per_window,
lm=bias|flex, ckpt=on|off, mbt=<micro_batch_tokens>), like for like: one process, one learner, the same rollouts.
First each variant's log-probs of the first micro-batch against the first variant's (they must agree), then
--warmup updates of each, then --steps rounds in which every variant runs one timed update in turn (so a drift of
the card's clocks spreads over all of them). A variant that runs out of memory is recorded as such.
Prints `RESULT {json}` (also $OUT/learner_step_<arch>.json).
"""

from __future__ import annotations

import json
import os
import random
import sys
import time
from pathlib import Path

from bench import grpo_step
from bench.common import GiB, cuda_sync, run_and_emit, versions
from bench.flops import Dims, grpo_step_flops


class NoServer:
    """The learner's client when there is no server: the update never calls it."""

    def __getattr__(self, name):
        raise RuntimeError(f"bench.learner_step has no rollout server (the learner called client.{name})")


def fake_rollouts(learner, prompts, G: int, completion: int, seed: int = 0) -> list:
    """G completions of exactly `completion` random ordinary tokens per prompt, with random rewards."""
    from trainer.rollouts import Rollout

    rng = random.Random(seed)
    special = set(learner.vision_ids) | {learner.pad_id}
    n = learner.hf_model.get_input_embeddings().num_embeddings  # ordinary tokens sit below the special ones
    vocab = [t for t in range(min(1000, n // 4), min(30000, n // 2)) if t not in special]
    rollouts = []
    for p in range(len(prompts)):
        for _ in range(G):
            ids = [rng.choice(vocab) for _ in range(completion)]
            rollouts.append(Rollout(p, ids, "", None, "length", learner.policy_version, reward=rng.random()))
    learner.advantages(rollouts)
    return rollouts


def timed_update(learner, rollouts, prompts) -> dict:
    learner.logprob_seconds = 0.0
    cuda_sync()
    start = time.perf_counter()
    metrics = learner.update(rollouts, prompts)
    cuda_sync()
    record = {"update_s": round(time.perf_counter() - start, 3), "logprobs_s": round(learner.logprob_seconds, 3),
              "loss": metrics.get("loss"), "grad_norm": metrics.get("grad_norm")}
    if getattr(learner.optimizer, "last_step_s", None) is not None:
        record["host_optimizer_s"] = round(learner.optimizer.last_step_s, 3)
    return record


def profile_update(learner, rollouts, prompts, rows: int = 25) -> dict:
    """One update under torch.profiler: the top operators by device and by host self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=False) as prof:
        record = timed_update(learner, rollouts, prompts)
    events = prof.key_averages()
    device_key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    print(events.table(sort_by=device_key, row_limit=rows), flush=True)
    print(events.table(sort_by="self_cpu_time_total", row_limit=15), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(Path(os.environ["OUT"]) / "learner_step_trace.json"))

    def top(key: str) -> list[dict]:
        ranked = sorted(events, key=lambda e: getattr(e, key, 0.0), reverse=True)[:rows]
        return [{"name": e.key, "ms": round(getattr(e, key, 0.0) / 1e3, 1), "calls": e.count} for e in ranked]

    return {"profiled_update": record, "top_device": top(device_key), "top_host": top("self_cpu_time_total")}


VARIANT_KEYS = {"vision": ("packed", "per_window"), "lm": ("bias", "flex"), "ckpt": ("on", "off"), "mbt": None}


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """'name:key=value,key=value' -> (name, settings); unknown keys or values are errors."""
    name, _, body = spec.partition(":")
    settings = dict(item.split("=", 1) for item in body.split(",") if item)
    for key, value in settings.items():
        if key not in VARIANT_KEYS:
            raise SystemExit(f"--variants {spec!r}: unknown key {key!r} (keys: {', '.join(VARIANT_KEYS)})")
        allowed = VARIANT_KEYS[key]
        if (allowed is None and not value.isdigit()) or (allowed is not None and value not in allowed):
            raise SystemExit(f"--variants {spec!r}: {key}={value} is not one of {allowed or 'a token count'}")
    return name, settings


def apply_variant(learner, settings: dict[str, str], base: dict) -> None:
    """Switch the live learner to a variant's settings; the ones it does not name go back to `base`
    (variant_base: the run's own)."""
    from suzak.kernels import set_vision_attention, text_config, use_flex_for_text

    for model in (learner.hf_model, learner.policy.ref_model):
        if model is None:
            continue
        model.config.vision_config._attn_implementation = base["vision"]
        if "vision" in settings:
            set_vision_attention(model.config.vision_config, settings["vision"])
        text_config(model)._attn_implementation = base["lm"]
        if settings.get("lm") == "flex":
            use_flex_for_text(model)
        elif settings.get("lm") == "bias":
            text_config(model)._attn_implementation = "sdpa"
    if settings.get("ckpt", base["ckpt"]) == "on":
        learner.hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        learner.hf_model.gradient_checkpointing_disable()
    learner.cfg.grpo.micro_batch_tokens = int(settings.get("mbt", base["mbt"]))


def variant_base(learner) -> dict:
    from suzak.kernels import text_attention_of, vision_attention_of

    return {"vision": vision_attention_of(learner.hf_model),
            "lm": text_attention_of(learner.hf_model), "mbt": learner.cfg.grpo.micro_batch_tokens,
            "ckpt": "on" if learner.hf_model.is_gradient_checkpointing else "off"}


def compare_variants(learner, rollouts, prompts, specs: list[str], warmup: int, steps: int) -> dict:
    """The --variants comparison on one learner (see the module docstring)."""
    import torch

    from trainer.forward import completion_logps

    variants = [parse_variant(spec) for spec in specs]
    base = variant_base(learner)
    first = learner._micro_batches(rollouts, prompts)[0]
    records = {name: {"settings": settings, "updates": []} for name, settings in variants}
    reference = None
    for name, settings in variants:
        apply_variant(learner, settings, base)
        with torch.no_grad():
            logps = completion_logps(learner.hf_model, first, learner.cfg.grpo.temperature, learner.device).float()
        reference = logps if reference is None else reference
        records[name]["logp_max_diff_vs_first"] = round(float((logps - reference).abs().max()), 6)
    for round_index in range(warmup + steps):
        for name, settings in variants:
            if records[name].get("oom"):
                continue
            apply_variant(learner, settings, base)
            try:
                record = dict(timed_update(learner, rollouts, prompts), warmup=round_index < warmup)
            except torch.cuda.OutOfMemoryError as err:
                records[name]["oom"] = str(err).splitlines()[0]
                learner.optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                continue
            if torch.cuda.is_available():
                record["max_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GiB, 2)
                torch.cuda.reset_peak_memory_stats()
            records[name]["updates"].append(record)
            print(f"[learner] {name} round {round_index + 1}/{warmup + steps}: {record}", flush=True)
    for record in records.values():
        timed = [u["update_s"] for u in record["updates"] if not u["warmup"]]
        record["update_s"] = round(sum(timed) / len(timed), 3) if timed else None
    return records


def run(args) -> dict:
    from suzak.models import load_processor
    from suzak.tasks import get_task

    grpo_step.install_random_init_loader()
    # No server: none to put to sleep, and none sharing the card (a server.url keeps it out of the memory check).
    args.overrides = [*args.overrides, "server.sleep_during_update=false", "server.url=http://127.0.0.1:9"]
    ctx = grpo_step.prepare(args)
    cfg = ctx["cfg"]
    task = grpo_step.RandomRewardTask(get_task(cfg.data.task), seed=cfg.seed)
    processor = load_processor(ctx["model_dir"], min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    examples, shape = grpo_step.make_examples(args, processor, task)
    t0 = time.perf_counter()
    learner = grpo_step.build_learner(cfg, task, examples, NoServer(), ctx["run_dir"] / "grpo")
    build_s = time.perf_counter() - t0
    prompts = learner._draw_and_prepare(args.prompts)
    rollouts = fake_rollouts(learner, prompts, args.G, args.completion, seed=cfg.seed)
    prompt_tokens = sum(len(p.input_ids) for p in prompts) / len(prompts)
    result = {"bench": "learner_step", "arch": args.arch, "device": ctx["device_name"], "train": ctx["mode"],
              "learner_build_s": round(build_s, 1), "overrides": args.overrides, "versions": versions(),
              "shape": {"prompts": args.prompts, "G": args.G, "completion_tokens": args.completion,
                        "prompt_tokens": round(prompt_tokens), **shape}}
    if args.variants:  # tokens_per_update: verl's count (each rollout's prompt and completion), as bench.grpo_step's
        result.update(tokens_per_update=round(prompt_tokens * len(rollouts)) + len(rollouts) * args.completion,
                      variants=compare_variants(learner, rollouts, prompts, args.variants, args.warmup, args.steps))
        return result
    records = []
    for i in range(args.warmup + args.steps):
        record = dict(timed_update(learner, rollouts, prompts), warmup=i < args.warmup)
        records.append(record)
        print(f"[learner] update {i + 1}/{args.warmup + args.steps}{' (warm-up)' if record['warmup'] else ''}: "
              f"{record}", flush=True)
    timed = [r for r in records if not r["warmup"]] or records
    update_s = sum(r["update_s"] for r in timed) / len(timed)
    dims = Dims.from_config(json.loads((Path(ctx["model_dir"]) / "config.json").read_text()))
    flops = grpo_step_flops(dims, prompts=args.prompts, G=args.G, prompt_tokens=round(prompt_tokens),
                            visual_tokens=args.visual_tokens, completion=args.completion, train=ctx["mode"],
                            beta=cfg.grpo.beta, gradient_checkpointing=cfg.model.gradient_checkpointing,
                            share_prompt=learner.share_prompt)["learner"]
    result.update(updates=records, update_s=round(update_s, 3), learner_flops=flops, share_prompt=learner.share_prompt,
                  micro_batch_tokens=cfg.grpo.micro_batch_tokens)
    if ctx["device_total"] is not None:
        import torch

        result.update(real_mfu_learner=round(flops / update_s / args.peak_flops, 4),
                      max_allocated_gib=round(torch.cuda.max_memory_allocated() / GiB, 2))
    if args.profile:
        result["profile"] = profile_update(learner, rollouts, prompts)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    profile = "--profile" in argv
    variants = []
    if "--variants" in argv:  # the rest of the line, up to the next --option
        at = argv.index("--variants")
        end = next((i for i in range(at + 1, len(argv)) if argv[i].startswith("--")), len(argv))
        variants, argv = argv[at + 1:end], argv[:at] + argv[end:]
    args = grpo_step.parse_args([a for a in argv if a != "--profile"])
    args.profile, args.variants = profile, variants
    return run_and_emit("learner", lambda: run(args), f"learner_step_{args.arch}.json")


if __name__ == "__main__":
    sys.exit(main())

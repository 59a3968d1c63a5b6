"""Benchmark: the reference GRPO step, rollout server and learner on one GPU, through suzak's real code path.

    python -m bench.grpo_step --arch 7b --steps 2                 # H100: 7B shapes, LoRA, server + learner on one GPU
    python -m bench.grpo_step --arch 3b --steps 2                 # 3B: full fine-tuning if the estimate fits
    python -m bench.grpo_step --arch qwen3vl-8b --steps 2 --train lora   # Qwen3-VL-8B shapes (32 px visual tokens)
    python -m bench.grpo_step --arch 7b --set server.gpu_memory_utilization=0.45 grpo.micro_batch_tokens=8192
    python -m bench.grpo_step --arch tiny --prompts 2 --G 2 --completion 8 --steps 1     # CPU smoke run

The reference step (bench/README.md): 64 prompts x G=8 rollouts, one image per prompt at
512 visual tokens (896x448 px = 401408 = model.max_pixels; Qwen3-VL: 1024x512 px = 524288), about 300 other prompt
tokens, 256 completion
tokens (fixed: ignore_eos), random rewards. What runs is what `suzak train` runs: `suzak serve` in a subprocess
(vLLM, dummy weights for a weight-less folder), then GRPOLearner.push_weights() and GRPOLearner.step() for
--warmup + --steps steps. The bench sets or changes three things:
- grpo.ignore_eos=true, so every completion has exactly --completion tokens;
- the task's reward functions return random numbers (the rewards' cost is not what is measured);
- the learner's phase timer synchronises CUDA at phase edges, so queued GPU work is charged to its own phase.

Training setting (--train): lora (LoRA on the language model, vision frozen, gradient checkpointing), full
(everything trained, gradient checkpointing; the optimizer moves to host RAM when the card is too small, and the
server sleeps through the update) or frozen_vision (full language model + merger). auto: the first of full,
frozen_vision, lora whose trainer.memory.estimate_memory fits the card. `--set key=value ...` overrides
any config key last (suzak's dotted syntax), `--config` starts from a YAML recipe.

Output: one line `RESULT {json}` (and $OUT/grpo_step_<arch>.json when $OUT is set); bench/README.md says what
each number means. tokens/s/GPU follows verl: (prompt + response tokens) / (step time x GPUs).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from pathlib import Path

from bench.common import GiB, checkout_pythonpath, cuda_sync, nvidia_smi, run_and_emit, versions
from bench.flops import H100_BF16_PEAK, Dims, real_mfu
from bench.make_arch import ARCH_CHOICES, arch_factor, has_weights, install_random_init_loader, make_arch
from suzak.errors import SuzakError

TRAIN_MODES = ("auto", "full", "frozen_vision", "lora")
FILLER = ("Count every object in the scene, including the small ones partly hidden behind larger ones, and say "
          "how many there are in total. ")

# ----------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time the reference GRPO step through suzak's server and learner.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="7b")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (CUDA/Triton warm-up)")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--completion", type=int, default=256, help="completion tokens (fixed length)")
    p.add_argument("--visual-tokens", type=int, default=None, help="visual tokens per image (default 512; tiny 64)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="prompt tokens besides the image's (default 300; tiny 100)")
    p.add_argument("--train", choices=TRAIN_MODES, default="auto")
    p.add_argument("--beta", type=float, default=0.04, help="KL coefficient (R1-V's 0.04: a reference pass runs)")
    p.add_argument("--config", type=Path, help="YAML recipe to start from (default: suzak's defaults)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="config overrides applied last, e.g. server.gpu_memory_utilization=0.4")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("SUZAK_BENCH_DIR", "/tmp/suzak-bench")),
                   help="folder for model folders and run outputs")
    p.add_argument("--compare-unshared", type=int, default=0, metavar="N",
                   help="then N more timed steps with grpo.share_prompt off, on the same server and learner")
    p.add_argument("--peak-flops", type=float, default=H100_BF16_PEAK, help="for MFU (default H100 dense bf16)")
    args = p.parse_args(argv)
    tiny = args.arch.startswith("tiny")
    args.factor = arch_factor(args.arch)
    args.visual_tokens = args.visual_tokens or (64 if tiny else 512)
    args.text_tokens = args.text_tokens or (100 if tiny else 300)
    if min(args.steps, args.prompts, args.completion, args.visual_tokens) < 1 or args.warmup < 0 or args.G < 2:
        p.error("--steps/--prompts/--completion/--visual-tokens must be >= 1, --warmup >= 0, --G >= 2")
    return args


# ----------------------------------------------------------------------------------------------- config


def train_overrides(mode: str) -> list[str]:
    """Config keys of a training setting (gradient checkpointing always: activations of 1k-token rows)."""
    common = ["model.gradient_checkpointing=true"]
    # Full-parameter settings hold the optimizer in host RAM when the card is too small (optim.offload auto);
    # the server then sleeps through the update so that the learner's gradients and activations fit.
    full = ["model.lora.enabled=false", "server.sleep_during_update=true"]
    return common + {
        "full": full + ["model.freeze_vision=false"],
        "frozen_vision": full + ["model.freeze_vision=true"],
        "lora": ["model.lora.enabled=true", "model.freeze_vision=true"],
    }[mode]


def base_overrides(args, model_dir: Path, run_dir: Path, on_cuda: bool) -> list[str]:
    """The reference step's shape and the one-GPU server, before the training setting and --set."""
    rollouts = args.prompts * args.G
    area = args.factor ** 2  # one merged visual token: 28x28 px (Qwen2.5-VL) or 32x32 (Qwen3-VL)
    max_len = args.visual_tokens + args.text_tokens + args.completion + 256  # slack for the chat template
    over = [
        f"out_dir={run_dir}", f"model.name_or_path={model_dir}", "data.task=clevr_count", "sft.enabled=false",
        f"model.max_pixels={args.visual_tokens * area}", f"model.min_pixels={min(4, args.visual_tokens) * area}",
        f"grpo.steps={args.warmup + args.steps}", f"grpo.prompts_per_step={args.prompts}",
        f"grpo.num_generations={args.G}", f"grpo.max_completion_tokens={args.completion}", f"grpo.beta={args.beta}",
        "grpo.ignore_eos=true",
        f"server.max_model_len={max(1024, max_len)}", f"server.max_num_seqs={min(1024, rollouts)}",
        "checkpoint.resume=false", "logging.progress=false",
    ]
    if on_cuda:
        # IPC: the learner sits on the server's GPU. The server's share stays the config's (default 0.3).
        over.append("server.transport=ipc")
    else:
        # vLLM on CPU: the share is of RAM, and compiling costs more start-up than it saves on a tiny model.
        over += ["server.transport=files", "server.gpu_memory_utilization=0.1", "server.enforce_eager=true"]
    return over


def choose_training(args, base: list[str], device_total: float | None) -> tuple[str, dict | None]:
    """(mode, estimate summary): --train, or for auto the first setting whose memory estimate fits the card."""
    from suzak.config import load_config
    from trainer.memory import count_parameters, estimate_memory

    candidates = [args.train] if args.train != "auto" else ["full", "frozen_vision", "lora"]
    estimates = {}
    for mode in candidates:
        cfg = load_config(args.config, base + train_overrides(mode) + args.overrides)
        counts = count_parameters(cfg.model.name_or_path, cfg.model.lora)
        est = estimate_memory(cfg, counts, device_total_bytes=device_total)
        estimates[mode] = round(est.total / GiB, 1)
        print(f"[bench] memory estimate for --train {mode}: {est.total / GiB:.1f} GiB"
              + (f" of {device_total / GiB:.1f} GiB" if device_total else "") + f"\n{est.summary()}", flush=True)
        if est.fits or device_total is None or mode == candidates[-1]:
            return mode, {"chosen": mode, "estimate_gib": estimates, "fits": est.fits}
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------- data


def image_size(visual_tokens: int, factor: int = 28) -> tuple[int, int]:
    """(width, height), multiples of `factor`, of an image that is exactly `visual_tokens` merged tokens
    (512 at 28 px: 896x448; at 32 px: 1024x512)."""
    rows = max(d for d in range(1, int(visual_tokens**0.5) + 1) if visual_tokens % d == 0)
    return factor * (visual_tokens // rows), factor * rows


def scene_image(rng: random.Random, width: int, height: int):
    """A CLEVR-like picture: a gradient floor and some shapes. Smooth like a render, so its PNG data URL has a
    realistic size (noise would make every PNG ~1 MB and inflate the prepare phase)."""
    from PIL import Image, ImageDraw

    img = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(3, 10)):
        x, y, r = rng.randrange(width), rng.randrange(height), rng.randint(height // 20, height // 6)
        color = tuple(rng.randrange(256) for _ in range(3))
        box = (x - r, y - r, x + r, y + r)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=color)
    return img


def text_tokens(processor, task, question: str) -> int:
    """Prompt tokens other than the image's visual tokens (the placeholder itself not counted)."""
    from suzak.prompts import hf_messages

    messages = task.messages(_example("x", question, None), prompt="train", system=False, image_ref="x")
    text = processor.apply_chat_template(hf_messages(messages), tokenize=False, add_generation_prompt=True)
    return len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) - 1


def padded_question(processor, task, prefix: str, target: int) -> str:
    """`prefix` plus filler text, as long as makes the prompt's text part reach `target` tokens."""
    filler = FILLER * (1 + target // 8)
    lo, hi = 0, len(filler)
    while lo < hi:  # the shortest filler whose prompt reaches the target
        mid = (lo + hi) // 2
        if text_tokens(processor, task, prefix + filler[:mid]) >= target:
            hi = mid
        else:
            lo = mid + 1
    return prefix + filler[:lo]


def _example(ident: str, question: str, image):
    from suzak.tasks import Example

    return Example(id=ident, problem=question, answer="3", image=image)


def make_examples(args, processor, task) -> tuple[list, dict]:
    width, height = image_size(args.visual_tokens, args.factor)
    rng = random.Random(0)
    examples = []
    for i in range(args.prompts):
        question = padded_question(processor, task, f"Scene {i:04d}. ", args.text_tokens)
        examples.append(_example(f"bench-{i}", question, scene_image(rng, width, height)))
    shape = {"image_size": [width, height], "visual_tokens": args.visual_tokens,
             "text_tokens": text_tokens(processor, task, examples[0].problem)}
    return examples, shape


class RandomRewardTask:
    """The clevr_count task with random rewards: the learner's own scoring and advantage code still runs."""

    def __init__(self, task, seed: int = 0):
        self._task, self._rng = task, random.Random(seed)

    def __getattr__(self, name):
        return getattr(self._task, name)

    def reward_functions(self, mode: str = "guarded") -> dict:
        return {"accuracy": lambda completion, answer: float(self._rng.random() < 0.5),
                "format": lambda completion, answer: self._rng.random()}


# ----------------------------------------------------------------------------------------------- learner side


class TokenCountingClient:
    """RolloutClient that counts the prompt and completion tokens of the last answer (the record's token check)."""

    def __init__(self, client):
        self._client = client
        self.last_tokens = {"prompt": 0, "completion": 0}

    def __getattr__(self, name):
        return getattr(self._client, name)

    def generate(self, req):
        resp = self._client.generate(req)
        self.last_tokens = {
            "prompt": sum(len(r.prompt_token_ids) * len(r.completions) for r in resp.results),
            "completion": sum(len(c.token_ids) for r in resp.results for c in r.completions)}
        return resp


def build_learner(cfg, task, examples, client, out_dir: Path):
    """GRPOLearner whose phases are CUDA-synchronised and whose frozen log-prob passes (reference / old policy) are
    timed on their own."""
    from trainer.grpo import GRPOLearner

    class BenchLearner(GRPOLearner):
        logprob_seconds = 0.0

        def _frozen_logps(self, *a, **kw):
            cuda_sync()
            start = time.perf_counter()
            out = super()._frozen_logps(*a, **kw)
            cuda_sync()
            self.logprob_seconds += time.perf_counter() - start
            return out

    return BenchLearner(cfg, task, examples, client, out_dir, sync_phases=True)


# ----------------------------------------------------------------------------------------------- GPU memory


def _host_used_mib() -> float:
    """MemTotal - MemAvailable of the host, MiB (the offloaded optimizer's share shows here)."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0])
    return (info["MemTotal"] - info["MemAvailable"]) / 1024


class GpuMemorySampler:
    """Polls nvidia-smi: peak MiB of the server's process tree, of this process, and of the whole GPU."""

    def __init__(self, server_pid: int, interval_s: float = 1.0):
        self.server_pid, self.interval_s = server_pid, interval_s
        self.peak = {"server": 0.0, "learner": 0.0, "gpu_used": 0.0}
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> GpuMemorySampler:
        try:
            self.sample()
        except Exception as e:  # noqa: BLE001 - no nvidia-smi (CPU) or no permission: report, keep running
            self.error = f"{type(e).__name__}: {e}"
            return self
        self._thread.start()
        return self

    def sample(self) -> None:
        from vllm_server.app import descendants

        apps = {int(pid): float(mib) for pid, mib in nvidia_smi("--query-compute-apps=pid,used_memory")
                if pid.isdigit() and mib.replace(".", "").isdigit()}
        tree = {self.server_pid, *descendants(self.server_pid)}  # vLLM's engine core and workers are its children
        used = sum(float(row[0]) for row in nvidia_smi("--query-gpu=memory.used"))
        now = {"server": sum(m for p, m in apps.items() if p in tree), "learner": apps.get(os.getpid(), 0.0),
               "gpu_used": used, "host_used": _host_used_mib()}
        self.peak = {k: max(self.peak.get(k, 0.0), v) for k, v in now.items()}

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception as e:  # noqa: BLE001
                self.error = f"{type(e).__name__}: {e}"

    def stop(self) -> dict:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        out = {(f"{k}_gib" if k.startswith("host") else f"{k}_nvidia_smi_gib"): round(v / 1024, 2)
               for k, v in self.peak.items()}
        if self.error:
            out["nvidia_smi_error"] = self.error
        elif not self.peak["server"]:
            out["nvidia_smi_note"] = "no server pid in nvidia-smi (PID namespace?): server = gpu_used - learner"
        return out


# ----------------------------------------------------------------------------------------------- the run


def _step_record(metrics: dict, seconds: float, tokens: dict, logprob_s: float) -> dict:
    phases = {k.removeprefix("time/"): round(v, 3) for k, v in metrics.items() if k.startswith("time/")}
    phases["logprobs"] = round(logprob_s, 3)  # inside "update": the reference / old-policy passes
    total = tokens["prompt"] + tokens["completion"]
    return {"step_s": round(seconds, 3), "tokens": total, "prompt_tokens": tokens["prompt"],
            "completion_tokens": tokens["completion"], "tokens_per_s_per_gpu": round(total / seconds, 1),
            "phases_s": phases, "completion_len": metrics.get("completion_len"),
            "rejected_vision_tokens": metrics.get("rejected_vision_tokens"),
            "loss": metrics.get("loss"), "grad_norm": metrics.get("grad_norm"),
            # server vs learner log-probs of the same tokens (issue 9: investigate a bf16 mean above 0.05)
            "logprob_gap_mean": metrics.get("logprob_gap/mean"), "logprob_gap_max": metrics.get("logprob_gap/max"),
            "learner_tokens_per_s": metrics.get("tokens_per_s")}


def _mean(records: list[dict], key: str) -> float:
    return sum(r[key] for r in records) / len(records)


def summarize(args, timed: list[dict], n_params: int, trainable: int, on_cuda: bool) -> dict:
    tokens = _mean(timed, "tokens")
    step_s = _mean(timed, "step_s")
    phases = {k: round(sum(r["phases_s"].get(k, 0.0) for r in timed) / len(timed), 3)
              for k in timed[0]["phases_s"]}
    flops = 6 * n_params * tokens  # 6ND for the policy's forward + backward (PERF-FLOOR's convention)
    learner_s = phases.get("update", 0.0)
    return {
        "tokens_per_step": round(tokens), "step_s": round(step_s, 3),
        "tokens_per_s_per_gpu": round(tokens / step_s, 1), "phases_s": phases,
        # MFU against a GPU's peak means nothing for a CPU run.
        "mfu_learner": round(flops / max(learner_s, 1e-9) / args.peak_flops, 4) if on_cuda else None,
        "mfu_step": round(flops / step_s / args.peak_flops, 4) if on_cuda else None,
        "params": n_params, "trainable_params": trainable,
        "completion_len_mean": _mean(timed, "completion_len"),
    }


def _device_info() -> tuple[str, float | None]:
    import torch

    if not torch.cuda.is_available():
        return "cpu", None
    props = torch.cuda.get_device_properties(0)
    return props.name, float(props.total_memory)


def prepare(args) -> dict:
    """Model folder, training setting and resolved config of this run (nothing started yet)."""
    from suzak.config import load_config, save_config

    device_name, device_total = _device_info()
    model_dir = make_arch(args.work / "models" / args.arch, args.arch)
    run_dir = args.work / "runs" / f"{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = base_overrides(args, model_dir, run_dir, device_total is not None)
    mode, estimate = choose_training(args, base, device_total)
    cfg = load_config(args.config, base + train_overrides(mode) + args.overrides)
    save_config(cfg, run_dir, name="bench_config.yaml")
    print(f"[bench] {args.arch} ({model_dir}), --train {mode}, on {device_name}; run folder {run_dir}", flush=True)
    return {"cfg": cfg, "mode": mode, "estimate": estimate, "model_dir": model_dir, "run_dir": run_dir,
            "device_name": device_name, "device_total": device_total}


def time_steps(args, learner, client, *, warmup: int | None = None, steps: int | None = None,
               sampler: GpuMemorySampler | None = None) -> list[dict]:
    """--warmup then --steps learner steps, each timed end to end; peak memory counts the timed steps only.
    Each step's line also shows the peak card memory so far, so a run cut short still tells it."""
    import torch

    warmup = args.warmup if warmup is None else warmup
    steps = args.steps if steps is None else steps
    records = []
    for i in range(warmup + steps):
        if i == warmup and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        learner.logprob_seconds = 0.0
        cuda_sync()
        start = time.perf_counter()
        metrics = learner.step()
        cuda_sync()
        record = _step_record(metrics, time.perf_counter() - start, client.last_tokens, learner.logprob_seconds)
        if getattr(learner.optimizer, "last_step_s", None) is not None:
            record["phases_s"]["host_optimizer"] = round(learner.optimizer.last_step_s, 3)  # inside "update"
        record["warmup"] = i < warmup
        record["share_prompt"] = learner.share_prompt
        records.append(record)
        print(f"[bench] step {i + 1}/{warmup + steps}{' (warm-up)' if record['warmup'] else ''}"
              f"{'' if learner.share_prompt else ' (unshared)'}: "
              f"{record['step_s']:.1f} s, {record['tokens_per_s_per_gpu']:.0f} tokens/s/GPU, "
              f"phases {record['phases_s']}{_peak_so_far(sampler)}", flush=True)
    return records


def _peak_so_far(sampler: GpuMemorySampler | None) -> str:
    import torch

    if sampler is None or not torch.cuda.is_available():
        return ""
    try:
        sampler.sample()
    except Exception:  # noqa: BLE001 - the sampler's thread records the error
        pass
    peak = {k: round(v / 1024, 1) for k, v in sampler.peak.items()}
    return (f", peak GiB so far: card {peak['gpu_used']}, server {peak['server']}, learner {peak['learner']} "
            f"(torch max allocated {torch.cuda.max_memory_allocated() / GiB:.1f}), host {peak.get('host_used')}")


LEARNER_MODULES = ["torch", "transformers", "accelerate", "peft", "httpx", "pydantic", "yaml", "PIL", "safetensors"]
SERVER_MODULES = ["vllm", "fastapi", "uvicorn"]


def preflight(modules: list[str]) -> None:
    """Name every missing module at once, before minutes of start-up (the device has no package index)."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SuzakError(f"missing Python modules: {', '.join(missing)}. Install them, or put their wheels on "
                         "PYTHONPATH as bench/README.md describes for the device")


RUN_TOKEN_ENV = "SUZAK_BENCH_RUN"


def server_env(model_dir: Path, token: str) -> dict:
    """`python -m suzak serve` must import this checkout from any working directory, and a weight-less folder
    gets vLLM's random (dummy) weights. The token marks the server's whole process tree (see reap_server)."""
    env = {"PYTHONPATH": checkout_pythonpath(), RUN_TOKEN_ENV: token}
    if not has_weights(model_dir):
        env["SUZAK_VLLM_ENGINE_ARGS"] = json.dumps({"load_format": "dummy"})
    return env


def run(args) -> dict:
    from suzak.models import load_processor
    from suzak.tasks import get_task
    from vllm_server.client import LocalServer

    preflight(LEARNER_MODULES + SERVER_MODULES)
    install_random_init_loader()
    ctx = prepare(args)
    cfg = ctx["cfg"]
    task = RandomRewardTask(get_task(cfg.data.task), seed=cfg.seed)
    processor = load_processor(ctx["model_dir"], min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)
    examples, ctx["shape"] = make_examples(args, processor, task)

    # The server starts first: vLLM checks that its share of the card is free and keeps it.
    token = f"{os.getpid()}-{time.time_ns()}"
    try:
        t0 = time.perf_counter()
        with LocalServer(cfg, ctx["run_dir"] / "server.log", env=server_env(ctx["model_dir"], token),
                         timeout_s=1800) as server:
            startup = {"server_start_s": round(time.perf_counter() - t0, 1)}
            result = _learner_part(args, ctx, task, examples, server, startup)
    finally:
        reap_server(token)
    return result


def _learner_part(args, ctx, task, examples, server, startup) -> dict:
    from vllm_server.client import RolloutClient

    cfg, on_cuda = ctx["cfg"], ctx["device_total"] is not None
    sampler = GpuMemorySampler(server.process.pid).start() if on_cuda else None
    client = TokenCountingClient(RolloutClient(server.url, timeout=cfg.server.request_timeout_s))
    try:
        t0 = time.perf_counter()
        learner = build_learner(cfg, task, examples, client, ctx["run_dir"] / "grpo")
        startup["learner_build_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        push = learner.push_weights()  # what GRPOLearner.run does first: the server then serves these weights
        startup["initial_push_s"] = round(time.perf_counter() - t0, 2)
        records = time_steps(args, learner, client, sampler=sampler)
        if args.compare_unshared and learner.share_prompt:
            learner.share_prompt = False  # the baseline: one row per rollout
            records += time_steps(args, learner, client, warmup=0, steps=args.compare_unshared, sampler=sampler)
        params = model_params(learner.policy.model)
        ctx["offload"] = learner.cfg.grpo.optim.offload  # as resolved for this card (auto -> cpu or gpu)
    finally:
        memory = sampler.stop() if sampler is not None else {}
        client.close()
    memory.update(_torch_memory(ctx["device_total"]), estimate=ctx["estimate"])
    return build_result(args, ctx, records, params, ctx["shape"], memory, startup, push)


def reap_server(token: str, grace_s: float = 15.0) -> None:
    """End what is left of this run's server: stopping `suzak serve` while vLLM is still loading leaves its
    EngineCore process orphaned, holding its memory (seen on CPU). Only processes carrying this run's token."""
    import signal

    def ours() -> list[int]:
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            try:
                if f"{RUN_TOKEN_ENV}={token}".encode() in environ.read_bytes().split(b"\0"):
                    pids.append(int(environ.parent.name))
            except (OSError, ValueError):
                continue
        return [pid for pid in pids if pid != os.getpid()]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ours()
        if not pids:
            return
        print(f"[bench] ending leftover server processes {pids} ({sig.name})", flush=True)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while ours() and time.monotonic() < deadline:
            time.sleep(0.5)


def model_params(model) -> tuple[int, int]:
    """(trainable, base): base counts every weight but LoRA adapters, the N of MFU's 6N (tied weights once)."""
    named = list(model.named_parameters())
    return (sum(p.numel() for _, p in named if p.requires_grad),
            sum(p.numel() for n, p in named if "lora_" not in n))


def _torch_memory(device_total: float | None) -> dict:
    import torch

    if device_total is None:
        return {}
    return {"learner_max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
            "learner_max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2),
            "device_total_gib": round(device_total / GiB, 2)}


def build_result(args, ctx, records, params, shape, memory, startup, push) -> dict:
    cfg, model_dir = ctx["cfg"], ctx["model_dir"]
    g, s, m = cfg.grpo, cfg.server, cfg.model
    timed = [r for r in records if not r["warmup"] and r["share_prompt"] == g.share_prompt]
    baseline = [r for r in records if not r["warmup"] and r["share_prompt"] != g.share_prompt]
    trainable, total = params
    on_cuda = ctx["device_total"] is not None
    result = {"bench": "grpo_step", "arch": args.arch, "device": ctx["device_name"], "gpus": 1,
              "train": ctx["mode"], **summarize(args, timed, total, trainable, on_cuda)}
    if baseline:
        result["unshared"] = summarize(args, baseline, total, trainable, on_cuda)
    rollouts = args.prompts * args.G
    result.update(
        shape={"prompts": args.prompts, "G": args.G, "rollouts": rollouts, "completion_tokens": args.completion,
               **shape, "prompt_tokens": round(timed[0]["prompt_tokens"] / rollouts)},
        memory=memory, startup=startup,
        initial_push={k: v for k, v in push.items() if isinstance(v, (int, float, str))},
        setting={"lora": m.lora.enabled, "gradient_checkpointing": m.gradient_checkpointing,
                 "freeze_vision": m.freeze_vision, "beta": g.beta, "loss_type": g.loss_type,
                 "micro_batch_tokens": g.micro_batch_tokens, "optimizer": g.optim.optimizer,
                 "optimizer_offload": ctx.get("offload"), "sleep_during_update": s.sleep_during_update,
                 "sleep_level": s.sleep_level,
                 "share_prompt": g.share_prompt,
                 "transport": s.transport, "gpu_memory_utilization": s.gpu_memory_utilization,
                 "max_num_seqs": s.max_num_seqs, "enable_prefix_caching": s.enable_prefix_caching,
                 "weights": "saved random" if has_weights(model_dir) else "random: vLLM dummy, learner random init",
                 "ignore_eos": True, "overrides": args.overrides},
        steps=records, versions=versions(), run_dir=str(ctx["run_dir"]))
    if on_cuda:  # FLOPs as computed (shared rows, recompute, reference pass, generation), beside verl's 6N credit
        dims = Dims.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
        result.update(real_mfu(dims, result, args.peak_flops))
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_and_emit("bench", lambda: run(args), f"grpo_step_{args.arch}.json")


if __name__ == "__main__":
    sys.exit(main())

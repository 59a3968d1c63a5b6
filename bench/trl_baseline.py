"""Baseline: TRL 1.16's GRPOTrainer on the same reference step as bench/grpo_step.py, in its fastest one-GPU mode.

    python -m bench.trl_baseline --arch 7b                        # H100: vLLM colocate, 7B shapes, LoRA
    python -m bench.trl_baseline --arch 3b --train lora
    python -m bench.trl_baseline --arch tiny --prompts 2 --G 2 --completion 8 --warmup 0    # CPU smoke (no vLLM)

Same model folder (bench/make_arch.py, random weights), same 64 prompts x G=8 with one 896x448 image (512 visual
tokens) and ~300 other prompt tokens each (bench/grpo_step.make_examples), 256 completion tokens with EOS ignored
(vLLM SamplingParams(ignore_eos=True) through GRPOConfig.generation_kwargs), random rewards, the same training
setting (--train auto picks what grpo_step.py picks) and beta. TRL runs vLLM inside the training process
(use_vllm=True, vllm_mode="colocate", vllm_gpu_memory_utilization 0.3 like suzak's server) and syncs the weights
into it before every generation. One optimizer step = one generation of all 512 rollouts (steps_per_generation =
gradient_accumulation_steps = rollouts / --micro-batch). --warmup steps run first, then --steps are timed from
one optimizer step's end to the next's.

Each attempt runs in a child process (a failed vLLM or an OOM leaves the GPU dirty). When one fails, the reason
is printed and the closest setting that may work is tried next: an out-of-memory goes to --train lora, a vLLM
colocate failure to transformers generation (use_vllm=False). On CPU the only setting is use_vllm=False
(colocate needs vLLM on a GPU). Prints `RESULT {json}` (with every attempt) and writes $OUT/trl_baseline_<arch>.json.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from bench import grpo_step
from bench.common import GiB, checkout_pythonpath, cuda_sync, exit_on_sigterm, nvidia_smi, run_and_emit
from bench.make_arch import ARCH_CHOICES, build_random_model, has_weights, make_arch

LIGHTER = {"full": "frozen_vision", "frozen_vision": "lora"}
TRL_MODULES = ["torch", "transformers", "accelerate", "peft", "trl", "datasets", "yaml", "PIL"]
ATTEMPT_PREFIX = "ATTEMPT_RESULT "  # a child's answer; only the orchestrator prints RESULT


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="TRL GRPOTrainer baseline on the reference GRPO step.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="7b")
    p.add_argument("--steps", type=int, default=1, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=1, help="untimed optimizer steps first")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--G", type=int, default=8)
    p.add_argument("--completion", type=int, default=256)
    p.add_argument("--visual-tokens", type=int, default=None)
    p.add_argument("--text-tokens", type=int, default=None)
    p.add_argument("--train", choices=grpo_step.TRAIN_MODES, default="auto")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--micro-batch", type=int, default=16,
                   help="rollouts per forward/backward (per_device_train_batch_size); ~17k tokens like suzak's 16384")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--no-fallback", action="store_true", help="stop after the first failed attempt")
    p.add_argument("--bf16-weights", action="store_true",
                   help="full/frozen_vision: plain bf16 weights and AdamW states (TRL's one-card way to fit 7B; "
                        "loses updates at lr 1e-6) instead of fp32 masters under bf16 autocast")
    p.add_argument("--sleep", action="store_true", help="vllm_enable_sleep_mode: vLLM sleeps through the update")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("SUZAK_BENCH_DIR", "/tmp/suzak-bench")))
    p.add_argument("--peak-flops", type=float, default=grpo_step.H100_BF16_PEAK)
    p.add_argument("--attempt", help=argparse.SUPPRESS)  # JSON: run one attempt in this process (child)
    args = p.parse_args(argv)
    tiny = args.arch.startswith("tiny")
    args.visual_tokens = args.visual_tokens or (64 if tiny else 512)
    args.text_tokens = args.text_tokens or (100 if tiny else 300)
    args.config, args.overrides = None, []  # what grpo_step.choose_training reads
    rollouts = args.prompts * args.G
    args.micro_batch = min(args.micro_batch, rollouts)
    if rollouts % args.micro_batch:
        p.error(f"--micro-batch {args.micro_batch} must divide prompts x G = {rollouts}")
    return args


# ----------------------------------------------------------------------------------------------- one attempt


class StepClock:
    """A TrainerCallback recording when each optimizer step ends and how many tokens TRL counted by then."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kw):
                clock.marks.append((time.perf_counter(), state.num_input_tokens_seen))

            def on_step_end(self, args, state, control, **kw):
                cuda_sync()
                clock.marks.append((time.perf_counter(), state.num_input_tokens_seen))

            def on_log(self, args, state, control, logs=None, **kw):
                clock.logs.append(dict(logs or {}))

        self.marks: list[tuple[float, int]] = []
        self.logs: list[dict] = []
        self.callback = Callback()

    def steps(self) -> list[dict]:
        return [{"step_s": round(t1 - t0, 3), "tokens": int(n1 - n0)}
                for (t0, n0), (t1, n1) in zip(self.marks, self.marks[1:])]


def _patch_trl_for_random_weights(folder: Path) -> None:
    """A weight-less folder: TRL's vLLM gets load_format=dummy (TRL pushes the policy's weights into it before the
    first generation anyway), and TRL's reference model is random-initialised instead of read from disk."""
    if has_weights(folder):
        return
    import trl.generation.vllm_generation as vg
    import trl.trainer.grpo_trainer as gt

    llm_class = vg.LLM

    def dummy_llm(*a, **kw):
        kw.setdefault("load_format", "dummy")
        return llm_class(*a, **kw)

    def random_model(model_id, architecture=None, **kw):
        import torch

        dtype = kw.get("dtype", torch.float32)
        dtype = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
        return build_random_model(model_id, dtype=dtype, device=None,  # the GPU when there is one
                                  attn_implementation=kw.get("attn_implementation") or "sdpa")

    vg.LLM = dummy_llm
    gt.create_model_from_path = random_model


GENERATIONS: list[dict] = []
"""What TRL's colocated vLLM was asked and answered, per generate call (its completion lengths are reported)."""


def collapse_expanded_images(prompt: dict, image_token_id: int) -> tuple[dict, int]:
    """A TRL vLLM prompt with each run of image-pad tokens cut back to one pad, and how many pads were dropped.

    TRL 1.16 (vllm_mode colocate) hands vLLM `prompt_token_ids` in which each image is already expanded into its
    N pads, together with the image. vLLM's Qwen2-VL prompt update (vllm/model_executor/models/qwen2_vl.py: target
    `[<|image_pad|>]`, one match per image) then expands the first pad into N again and keeps the other N - 1 as
    text, a prompt the trainer never scores (bench/RESULTS.md, issue 15). With one pad per image vLLM builds the
    trainer's prompt exactly (tests/unit/test_bench_smoke.py checks both with vLLM's own processor)."""
    ids = prompt.get("prompt_token_ids") if isinstance(prompt, dict) else None
    if ids is None or "multi_modal_data" not in prompt:
        return prompt, 0
    kept = [t for i, t in enumerate(ids) if not (t == image_token_id and i > 0 and ids[i - 1] == image_token_id)]
    return {**prompt, "prompt_token_ids": kept}, len(ids) - len(kept)


def _probe_trl_vllm_generate(image_token_id: int) -> None:
    """Record prompt and completion lengths, finish reasons and max_tokens of every vLLM generate TRL makes (a run
    on the H100 logged 1-token completions without saying why), after collapse_expanded_images."""
    import trl.generation.vllm_generation as vg

    llm_class = vg.LLM

    def probed_llm(*a, **kw):
        llm = llm_class(*a, **kw)
        generate = llm.generate

        def probed_generate(prompts, sampling_params=None, *ga, **gkw):
            fixed = [collapse_expanded_images(p, image_token_id) for p in prompts]
            prompts = [p for p, _ in fixed]
            outputs = generate(prompts, sampling_params, *ga, **gkw)
            params = sampling_params[0] if isinstance(sampling_params, list) else sampling_params
            record = {"requests": len(outputs), "max_tokens": getattr(params, "max_tokens", None),
                      "ignore_eos": getattr(params, "ignore_eos", None), "max_model_len": kw.get("max_model_len"),
                      "image_pads_dropped_per_prompt": sorted({n for _, n in fixed})[:5],
                      "prompt_len": sorted({len(o.prompt_token_ids or []) for o in outputs})[:5],
                      "completion_len": sorted({len(c.token_ids) for o in outputs for c in o.outputs})[:5],
                      "finish": sorted({str(c.finish_reason) for o in outputs for c in o.outputs})}
            GENERATIONS.append(record)
            print(f"[trl-probe] vLLM generate: {record}", flush=True)
            return outputs

        llm.generate = probed_generate
        return llm

    vg.LLM = probed_llm


def _policy(folder: Path, mode: str, on_cuda: bool, bf16_weights: bool = False):
    """The policy as suzak's learner holds it: fp32 masters under bf16 autocast, or a bf16 base for LoRA
    (--bf16-weights: plain bf16 for every mode)."""
    from suzak.models import pick_attn_implementation

    dtype = "bfloat16" if (mode == "lora" or bf16_weights) and on_cuda else "float32"
    attn = pick_attn_implementation("auto", dtype="bfloat16" if on_cuda else "float32")
    model = build_random_model(folder, dtype=dtype, device="cuda" if on_cuda else "cpu", attn_implementation=attn)
    if mode == "frozen_vision":
        visual = model.model.visual
        for part in (visual.patch_embed, visual.blocks):
            part.requires_grad_(False)
    return model


def _lora_config():
    from peft import LoraConfig

    from suzak.config import LoraConfig as SuzakLora

    lora = SuzakLora()  # suzak's defaults: r 64, alpha 128, dropout 0.05, the LM's linear layers only
    target = r".*language_model\..*\.(" + "|".join(lora.target_modules) + r")$"
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=target,
                      bias="none", task_type="CAUSAL_LM")


def _dataset(args, processor):
    """The bench's prompts as TRL wants them: a conversational prompt and an `image` column."""
    from datasets import Dataset

    from suzak.tasks import get_task

    task = get_task("clevr_count")
    examples, shape = grpo_step.make_examples(args, processor, task)
    rows = [{"prompt": [{"role": "user", "content": task.prompt_text(e.problem, "train")}], "image": e.image}
            for e in examples]
    return Dataset.from_list(rows), shape


def _trl_config(args, attempt: dict, out_dir: Path, on_cuda: bool):
    from trl import GRPOConfig

    rollouts = args.prompts * args.G
    use_vllm = attempt["use_vllm"]
    # vLLM: ignore_eos in SamplingParams; transformers generate: the same through min_new_tokens.
    gen_kwargs = {"ignore_eos": True} if use_vllm else {"min_new_tokens": args.completion}
    return GRPOConfig(
        output_dir=str(out_dir), max_steps=args.warmup + args.steps, learning_rate=1e-6, beta=args.beta,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=rollouts // args.micro_batch,
        num_generations=args.G, max_completion_length=args.completion, temperature=0.9,
        generation_kwargs=gen_kwargs, gradient_checkpointing=True, bf16=on_cuda, use_cpu=not on_cuda,
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=args.gpu_memory_utilization,
        vllm_enable_sleep_mode=args.sleep and use_vllm,
        # Room to spare: a tight limit would cut completions short (vLLM stops a request at max_model_len).
        vllm_max_model_length=max(4096, 2 * (args.visual_tokens + args.text_tokens + args.completion)),
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0, remove_unused_columns=False)


def run_attempt(args, attempt: dict) -> dict:
    """One TRL run in this process; returns the RESULT dict."""
    import torch
    import trl
    from transformers import AutoProcessor
    from trl import GRPOTrainer

    on_cuda = torch.cuda.is_available()
    folder = make_arch(args.work / "models" / args.arch, args.arch)
    _patch_trl_for_random_weights(folder)
    processor = AutoProcessor.from_pretrained(str(folder))
    _probe_trl_vllm_generate(processor.image_token_id)
    rows, shape = _dataset(args, processor)
    mode = attempt["train"]
    model = _policy(folder, mode, on_cuda, args.bf16_weights)
    rng = random.Random(0)

    def random_reward(completions, **kwargs):
        return [rng.random() for _ in completions]

    clock = StepClock()
    out_dir = args.work / "runs" / f"trl-{args.arch}-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = GRPOTrainer(model=model, reward_funcs=random_reward, args=_trl_config(args, attempt, out_dir, on_cuda),
                          train_dataset=rows, processing_class=processor,
                          peft_config=_lora_config() if mode == "lora" else None, callbacks=[clock.callback])
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = clock.steps()
    timed = steps[args.warmup:]
    trainable, n_params = grpo_step.model_params(trainer.model)
    step_s = sum(s["step_s"] for s in timed) / len(timed)
    tokens = sum(s["tokens"] for s in timed) / len(timed)
    last = next((log for log in reversed(clock.logs) if "completions/mean_length" in log), {})
    return {
        "bench": "trl_baseline", "arch": args.arch, "trl": trl.__version__, "gpus": 1, "train": mode,
        "use_vllm": attempt["use_vllm"], "vllm_mode": "colocate" if attempt["use_vllm"] else None,
        "device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
        "tokens_per_step": round(tokens), "step_s": round(step_s, 3),
        "tokens_per_s_per_gpu": round(tokens / step_s, 1),
        "mfu_step": round(6 * n_params * tokens / step_s / args.peak_flops, 4) if on_cuda else None,
        "params": n_params, "trainable_params": trainable,
        "completion_len_mean": last.get("completions/mean_length"),
        "shape": {"prompts": args.prompts, "G": args.G, "rollouts": args.prompts * args.G,
                  "completion_tokens": args.completion, "micro_batch": args.micro_batch, **shape},
        "memory": {"max_allocated_gib": round(torch.cuda.max_memory_allocated() / GiB, 2),
                   "max_reserved_gib": round(torch.cuda.max_memory_reserved() / GiB, 2)} if on_cuda else {},
        "setting": {"beta": args.beta, "gradient_checkpointing": True, "lora": mode == "lora",
                    "freeze_vision": mode in ("lora", "frozen_vision"),
                    "gpu_memory_utilization": args.gpu_memory_utilization, "ignore_eos": True,
                    "weights": "bf16" if args.bf16_weights or mode == "lora" else "fp32 masters, bf16 autocast",
                    "vllm_sleep_mode": args.sleep,
                    "generation_kwargs": trainer.args.generation_kwargs},
        "steps": steps, "trl_step_time_s": last.get("step_time"), "vllm_generate": GENERATIONS,
    }


# ----------------------------------------------------------------------------------------------- attempts


def first_attempt(args) -> tuple[dict, str | None]:
    """(attempt, note): the requested setting, or on CPU the transformers-generation one with the reason."""
    import torch

    on_cuda = torch.cuda.is_available()
    device_total = _gpu_total_bytes() if on_cuda else None
    folder = make_arch(args.work / "models" / args.arch, args.arch)
    base = grpo_step.base_overrides(args, folder, args.work / "runs" / "trl-estimate", on_cuda)
    mode, _ = grpo_step.choose_training(args, base, device_total)
    if on_cuda:
        return {"train": mode, "use_vllm": True}, None
    return {"train": mode, "use_vllm": False}, "no CUDA GPU: TRL's vllm_mode='colocate' needs vLLM on a GPU, so " \
        "this CPU run uses transformers generation (use_vllm=False)"


def _gpu_total_bytes() -> float:
    """The card's memory, read without a CUDA context in this process (the child needs the whole card)."""
    try:
        return float(nvidia_smi("--query-gpu=memory.total")[0][0]) * 2**20
    except Exception:  # noqa: BLE001 - no nvidia-smi: ask torch
        import torch

        return float(torch.cuda.get_device_properties(0).total_memory)


def next_attempt(attempt: dict, log_tail: str) -> tuple[dict | None, str]:
    """The closest setting after a failure, and why; None when nothing closer can help."""
    if "out of memory" in log_tail.lower() or "OutOfMemoryError" in log_tail:
        lighter = LIGHTER.get(attempt["train"])
        if lighter:
            return dict(attempt, train=lighter), f"out of GPU memory with --train {attempt['train']}: trying {lighter}"
        return None, "out of GPU memory even with LoRA"
    if attempt["use_vllm"] and "vllm" in log_tail.lower():
        return dict(attempt, use_vllm=False), "vLLM colocate failed (see the traceback above): trying " \
            "transformers generation (use_vllm=False), TRL's only other one-GPU mode"
    return None, "failed for a reason no other setting avoids (see the traceback above)"


def run_child(argv: list[str], attempt: dict) -> tuple[dict | None, str]:
    """Run one attempt in a child process, echoing its output; (RESULT or None, the output's tail)."""
    cmd = [sys.executable, "-m", "bench.trl_baseline", *argv, "--attempt", json.dumps(attempt)]
    tail: collections.deque[str] = collections.deque(maxlen=300)
    result = None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env={**os.environ, "PYTHONPATH": checkout_pythonpath()})
    try:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
            if line.startswith(ATTEMPT_PREFIX):
                result = json.loads(line[len(ATTEMPT_PREFIX):])
        proc.wait()
    finally:
        if proc.poll() is None:  # interrupted (SIGTERM from `timeout`): the child and its GPU memory go too
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return (result if proc.returncode == 0 else None), "".join(tail)


def orchestrate(args, argv: list[str]) -> dict:
    grpo_step.preflight(TRL_MODULES)
    attempt, note = first_attempt(args)
    tried: list[dict] = []
    notes = [note] if note else []
    if note:
        print(f"[trl] {note}", flush=True)
    while attempt is not None:
        print(f"[trl] attempt: {attempt}", flush=True)
        result, tail = run_child(argv, attempt)
        if result is not None:
            result["attempts"] = tried + [{"setting": attempt, "ok": True}]
            result["notes"] = notes
            return result
        following, why = next_attempt(attempt, tail)
        print(f"[trl] attempt {attempt} failed: {why}", flush=True)
        tried.append({"setting": attempt, "ok": False, "why": why, "error": _last_error(tail)})
        attempt = None if args.no_fallback else following
    return {"bench": "trl_baseline", "arch": args.arch, "error": "every attempt failed", "attempts": tried,
            "notes": notes}


def _last_error(tail: str) -> str:
    lines = [line for line in tail.splitlines() if "Error" in line or "error" in line]
    return lines[-1].strip()[:500] if lines else tail.strip().splitlines()[-1][:500] if tail.strip() else ""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.attempt:
        exit_on_sigterm()
        print(ATTEMPT_PREFIX + json.dumps(run_attempt(args, json.loads(args.attempt))), flush=True)
        return 0
    return run_and_emit("trl", lambda: orchestrate(args, argv), f"trl_baseline_{args.arch}.json")


if __name__ == "__main__":
    sys.exit(main())

"""Supervised fine-tuning of the policy on (image, question) -> "<think>...</think>\\n\\n<answer> a </answer>".

    suzak train --config configs/tiny_clevr.yaml grpo.enabled=false        # SFT only
    torchrun --nproc-per-node 2 -m suzak train --config ...                 # data-parallel

    from trainer.sft import run_sft
    final = run_sft(cfg, examples, task, out_dir)                           # -> out_dir/sft/final (HF folder)

Conversation as R1-V's sft.py builds it: [system,] user = [image, prompt text], assistant = task.sft_target(ex).
Labels: with sft.mask_prompt (default) only the assistant turn is trained; otherwise R1-V's rule (every token but
padding and image placeholders). The loss is the token mean over the whole optimizer step (all micro-batches and
all processes), so grad_accum and the number of GPUs do not change what a step computes.

Data order is a seeded permutation per epoch, and a step's examples follow from the number of examples consumed
before it, so a resumed run (checkpoint.resume) sees exactly the batches the uninterrupted run would have seen;
together with the restored RNG states the losses match the uninterrupted run. Outputs: out_dir/sft/checkpoints,
out_dir/sft_metrics.jsonl, out_dir/sft/final.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from suzak.errors import SuzakError
from suzak.log import get_logger
from suzak.tasks import Example, Task

log = get_logger("sft")

IGNORE_INDEX = -100


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ============================================================================ batches


def sft_total_steps(sft_cfg, n_examples: int, world_size: int = 1) -> int:
    """Optimizer steps of the stage: sft.max_steps, else ceil(epochs * examples / global batch)."""
    if sft_cfg.max_steps is not None:
        return sft_cfg.max_steps
    per_step = sft_cfg.batch_size * sft_cfg.grad_accum * world_size
    return max(1, math.ceil(sft_cfg.epochs * n_examples / per_step))


class ExampleStream:
    """Example indices of an endless sequence of seeded per-epoch permutations; position i -> (epoch, index)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}  # keep one epoch in memory
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [self._perm(i // self.n)[i % self.n] for i in range(start, start + count)]


def micro_batch_indices(stream: ExampleStream, position: int, micro: int, rank: int, world: int,
                        batch_size: int) -> list[int]:
    """Examples of micro-batch `micro` on process `rank`, for the step starting at stream `position`.

    Micro-batch m of the step covers [m * bs * world, (m+1) * bs * world) and rank r takes its r-th slice, so
    world=2, grad_accum=1 computes exactly what world=1, grad_accum=2 computes.
    """
    start = position + micro * batch_size * world + rank * batch_size
    return stream.indices(start, batch_size)


def build_labels(input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_lengths: list[int],
                 ignore_token_ids: list[int], mask_prompt: bool) -> torch.Tensor:
    """Copy of input_ids with IGNORE_INDEX on padding, image placeholders, and (mask_prompt) the prompt tokens."""
    labels = input_ids.clone()
    labels[attention_mask == 0] = IGNORE_INDEX
    for token_id in ignore_token_ids:
        labels[input_ids == token_id] = IGNORE_INDEX
    if mask_prompt:
        for row, length in enumerate(prompt_lengths):
            labels[row, :length] = IGNORE_INDEX
    return labels


@dataclass
class SFTCollator:
    """Examples -> model inputs + labels, images through the processor (its min/max_pixels) in memory."""

    processor: object
    task: Task
    prompt: str = "train"
    system: bool = False
    mask_prompt: bool = True

    def __post_init__(self):
        tok = self.processor.tokenizer
        self.image_token = getattr(self.processor, "image_token", "<|image_pad|>")
        self.image_token_id = tok.convert_tokens_to_ids(self.image_token)
        video = getattr(self.processor, "video_token", "<|video_pad|>")
        self.ignore_ids = [i for i in (self.image_token_id, tok.convert_tokens_to_ids(video)) if i is not None]
        self.merge = int(getattr(self.processor.image_processor, "merge_size", 2))

    def texts(self, ex: Example) -> tuple[str, str]:
        """(prompt text ending with the assistant header, full conversation text)."""
        messages = self.task.messages(ex, prompt=self.prompt, system=self.system)
        prompt = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        answer = {"role": "assistant", "content": [{"type": "text", "text": self.task.sft_target(ex)}]}
        full = self.processor.apply_chat_template(messages + [answer], tokenize=False)
        if not full.startswith(prompt):
            raise SuzakError("the chat template renders the prompt differently with and without the answer, so the "
                             "prompt cannot be masked; set sft.mask_prompt=false or fix the template")
        return prompt, full

    def __call__(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        pairs = [self.texts(ex) for ex in examples]
        images = [ex.load_image() for ex in examples]
        self.processor.tokenizer.padding_side = "right"
        batch = self.processor(text=[full for _, full in pairs], images=images, padding=True, return_tensors="pt")
        lengths = self._prompt_lengths([p for p, _ in pairs], batch)
        batch["labels"] = build_labels(batch["input_ids"], batch["attention_mask"], lengths, self.ignore_ids,
                                       self.mask_prompt)
        return dict(batch)

    def _prompt_lengths(self, prompts: list[str], batch) -> list[int]:
        """Token length of each prompt, image placeholders expanded as the processor expanded them."""
        tok = self.processor.tokenizer
        per_image = (batch["image_grid_thw"].prod(-1) // self.merge**2).tolist()
        lengths, image = [], 0
        for row, prompt in enumerate(prompts):
            pieces = prompt.split(self.image_token)
            expanded = pieces[0]
            for piece in pieces[1:]:
                expanded += self.image_token * per_image[image] + piece
                image += 1
            ids = tok(expanded, add_special_tokens=False)["input_ids"]
            if batch["input_ids"][row, :len(ids)].tolist() != ids:
                raise SuzakError("prompt tokens differ from the start of the full conversation's tokens, so the "
                                 "prompt cannot be masked; set sft.mask_prompt=false")
            lengths.append(len(ids))
        return lengths


# ============================================================================ one step


def loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over labelled positions, number of them); logits only where labels are."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    length = labels.shape[1]
    targets_all = labels[:, 1:]
    labelled = targets_all != IGNORE_INDEX
    if not labelled.any():
        first = length - 1
    else:
        first = int(labelled.float().argmax(dim=1)[labelled.any(dim=1)].min())  # first predicting position
    keep = length - first  # positions first .. length-1 (the last one predicts nothing)
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits[:, :-1]
    targets = targets_all[:, first:]
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                         ignore_index=IGNORE_INDEX, reduction="sum")
    return ce, int(labelled.sum())


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


class SFTStepper:
    """One optimizer step: collate the step's micro-batches, token-mean loss across them and all processes."""

    def __init__(self, accelerator, model, optimizer, scheduler, collator: SFTCollator, examples: list[Example],
                 sft_cfg, seed: int):
        self.acc, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.collator, self.examples, self.cfg = collator, examples, sft_cfg
        self.stream = ExampleStream(len(examples), seed)

    @property
    def global_batch(self) -> int:
        return self.cfg.batch_size * self.cfg.grad_accum * self.acc.num_processes

    def step(self, position: int) -> dict[str, float]:
        from trainer.distributed import all_reduce_sum, micro_batch_context
        from trainer.rollouts import one_intra_op_thread

        acc, cfg = self.acc, self.cfg
        start = time.perf_counter()
        with one_intra_op_thread():
            batches = [self.collator([self.examples[i] for i in micro_batch_indices(
                self.stream, position, m, acc.process_index, acc.num_processes, cfg.batch_size)])
                for m in range(cfg.grad_accum)]
        local_labels = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        global_labels = all_reduce_sum(local_labels)
        if global_labels == 0:
            raise SuzakError("an SFT step has no labelled tokens (every answer was masked or truncated)")
        lr = self.scheduler.get_last_lr()[0]
        ce_total, tokens = 0.0, 0
        for m, batch in enumerate(batches):
            batch = _to_device(batch, acc.device)
            tokens += int(batch["attention_mask"].sum())
            with micro_batch_context(acc, self.model, last=m == len(batches) - 1):
                with acc.autocast():
                    ce, _ = loss_sum(self.model, batch)
                # Gradient all-reduce averages over processes; * world turns that into the global token mean.
                acc.backward(ce * (acc.num_processes / global_labels))
            ce_total += float(ce.detach())
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - start
        all_tokens = all_reduce_sum(tokens)
        return {"loss": all_reduce_sum(ce_total) / global_labels, "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "label_tokens": int(global_labels), "tokens_per_s": all_tokens / max(seconds, 1e-9),
                "time/step": seconds}


# ============================================================================ the stage


def _export(acc, policy, model, final: Path) -> None:
    from trainer.distributed import is_sharded
    from trainer.export import export_hf

    acc.wait_for_everyone()
    state_dict = acc.get_state_dict(model) if is_sharded(acc) else None  # collective gather of the shards
    if acc.is_main_process:
        policy.model = acc.unwrap_model(model)
        export_hf(policy, final, state_dict=state_dict)
    acc.wait_for_everyone()


def run_sft(cfg, examples: list[Example], task: Task, out_dir) -> Path:
    """Train the SFT stage (resuming from out_dir/sft/checkpoints when checkpoint.resume); export out_dir/sft/final."""
    from trainer.checkpoint import CheckpointManager
    from trainer.distributed import make_accelerator
    from trainer.memory import learner_device, resolve_offload
    from trainer.optim import build_optimizer
    from trainer.policy import load_policy, prepare_for_training
    from trainer.monitor import Monitor

    if not examples:
        raise SuzakError("SFT got no examples; check data.source / data.limit")
    out = Path(out_dir)
    stage_dir, final = out / "sft", out / "sft" / "final"
    set_seed(cfg.seed)
    cfg = resolve_offload(cfg, "sft", learner_device())
    acc = make_accelerator(cfg, cfg.sft.optim)
    total = sft_total_steps(cfg.sft, len(examples), acc.num_processes)
    policy = load_policy(cfg, acc.device, stage="sft")
    optimizer, scheduler = build_optimizer(policy.model, cfg.sft.optim, total, offload=policy.offload,
                                           momentum_dtype=policy.momentum_dtype)
    model, optimizer = prepare_for_training(acc, policy.model, optimizer)
    # Ranks share the init (same seed) but not dropout masks.
    set_seed(cfg.seed + 7919 * acc.process_index)

    collator = SFTCollator(policy.processor, task, prompt=cfg.data.train_prompt, system=cfg.data.system_prompt,
                           mask_prompt=cfg.sft.mask_prompt)
    stepper = SFTStepper(acc, model, optimizer, scheduler, collator, examples, cfg.sft, cfg.seed)
    ckpt = CheckpointManager(stage_dir, cfg.checkpoint.keep_last, accelerator=acc)
    step, position = 0, 0
    latest = ckpt.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        extra = ckpt.load(latest, acc.unwrap_model(model), optimizer, scheduler)
        step, position = extra["step"], extra["examples_seen"]
        if acc.is_main_process:
            log.info(f"resumed from {latest} (step {step}/{total})")

    def save() -> None:
        ckpt.save(step, acc.unwrap_model(model), optimizer, scheduler,
                  {"examples_seen": position, "epoch": position / len(examples), "total_steps": total})

    monitor = Monitor(out, cfg.logging, total, "sft", config=cfg.model_dump(mode="json"))
    saved = step
    try:
        while step < total:
            metrics = stepper.step(position)
            step, position = step + 1, position + stepper.global_batch
            metrics["epoch"] = position / len(examples)
            monitor.log(step, metrics)
            if step % cfg.checkpoint.every_steps == 0 or step == total:
                save()
                saved = step
    except KeyboardInterrupt:
        # One process: keep the finished steps (a multi-process save could wait on a rank that is gone).
        if acc.num_processes == 1 and step > saved:
            log.info(f"interrupted at step {step}: saving a checkpoint")
            save()
        raise
    finally:
        monitor.close()
    _export(acc, policy, model, final)
    return final

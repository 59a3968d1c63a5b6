"""The GRPO learner: rollouts from the server, rewards, group advantages, policy update, weight push.

    suzak train --stages grpo                    # as part of the pipeline (trainer/pipeline.py)
    torchrun --nproc-per-node 2 -m suzak train --config configs/qwen25vl_3b_clevr.yaml --stages grpo

One step reads top to bottom in `GRPOLearner.step`: sample prompts -> client.generate (HTTP) -> rewards (task) ->
advantages -> loss and update -> weight push (transport) -> the server serves policy version + 1.
Each rank samples its own prompts and keeps whole groups, so advantages need no communication; DDP (through
accelerate) averages gradients; rank 0 pushes the weights.
"""

from __future__ import annotations

import math
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from suzak.config import RunConfig
from suzak.cpu import learner_cpu_threads
from suzak.errors import SuzakError
from suzak.kernels import use_flex_for_text
from suzak.log import get_logger
from suzak.tasks import Example, Task
from trainer import loss as grpo_loss
from trainer.distributed import micro_batch_context
from trainer.forward import PolicyLogps, completion_logps
from trainer.rollouts import (MicroBatch, PreparedPrompt, Rollout, build_micro_batch, collect_rollouts,
                              cut_group_micro_batches, cut_micro_batches, generate_request, prepare_prompts,
                              vision_token_ids)

log = get_logger("grpo")


class PromptSampler:
    """Epoch-wise shuffled prompt order; its state (epoch, position) is saved in checkpoints for exact resume."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.position = 0, 0

    def _order(self) -> list[int]:
        order = list(range(self.n))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def next(self, count: int) -> list[int]:
        """The next `count` indices of the global order that belong to this rank."""
        picked = []
        order = self._order()
        while len(picked) < count * self.world:
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
                order = self._order()
            picked.append(order[self.position])
            self.position += 1
        return picked[self.rank::self.world]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]


def release_cached_memory(device) -> None:
    """Give the caching allocator's free blocks back to the driver.

    The rollout server shares this GPU and allocates outside this process (activations while it generates, its
    weights and KV cache on wake); blocks this process freed but still caches would otherwise starve it (seen on
    the H100: vLLM ran out of memory in generate, bench/RESULTS.md issues 7 and 9).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def keep_informative_groups(rollouts: list[Rollout], prompts: list[PreparedPrompt],
                            count: int) -> tuple[list[Rollout], list[PreparedPrompt], float]:
    """`count` groups, those whose rewards differ first (in generation order), then zero-variance ones to fill.

    A fixed count keeps every step (and every rank) the same size. Returns the kept rollouts with their prompt
    indices renumbered, the kept prompts, and the fraction of generated groups that were informative.
    """
    groups: dict[int, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(r.prompt_index, []).append(r)
    informative = [p for p, rs in groups.items() if max(r.reward for r in rs) - min(r.reward for r in rs) > 1e-6]
    chosen = set(informative)
    rest = [p for p in groups if p not in chosen]
    kept = (informative + rest)[:count]
    new_index = {p: i for i, p in enumerate(kept)}
    kept_rollouts = []
    for p in kept:
        for r in groups[p]:
            r.prompt_index = new_index[p]
            kept_rollouts.append(r)
    return kept_rollouts, [prompts[p] for p in kept], len(informative) / max(1, len(groups))


def staleness_metrics(rollouts: list[Rollout], policy_version: int) -> dict[str, float]:
    """How many updates behind the trained policy each rollout's generating version is (async_steps bounds it)."""
    lags = [policy_version - r.policy_version for r in rollouts]
    return {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags))}


@dataclass
class PendingBatch:
    """The next step's batch while the server generates it (grpo.async_steps)."""

    sampler_state: dict
    """The prompt sampler before this batch was drawn: what a checkpoint taken meanwhile records."""
    prompts: list[PreparedPrompt]
    rollouts: Future


class GRPOLearner:
    """Owns the policy, the optimizer, the client and the transport for the GRPO stage."""

    def __init__(self, cfg: RunConfig, task: Task, examples: list[Example], client, out_dir: Path,
                 eval_hook=None, *, sync_phases: bool = False):
        """sync_phases: each phase of a step waits for its queued GPU work, so its time is its own (benchmarks)."""
        from trainer.checkpoint import CheckpointManager
        from trainer.distributed import make_accelerator
        from trainer.memory import learner_device, resolve_offload
        from trainer.optim import build_optimizer
        from trainer.policy import load_policy, prepare_for_training

        cfg = resolve_offload(cfg, "grpo", learner_device())  # optim.offload auto -> cpu or off, before accelerate
        self.cfg, self.task, self.examples, self.client = cfg, task, examples, client
        self.out_dir = Path(out_dir)
        self.eval_hook = eval_hook
        self.sync_phases = sync_phases
        self.push_error: SuzakError | None = None
        """A weight push that failed after this step's update (the server died): raised once the step is logged."""
        self.acc = make_accelerator(cfg)
        self.device = self.acc.device
        torch.manual_seed(cfg.seed + self.acc.process_index)
        if self.device.type == "cpu":
            torch.set_num_threads(learner_cpu_threads(cfg))
        g = cfg.grpo
        if g.share_prompt and g.shared_prompt_attention == "flex" and self.device.type != "cuda":
            raise SuzakError("grpo.shared_prompt_attention=flex needs a CUDA learner (FlexAttention has no backward "
                             f"on {self.device.type}): use grpo.shared_prompt_attention=bias")
        self.policy = load_policy(cfg, self.device)
        optimizer, scheduler = build_optimizer(self.policy.model, g.optim, g.steps * g.num_iterations * g.mini_batches,
                                               offload=self.policy.offload, momentum_dtype=self.policy.momentum_dtype)
        self.wrapped, self.optimizer = prepare_for_training(self.acc, PolicyLogps(self.policy.model), optimizer)
        self.model = self.wrapped  # what gradients, clipping and checkpoints go through
        self.scheduler = scheduler
        self.processor = self.policy.processor
        self.pad_id = self._pad_id()
        self.vision_ids = vision_token_ids(self.policy.model.config)
        self.sampler = PromptSampler(len(examples), cfg.seed, self.acc.process_index, self.acc.num_processes)
        self._prefetched: tuple[dict, list[PreparedPrompt]] | None = None  # (sampler state before, prompts)
        self._pending: PendingBatch | None = None  # grpo.async_steps: the next batch, generating
        self._pool: ThreadPoolExecutor | None = None  # see _rollout_thread
        self.ckpt = CheckpointManager(self.out_dir, cfg.checkpoint.keep_last, accelerator=self.acc)
        self.reward_fns = task.reward_functions(g.reward_mode)
        self.step_index, self.policy_version = 0, 0
        self.transport = None
        self.share_prompt = g.share_prompt and self._attention_takes_masks()
        if self.share_prompt and g.shared_prompt_attention == "flex":
            for model in (self.policy.model, self.policy.ref_model):
                if model is not None:
                    use_flex_for_text(model)

    def _attention_takes_masks(self) -> bool:
        attn = getattr(self.policy.model.config, "_attn_implementation", "sdpa")
        if attn in ("sdpa", "eager"):
            return True
        log.warning(f"grpo.share_prompt: attention {attn} cannot take the shared-prompt mask; groups run "
                    "unshared (model.attn_implementation=sdpa shares them)")
        return False

    @property
    def hf_model(self):
        """The bare transformers (or peft) model inside the accelerate wrapper."""
        return self.acc.unwrap_model(self.wrapped).model

    def _pad_id(self) -> int:
        tok = self.processor.tokenizer
        return int(tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)

    # ------------------------------------------------------------------ weights

    def _connect_transport(self):
        from trainer.weight_push import choose_transport
        from vllm_server.client import check_compatible

        info = self.client.info()
        check_compatible(info, self.cfg.model)
        self.transport = choose_transport(self.cfg, self.device, info, out_dir=self.out_dir)
        self.transport.init(self.client)
        return info

    def push_weights(self) -> dict:
        """Send the current weights to the server as policy version `self.policy_version` (rank 0 sends)."""
        stats = self._send_weights() if self.acc.is_main_process else {}
        self.acc.wait_for_everyone()
        return stats

    def ensure_server_synced(self) -> None:
        """After a server restart the version differs: push the current weights again instead of losing a step."""
        if not self.acc.is_main_process:
            return
        info = self.client.info()
        if info.policy_version != self.policy_version:
            log.info(f"server at policy version {info.policy_version}, learner at {self.policy_version}: "
                     "re-pushing weights")
            self.transport = None
            self._send_weights()

    def _send_weights(self) -> dict:
        """This process pushes the weights (callers make sure it is the main one); connects the transport first."""
        from trainer.weights import server_weights

        if self.transport is None:
            self._connect_transport()
        start = time.perf_counter()
        with server_weights(self.hf_model, self.cfg.server.dtype) as weights:
            stats = dict(self.transport.push(weights, self.policy_version) or {})
        release_cached_memory(self.device)  # the merged (LoRA) or cast copies just pushed
        stats["seconds"] = time.perf_counter() - start
        return stats

    @contextmanager
    def server_asleep(self):
        """Free the server's GPU memory (weights and KV cache) while the learner updates, when configured."""
        asleep = False
        if self.cfg.server.sleep_during_update and self.acc.is_main_process:
            info = self.client.info()
            if info.can_sleep:
                self.client.sleep(level=self.cfg.server.sleep_level)
                asleep = True
        try:
            yield
        finally:
            release_cached_memory(self.device)  # the update's activations, before the server wants memory again
            if asleep:
                self.client.wake()
            self.acc.wait_for_everyone()

    # ------------------------------------------------------------------ one step

    def generate(self, prompts: list[PreparedPrompt], step_index: int | None = None) -> list[Rollout]:
        """The rollouts of step `step_index` (default: this one); its index seeds the server's sampling."""
        g = self.cfg.grpo
        step_index = self.step_index if step_index is None else step_index
        req = generate_request(prompts, n=g.num_generations, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                               max_tokens=g.max_completion_tokens, ignore_eos=g.ignore_eos,
                               seed=self.cfg.seed * 1_000_003 + step_index * 1009 + self.acc.process_index)
        response = self.client.generate(req)
        return collect_rollouts(prompts, response, vision_token_ids=self.vision_ids)

    def _draw_and_prepare(self, count: int) -> list[PreparedPrompt]:
        cfg = self.cfg
        idx = self.sampler.next(count)
        return prepare_prompts([self.examples[i] for i in idx], self.task, self.processor,
                               prompt=cfg.data.train_prompt, system=cfg.data.system_prompt,
                               min_pixels=cfg.model.min_pixels, max_pixels=cfg.model.max_pixels)

    def _draw(self, count: int) -> tuple[dict, list[PreparedPrompt]]:
        """(the sampler's state before this draw, the drawn prompts prepared): a checkpoint taken while they are in
        flight records that state, so a resumed run draws the same prompts again."""
        return self.sampler.state_dict(), self._draw_and_prepare(count)

    def _rollout_thread(self) -> ThreadPoolExecutor:
        """The worker thread that waits on the server's HTTP answer while this thread works (one per learner)."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="suzak-rollouts")
        return self._pool

    def _take_prompts(self, count: int) -> list[PreparedPrompt]:
        """This step's prompts: the ones prepared during the last step's generation, else drawn and prepared now."""
        if self._prefetched is not None:
            prompts, self._prefetched = self._prefetched[1], None
            return prompts
        return self._draw_and_prepare(count)

    def _generate_and_prefetch(self, prompts: list[PreparedPrompt], count: int) -> list[Rollout]:
        """Generate in a worker thread (it only waits on HTTP) while this thread prepares the next step's prompts,
        so their image processing hides behind the server's work.
        The sampler state from before that draw is what a checkpoint saves, so a resumed run redraws them."""
        pending = self._rollout_thread().submit(self.generate, prompts)
        if self.step_index + 1 < self.cfg.grpo.steps:
            self._prefetched = self._draw(count)
        return pending.result()

    def _prompts_per_rank(self) -> int:
        """The groups this rank trains on per step."""
        return max(1, self.cfg.grpo.prompts_per_step // self.acc.num_processes)

    def _prompts_per_draw(self) -> int:
        """The prompts this rank generates per step (grpo.oversample draws extra, keeping the informative)."""
        return math.ceil(self._prompts_per_rank() * self.cfg.grpo.oversample)

    def _start_next_generation(self, count: int) -> PendingBatch:
        """grpo.async_steps: draw the next step's prompts and have the server generate them, with the weights it
        serves now, while this thread runs the update."""
        state, prompts = self._draw(count)
        return PendingBatch(state, prompts, self._rollout_thread().submit(self.generate, prompts, self.step_index + 1))

    def _resume_pending(self, saved: dict, count: int) -> None:
        """Rebuild the batch a checkpoint was saved with: its prompts redrawn from the saved sampler state, its
        rollouts as the server generated them (so the resumed run trains on the same, one-step-stale batch)."""
        state, prompts = self._draw(count)
        done: Future = Future()
        done.set_result([Rollout(**r) for r in saved["rollouts"]])
        self._pending = PendingBatch(state, prompts, done)

    def score(self, rollouts: list[Rollout], prompts: list[PreparedPrompt]) -> dict[str, float]:
        """Weighted sum of the task's reward functions; each function's mean is logged."""
        weights = self.cfg.grpo.reward_weights
        unknown = set(weights) - set(self.reward_fns)
        if unknown:
            raise SuzakError(f"grpo.reward_weights names unknown reward(s) {sorted(unknown)}; "
                             f"known: {sorted(self.reward_fns)}")
        for r in rollouts:
            answer = prompts[r.prompt_index].example.answer
            r.rewards = {name: fn(r.text, answer) for name, fn in self.reward_fns.items()}
            r.reward = sum(weights.get(name, 0.0) * v for name, v in r.rewards.items())
        metrics = {f"reward/{name}": sum(r.rewards[name] for r in rollouts) / len(rollouts) for name in self.reward_fns}
        rewards = torch.tensor([r.reward for r in rollouts])
        metrics["reward/total"] = rewards.mean().item()
        metrics["reward/std"] = rewards.std().item() if len(rollouts) > 1 else 0.0
        return metrics

    def advantages(self, rollouts: list[Rollout]) -> dict[str, float]:
        g = self.cfg.grpo
        rewards = torch.tensor([r.reward for r in rollouts], dtype=torch.float32)
        adv, stats = grpo_loss.group_advantages(rewards, g.num_generations, g.scale_rewards)
        for r, a in zip(rollouts, adv.tolist()):
            r.advantage = a
        return {f"adv/{k}": float(v) for k, v in stats.items()}

    def _micro_batches(self, rollouts, prompts) -> list[MicroBatch]:
        budget = self.cfg.grpo.micro_batch_tokens
        cut = cut_group_micro_batches if self.share_prompt else cut_micro_batches
        return [build_micro_batch(ix, rollouts, prompts, self.pad_id, self.vision_ids, share_prompts=self.share_prompt)
                for ix in cut(rollouts, prompts, budget)]

    @torch.no_grad()
    def _frozen_logps(self, batches: list[MicroBatch], reference: bool) -> list[torch.Tensor]:
        """Log-probs under the current (old) policy, or under the reference (LoRA: adapters off)."""
        out = []
        # One swap for all micro-batches: a host-RAM reference is copied into the policy's weights and back.
        with self.policy.reference() if reference else nullcontext(self.hf_model) as model:
            for mb in batches:
                with self.acc.autocast():
                    out.append(completion_logps(model, mb, self.cfg.grpo.temperature, self.device))
        return out

    def _reference_beside(self) -> bool:
        """Whether the reference log-probs can run on a thread of their own beside the policy's forward and backward:
        a CPU learner on one intra-op thread with a frozen reference copy (a reference swapped into the policy, or
        LoRA's adapters switched off, is the policy's own module). Every op then runs single-threaded on the thread
        that calls it, exactly as in sequence, while the second thread takes a core that would sit idle: beside a
        local server the learner has half the cores, and the server's half waits during the update."""
        return (self.device.type == "cpu" and torch.get_num_threads() == 1 and self.policy.ref_model is not None
                and self.acc.num_processes == 1)

    def update(self, rollouts: list[Rollout], prompts: list[PreparedPrompt]) -> dict[str, float]:
        """num_iterations passes of mini_batches optimizer steps over this rollout batch."""
        g = self.cfg.grpo
        batches = self._micro_batches(rollouts, prompts)
        need_old = g.num_iterations > 1 or g.mini_batches > 1
        if g.async_steps:  # off-policy by one update: the ratio is against the version that generated the batch
            old = [self._generating_logps(mb) for mb in batches]
        else:
            old = self._frozen_logps(batches, reference=False) if need_old else [None] * len(batches)
        with ThreadPoolExecutor(max_workers=1) if g.beta > 0 and self._reference_beside() else nullcontext() as pool:
            if g.beta <= 0:
                ref = [None] * len(batches)
            elif pool is None:
                ref = self._frozen_logps(batches, reference=True)
            else:  # futures, one per micro-batch: each is waited for only where its loss needs it
                ref = [pool.submit(self._frozen_logps, [mb], True) for mb in batches]
            per_step = max(1, math.ceil(len(batches) / g.mini_batches))
            sums: dict[str, float] = {}
            count = 0
            for _ in range(g.num_iterations):
                for start in range(0, len(batches), per_step):
                    chunk = list(range(start, min(start + per_step, len(batches))))
                    metrics = self._optimizer_step([batches[i] for i in chunk], [old[i] for i in chunk],
                                                   [ref[i] for i in chunk], rollouts)
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + v
                    count += 1
        return {k: v / count for k, v in sums.items()}

    def _generating_logps(self, mb: MicroBatch) -> torch.Tensor:
        if mb.rollout_logps is None:
            raise SuzakError("grpo.async_steps=1 takes the importance ratio against the server's log-probs, but the "
                             "server returned none for some rollouts: use a suzak server (it always returns them) or "
                             "set grpo.async_steps=0")
        return mb.rollout_logps.to(self.device)

    def _optimizer_step(self, batches, olds, refs, rollouts) -> dict[str, float]:
        g = self.cfg.grpo
        n_seqs = sum(len(mb.rollout_indices) for mb in batches)
        n_tokens = sum(float(mb.completion_mask.sum()) for mb in batches)
        sums: dict[str, float] = {}
        for i, (mb, old, ref) in enumerate(zip(batches, olds, refs)):
            adv = torch.tensor([rollouts[j].advantage for j in mb.rollout_indices], device=self.device)
            with micro_batch_context(self.acc, self.wrapped, last=i == len(batches) - 1):
                with self.acc.autocast():
                    logps = self.wrapped(mb, g.temperature)
                if isinstance(ref, Future):
                    ref = ref.result()[0]  # computed beside this forward (see _reference_beside)
                loss, metrics = grpo_loss.policy_loss(
                    logps, old, adv, mb.completion_mask.to(self.device), loss_type=g.loss_type, beta=g.beta,
                    ref_logps=ref, eps_low=g.eps_low, eps_high=g.eps_high,
                    rollout_logps=None if mb.rollout_logps is None else mb.rollout_logps.to(self.device),
                    tis_cap=g.tis_cap, max_completion_length=g.max_completion_tokens, num_items_in_batch=n_tokens,
                    num_seqs_in_batch=n_seqs)
                self.acc.backward(loss)
            weight = len(mb.rollout_indices) / n_seqs
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * weight
        grad_norm = self.acc.clip_grad_norm_(self.model.parameters(), g.optim.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        sums["grad_norm"] = float(grad_norm)
        sums["lr"] = self.scheduler.get_last_lr()[0]
        return sums

    def step(self) -> dict[str, float]:
        """One GRPO step; returns its metrics."""
        from trainer.monitor import Timer

        g = self.cfg.grpo
        timer = Timer(cuda_sync=self.sync_phases)
        per_rank = self._prompts_per_rank()
        count = self._prompts_per_draw()
        pending, self._pending = self._pending, None
        with timer("prepare"):
            prompts = pending.prompts if pending is not None else self._take_prompts(count)
        with timer("generate"):  # with async_steps: what is left of the generation started during the last update
            if pending is not None:
                rollouts = pending.rollouts.result()
            else:
                self.ensure_server_synced()
                rollouts = self.generate(prompts) if g.async_steps else self._generate_and_prefetch(prompts, count)
        metrics = staleness_metrics(rollouts, self.policy_version) if g.async_steps else {}
        with timer("reward"):
            metrics.update(self.score(rollouts, prompts))
            if len(prompts) > per_rank:
                rollouts, prompts, informative = keep_informative_groups(rollouts, prompts, per_rank)
                metrics["groups/informative_generated"] = informative
            metrics.update(self.advantages(rollouts))
        with timer("update"):
            if g.async_steps and self.step_index + 1 < g.steps:
                self._pending = self._start_next_generation(count)
            with self.server_asleep():
                metrics.update(self.update(rollouts, prompts))
        if self._pending is not None:
            with timer("generate_wait"):  # the server finishes the next batch before it takes the new weights
                wait([self._pending.rollouts])
        self.step_index += 1
        self.policy_version += 1
        with timer("weight_sync"):
            try:
                self.push_weights()
            except SuzakError as e:
                # The update is done and counted: run() logs (and checkpoints) this step before raising, so a
                # restarted server or a rerun goes on from here instead of losing the step's metrics.
                self.push_error = e
        tokens = sum(len(prompts[r.prompt_index].input_ids) + len(r.completion_ids) for r in rollouts)
        metrics.update({f"time/{k}": v for k, v in timer.totals.items()})
        step_time = sum(timer.totals.values())
        metrics["tokens_per_s"] = tokens * self.acc.num_processes / max(step_time, 1e-9)
        metrics["completion_len"] = sum(len(r.completion_ids) for r in rollouts) / len(rollouts)
        metrics["rejected_vision_tokens"] = sum(r.rejected for r in rollouts)
        metrics["accuracy"] = metrics.get("reward/accuracy", 0.0)
        metrics["format_rate"] = metrics.get("reward/format", 0.0)
        metrics["policy_version"] = self.policy_version
        return metrics

    # ------------------------------------------------------------------ run / resume

    def save(self) -> Path:
        if self._pending is not None:  # async_steps: the next batch, already generated, is part of the state
            sampler = self._pending.sampler_state
        else:
            sampler = self._prefetched[0] if self._prefetched is not None else self.sampler.state_dict()
        extra = {"step": self.step_index, "policy_version": self.policy_version, "sampler": sampler}
        if self._pending is not None:
            extra["pending"] = {"rollouts": [asdict(r) for r in self._pending.rollouts.result()]}
        return self.ckpt.save(self.step_index, self.wrapped, self.optimizer, self.scheduler, extra)

    def resume(self) -> bool:
        latest = self.ckpt.latest()
        if latest is None:
            return False
        extra = self.ckpt.load(latest, self.wrapped, self.optimizer, self.scheduler)
        self.step_index, self.policy_version = extra["step"], extra["policy_version"]
        self.sampler.load_state_dict(extra["sampler"])
        self._prefetched = self._pending = None
        if extra.get("pending") is not None and self.cfg.grpo.async_steps:
            self._resume_pending(extra["pending"], self._prompts_per_draw())
        log.info(f"resumed from {latest} (step {self.step_index}, policy version {self.policy_version})")
        return True

    def run(self, monitor=None) -> None:
        """Run to grpo.steps, checkpointing every K steps and on Ctrl-C."""
        cfg = self.cfg
        if cfg.checkpoint.resume:
            self.resume()
        self.push_weights()
        try:
            while self.step_index < cfg.grpo.steps:
                metrics = self.step()
                failed, self.push_error = self.push_error, None
                if failed is not None and self.acc.num_processes > 1:
                    raise failed  # the other ranks wait in the push's barrier: no collective save now
                if failed is None and self.eval_hook is not None and cfg.eval.every_steps \
                        and self.step_index % cfg.eval.every_steps == 0:
                    metrics.update(self.eval_hook(self.client, self.step_index))
                if monitor is not None and self.acc.is_main_process:
                    monitor.log(self.step_index, metrics)
                if self.step_index % cfg.checkpoint.every_steps == 0 or self.step_index == cfg.grpo.steps:
                    self.save()
                if failed is not None:
                    raise failed
        except KeyboardInterrupt:
            log.info(f"interrupted at step {self.step_index}: saving a checkpoint")
            self.save()
            raise
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None

    def export(self, out_dir: Path) -> Path:
        from trainer.export import export_hf

        self.policy.model = self.hf_model
        from trainer.distributed import is_sharded

        state = self.acc.get_state_dict(self.wrapped) if is_sharded(self.acc) else None
        if state is not None:  # gathered from the shards; names carry the wrapper's "model." prefix
            state = {k.removeprefix("model."): v for k, v in state.items()}
        if self.acc.is_main_process:
            export_hf(self.policy, out_dir, state_dict=state)
        self.acc.wait_for_everyone()
        return out_dir

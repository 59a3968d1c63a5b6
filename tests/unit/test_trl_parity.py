"""Parity of trainer/loss.py with TRL 1.16's GRPOTrainer, through TRL's own code.

Loss, gradients and logged metrics come from GRPOTrainer._compute_loss, called unbound on a stand-in object that
has exactly the attributes it reads, its log-prob forward patched to return our tensors. Importance-sampling
weights and advantages live inside the long GRPOTrainer._generate_and_score_completions; the blocks that compute
them are cut out of TRL's installed source and executed as they are. Log-probs are compared with TRL's fused
LM-head kernel (the path GRPOTrainer uses in 1.16) and with trl's selective_log_softmax.

Run: .venv/bin/python -m pytest tests/unit/test_trl_parity.py -q
"""

import inspect
import math
import textwrap
import zlib
import warnings
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from trainer.loss import (
    group_advantages,
    per_token_logps_from_hidden,
    per_token_logps_from_logits,
    policy_loss,
    rollout_importance_weights,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # trl warns about the installed vLLM version on import
    trl = pytest.importorskip("trl", reason="trl is not importable; the TRL parity tests need TRL 1.16")
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import grpo_trainer
    from trl.trainer.utils import nanmax, nanmin, nanstd, selective_log_softmax

pytestmark = pytest.mark.trl

GRPOTrainer = grpo_trainer.GRPOTrainer
SUZAK_TO_TRL = {"clip": "grpo", "dapo": "dapo", "dr_grpo": "dr_grpo", "bnpo": "bnpo"}
TOL = dict(rtol=1e-5, atol=1e-5)


def test_installed_trl_is_1_16():
    # The snippet markers and the stand-in's attributes were read off TRL 1.16's source.
    assert trl.__version__.startswith("1.16"), f"parity was written against TRL 1.16, found {trl.__version__}"


# ----------------------------------------------------------------------------------------------------------------
# Calling TRL's own code
# ----------------------------------------------------------------------------------------------------------------


class _Accelerator:
    """Single process: gather/reduce are identities, as accelerate's are with one process."""

    num_processes = 1
    process_index = 0

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _trl_stand_in(
    logps, loss_type, *, beta=0.0, eps_low=0.2, eps_high=0.2, delta=None, kl_bias=False, tis=False, grad_accum=1
):
    """Just the attributes GRPOTrainer._compute_loss reads; anything else raises AttributeError."""
    entropies = torch.zeros_like(logps.detach())
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=tis,
        vllm_importance_sampling_correction=tis,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=grad_accum,
        max_completion_length=8,
        accelerator=_Accelerator(),
        args=SimpleNamespace(use_bias_correction_kl=kl_bias, delta=delta, steps_per_generation=grad_accum),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )


def _trl_inputs(completion_mask, advantages, *, old=None, ref=None, is_ratio=None, num_items=None):
    size, length = completion_mask.shape
    inputs = {
        "prompt_ids": torch.zeros(size, 2, dtype=torch.long),
        "prompt_mask": torch.ones(size, 2, dtype=torch.long),
        "completion_ids": torch.zeros(size, length, dtype=torch.long),
        "completion_mask": completion_mask.long(),
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum() if num_items is None else num_items,
    }
    optional = {"old_per_token_logps": old, "ref_per_token_logps": ref, "importance_sampling_ratio": is_ratio}
    inputs.update({key: value for key, value in optional.items() if value is not None})
    return inputs


def _trl_snippet(method, start: str, end: str) -> str:
    """The source of `method` from the line holding `start` up to (not including) the line holding `end`."""
    lines = inspect.getsource(method).splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next(i for i, line in enumerate(lines) if i > first and end in line)
    return textwrap.dedent("\n".join(lines[first:last]))


def _run_trl_snippet(start, end, namespace):
    code = _trl_snippet(GRPOTrainer._generate_and_score_completions, start, end)
    exec(compile(code, f"<trl {start!r}>", "exec"), namespace)
    return namespace


def _batch(seed, size=6, length=8, dtype=torch.float64):
    """Random log-probs with a ragged mask; old log-probs far enough off that some ratios clip."""
    gen = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(size, length, generator=gen, dtype=dtype) * 3).requires_grad_(True)
    old = logps.detach() + 0.3 * torch.randn(size, length, generator=gen, dtype=dtype)
    ref = logps.detach() + 0.2 * torch.randn(size, length, generator=gen, dtype=dtype)
    rollout = old + 0.4 * torch.randn(size, length, generator=gen, dtype=dtype)
    lengths = torch.randint(1, length + 1, (size,), generator=gen)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
    adv = torch.randn(size, generator=gen, dtype=dtype)
    return SimpleNamespace(logps=logps, old=old, ref=ref, rollout=rollout, mask=mask, adv=adv)


def _grad(loss, logps):
    (grad,) = torch.autograd.grad(loss, logps)
    return grad


# ----------------------------------------------------------------------------------------------------------------
# Loss and gradient parity
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suzak_type", list(SUZAK_TO_TRL))
@pytest.mark.parametrize("beta, kl_bias", [(0.0, False), (0.04, False), (0.04, True)])
@pytest.mark.parametrize("eps_high, delta", [(0.2, None), (0.28, 1.5)])
def test_loss_grads_and_metrics_match_trl(suzak_type, beta, kl_bias, eps_high, delta):
    b = _batch(seed=zlib.crc32(repr((suzak_type, beta, kl_bias, eps_high)).encode()) % 1000)
    knobs = dict(beta=beta, eps_low=0.2, eps_high=eps_high, delta=delta, kl_bias=kl_bias)
    stand_in = _trl_stand_in(b.logps, SUZAK_TO_TRL[suzak_type], **knobs)
    inputs = _trl_inputs(b.mask, b.adv, old=b.old, ref=b.ref if beta else None)
    trl_loss = GRPOTrainer._compute_loss(stand_in, None, inputs)

    ours, metrics = policy_loss(
        b.logps, b.old, b.adv, b.mask, loss_type=suzak_type, beta=beta, ref_logps=b.ref if beta else None,
        eps_low=0.2, eps_high=eps_high, delta=delta, kl_bias_correction=kl_bias, max_completion_length=8,
    )
    torch.testing.assert_close(ours, trl_loss, **TOL)
    torch.testing.assert_close(_grad(ours, b.logps), _grad(trl_loss, b.logps), **TOL)
    logged = stand_in._metrics["train"]
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert metrics[key].item() == pytest.approx(logged[key][-1], abs=1e-6), key
    assert logged["clip_ratio/region_mean"][-1] > 0, "the batch should exercise clipping"
    if beta:
        assert metrics["kl"].item() == pytest.approx(logged["kl"][-1], abs=1e-6)


@pytest.mark.parametrize("beta, kl_bias", [(0.0, False), (0.04, False), (0.04, True)])
def test_r1v_matches_trl_grpo_on_policy(beta, kl_bias):
    # R1-V's loss is TRL's "grpo" loss when old log-probs are absent (TRL then uses logps.detach()).
    b = _batch(seed=7)
    stand_in = _trl_stand_in(b.logps, "grpo", beta=beta, kl_bias=kl_bias)
    trl_loss = GRPOTrainer._compute_loss(stand_in, None, _trl_inputs(b.mask, b.adv, ref=b.ref if beta else None))
    ours, _ = policy_loss(b.logps, b.old, b.adv, b.mask, loss_type="r1v", beta=beta,
                          ref_logps=b.ref if beta else None, kl_bias_correction=kl_bias)
    torch.testing.assert_close(ours, trl_loss, **TOL)
    torch.testing.assert_close(_grad(ours, b.logps), _grad(trl_loss, b.logps), **TOL)


@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("suzak_type", ["clip", "dapo"])
def test_truncated_importance_sampling_matches_trl(mode, suzak_type):
    b = _batch(seed=11)
    b.rollout[1, 2] = float("nan")  # a token the server could not score
    cap, floor = 2.0, (0.5 if mode.endswith("mask") else None)
    is_self = SimpleNamespace(
        use_vllm=True, vllm_importance_sampling_correction=True, vllm_importance_sampling_mode=mode,
        vllm_importance_sampling_clip_max=cap, vllm_importance_sampling_clip_min=floor,
    )
    namespace = _run_trl_snippet(
        "if self.use_vllm and self.vllm_importance_sampling_correction:",
        "# Compute the per-token log probabilities for the reference model",
        dict(self=is_self, torch=torch, math=math, old_per_token_logps=b.old, sampling_per_token_logps=b.rollout,
             completion_mask=b.mask, tool_mask=None),
    )
    trl_ratio = namespace["vllm_importance_sampling_ratio"]
    torch.testing.assert_close(rollout_importance_weights(b.old, b.rollout, b.mask, mode, cap, floor), trl_ratio)

    stand_in = _trl_stand_in(b.logps, SUZAK_TO_TRL[suzak_type], beta=0.04, tis=True)
    inputs = _trl_inputs(b.mask, b.adv, old=b.old, ref=b.ref, is_ratio=trl_ratio)
    trl_loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    ours, metrics = policy_loss(b.logps, b.old, b.adv, b.mask, loss_type=suzak_type, beta=0.04, ref_logps=b.ref,
                                rollout_logps=b.rollout, tis_cap=cap, tis_mode=mode, tis_floor=floor)
    torch.testing.assert_close(ours, trl_loss, **TOL)
    torch.testing.assert_close(_grad(ours, b.logps), _grad(trl_loss, b.logps), **TOL)

    # TRL's logged sampling metrics, from its own block.
    logged = defaultdict(list)
    metrics_self = SimpleNamespace(**vars(is_self), accelerator=_Accelerator(), _metrics={"train": logged})
    _run_trl_snippet(
        "delta = torch.abs(old_per_token_logps - sampling_per_token_logps)",
        "output = {",
        dict(namespace, self=metrics_self, mode="train", device="cpu", nanmin=nanmin, nanmax=nanmax),
    )
    pairs = {
        "logprob_gap/mean": "sampling/sampling_logp_difference/mean",
        "logprob_gap/max": "sampling/sampling_logp_difference/max",
        "tis_weight/mean": "sampling/importance_sampling_ratio/mean",
        "tis_weight/min": "sampling/importance_sampling_ratio/min",
        "tis_weight/max": "sampling/importance_sampling_ratio/max",
    }
    for ours_key, trl_key in pairs.items():
        assert metrics[ours_key].item() == pytest.approx(logged[trl_key][-1], abs=1e-6), ours_key


def test_dapo_accumulated_token_count_matches_trl():
    # TRL's dapo divides every micro-batch by the generation batch's token count (rescaled to one accumulation
    # window); suzak takes that count as num_items_in_batch.
    b = _batch(seed=13)
    window_tokens = b.mask.sum() * 2  # this micro-batch is one of two in the window
    stand_in = _trl_stand_in(b.logps, "dapo", grad_accum=2)
    inputs = _trl_inputs(b.mask, b.adv, old=b.old, num_items=window_tokens)
    trl_loss = GRPOTrainer._compute_loss(stand_in, None, inputs)
    ours, _ = policy_loss(b.logps, b.old, b.adv, b.mask, loss_type="dapo", num_items_in_batch=window_tokens)
    torch.testing.assert_close(ours, trl_loss, **TOL)


def test_grpo_accumulation_scaling_is_left_to_the_caller():
    # Known difference: TRL divides the "grpo"/"dr_grpo"/"bnpo" loss by gradient_accumulation_steps itself;
    # suzak's policy_loss does not (pass num_seqs_in_batch for the step's sequence total instead).
    b = _batch(seed=17)
    stand_in = _trl_stand_in(b.logps, "grpo", grad_accum=4)
    trl_loss = GRPOTrainer._compute_loss(stand_in, None, _trl_inputs(b.mask, b.adv, old=b.old))
    ours, _ = policy_loss(b.logps, b.old, b.adv, b.mask, loss_type="clip")
    torch.testing.assert_close(ours / 4, trl_loss, **TOL)


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("with_nan", [False, True])
def test_advantages_match_trl(scale, with_nan):
    gen = torch.Generator().manual_seed(3)
    rewards = torch.randint(0, 3, (24,), generator=gen).float()  # few levels -> some zero-std groups
    rewards[:4] = 1.0
    if with_nan:
        rewards[9] = float("nan")  # unscorable completion
    adv_self = SimpleNamespace(multi_objective_aggregation="sum_then_normalize", scale_rewards=scale,
                               reward_weights=torch.ones(1), reward_funcs=[None])
    rewards_per_func = rewards.unsqueeze(1)
    namespace = _run_trl_snippet(
        'if self.multi_objective_aggregation == "sum_then_normalize":',
        "# Slice to keep only the local part of the data",
        dict(self=adv_self, torch=torch, nanstd=nanstd, rewards_per_func=rewards_per_func, num_generations=4,
             device="cpu", unscorable_mask=torch.isnan(rewards_per_func).all(dim=1)),
    )
    ours, stats = group_advantages(rewards, group_size=4, scale=scale)
    torch.testing.assert_close(ours, namespace["advantages"], **TOL)
    if scale != "batch" and not with_nan:  # TRL's zero-std flag follows the batch std under "batch"
        assert stats["frac_zero_std"] == pytest.approx(namespace["is_std_zero"].float().mean().item())
        assert stats["zero_std_groups"] >= 1


# ----------------------------------------------------------------------------------------------------------------
# Log-probs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.9])
def test_logps_match_trl_fused_lm_head_kernel(temperature):
    # GRPOTrainer 1.16 scores completions with add_fused_lm_head, i.e. ChunkedLogProbFunction over hidden @ W.T.
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 7, 16, generator=gen).requires_grad_(True)
    weight = (torch.randn(97, 16, generator=gen) * 0.3).requires_grad_(True)
    labels = torch.randint(0, 97, (3, 7), generator=gen)
    trl_logps = ChunkedLogProbFunction.apply(
        hidden.reshape(-1, 16), weight, None, labels.reshape(-1), temperature, 32, None, 1.0, ("log_probs",)
    )[0].view(3, 7)
    upstream = torch.randn(3, 7, generator=gen)
    trl_grads = torch.autograd.grad((trl_logps * upstream).sum(), (hidden, weight), retain_graph=True)
    from_logits = per_token_logps_from_logits(hidden @ weight.T, labels, temperature=temperature, chunk=4)
    from_hidden = per_token_logps_from_hidden(hidden, weight, labels, temperature=temperature, chunk=4)
    for ours in (from_logits, from_hidden):
        torch.testing.assert_close(ours, trl_logps, **TOL)
        our_grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight))
        for theirs, mine in zip(trl_grads, our_grads):
            torch.testing.assert_close(mine, theirs, **TOL)


def test_logps_match_trl_selective_log_softmax():
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(4, 5, 33, generator=gen).requires_grad_(True)
    labels = torch.randint(0, 33, (4, 5), generator=gen)
    theirs = selective_log_softmax(logits, labels, temperature=0.8)
    ours = per_token_logps_from_logits(logits, labels, temperature=0.8, chunk=2)
    torch.testing.assert_close(ours, theirs, **TOL)
    torch.testing.assert_close(_grad(ours.sum(), logits), _grad(theirs.sum(), logits), **TOL)

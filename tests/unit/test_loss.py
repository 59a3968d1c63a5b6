"""GRPO math in trainer/loss.py: hand-checked advantages, log-probs, loss aggregations, TIS and gradients.

Run: .venv/bin/python -m pytest tests/unit/test_loss.py -q
"""

import math

import pytest
import torch

from suzak.errors import SuzakError
from trainer.loss import (
    group_advantages,
    per_token_logps_from_hidden,
    per_token_logps_from_logits,
    policy_loss,
    rollout_importance_weights,
    selective_log_softmax,
)

ALL_LOSS_TYPES = ("r1v", "clip", "dapo", "dr_grpo", "bnpo")

# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_checked_with_zero_std_group():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, stats = group_advantages(rewards, group_size=4)
    std = math.sqrt(1 / 3)  # unbiased std of [1, 0, 1, 0]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4)] * 2 + [0.0] * 4
    assert adv.tolist() == pytest.approx(expected, rel=1e-6)
    assert stats["zero_std_groups"] == 1
    assert stats["frac_zero_std"] == 0.5
    assert stats["num_groups"] == 2
    assert stats["reward_mean"] == pytest.approx(10 / 8)


def test_group_advantages_none_and_batch_scaling():
    rewards = torch.tensor([3.0, 1.0, 0.0, 0.0])
    adv_none, _ = group_advantages(rewards, 2, scale="none")
    assert adv_none.tolist() == [1.0, -1.0, 0.0, 0.0]  # Dr.GRPO: centred only
    adv_batch, stats = group_advantages(rewards, 2, scale="batch")
    batch_std = torch.tensor([3.0, 1.0, 0.0, 0.0]).std().item()
    assert adv_batch.tolist() == pytest.approx([1 / (batch_std + 1e-4), -1 / (batch_std + 1e-4), 0, 0], rel=1e-6)
    assert stats["zero_std_groups"] == 1  # the [0, 0] group, whatever the scaling


def test_all_groups_zero_std_give_zero_advantages():
    adv, stats = group_advantages(torch.ones(12), group_size=4)
    assert torch.equal(adv, torch.zeros(12))
    assert stats["zero_std_groups"] == 3 and stats["frac_zero_std"] == 1.0


def test_nan_reward_is_left_out_and_gets_zero_advantage():
    rewards = torch.tensor([1.0, float("nan"), 0.0, 1.0])
    adv, _ = group_advantages(rewards, group_size=4)
    scorable = torch.tensor([1.0, 0.0, 1.0])
    expected = (scorable - scorable.mean()) / (scorable.std() + 1e-4)
    assert adv[1].item() == 0.0
    assert adv[[0, 2, 3]].tolist() == pytest.approx(expected.tolist(), rel=1e-6)


def test_group_advantages_rejects_bad_input():
    with pytest.raises(SuzakError, match="grpo.scale_rewards"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)


# ----------------------------------------------------------------------------------------------------------------
# Per-token log-probs
# ----------------------------------------------------------------------------------------------------------------


def _naive_logps(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.double() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


@pytest.mark.parametrize("chunk", [1, 3, 512])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logps_match_naive_log_softmax_values_and_grads(chunk, temperature):
    torch.manual_seed(0)
    full = torch.randn(3, 9, 40, dtype=torch.float64, requires_grad=True)
    logits = full[:, :-1]  # non-contiguous slice, as the learner takes it
    labels = torch.randint(0, 40, (3, 8))
    ours = per_token_logps_from_logits(logits, labels, temperature=temperature, chunk=chunk)
    naive = _naive_logps(logits, labels, temperature)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-12)
    weights = torch.randn(3, 8, dtype=torch.float64)
    (grad_ours,) = torch.autograd.grad((ours * weights).sum(), full)
    (grad_naive,) = torch.autograd.grad((naive * weights).sum(), full)
    torch.testing.assert_close(grad_ours, grad_naive, rtol=0, atol=1e-12)


def test_chunked_logps_ignore_index_gives_zero_and_no_grad():
    torch.manual_seed(1)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, 3:] = -100
    ours = per_token_logps_from_logits(logits, labels, chunk=2)
    assert torch.all(ours[0, 3:] == 0)
    torch.testing.assert_close(ours[1], _naive_logps(logits[1], labels[1]).float(), rtol=0, atol=1e-5)
    ours.sum().backward()
    assert torch.all(logits.grad[0, 3:] == 0)
    assert logits.grad[1].abs().sum() > 0


def test_bf16_logits_give_float32_logps_close_to_exact():
    torch.manual_seed(2)
    logits = (torch.randn(2, 6, 64) * 4).bfloat16()
    labels = torch.randint(0, 64, (2, 6))
    ours = per_token_logps_from_logits(logits, labels, chunk=4)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), _naive_logps(logits.double(), labels), rtol=0, atol=1e-5)


def test_selective_log_softmax_top_k_index_and_row_mask():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 10, dtype=torch.float64, requires_grad=True)
    index = torch.randint(0, 10, (2, 4, 3))
    row_mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 1]])
    ours = selective_log_softmax(logits, index, temperature=1.5, row_mask=row_mask, chunk=3)
    naive = torch.log_softmax(logits / 1.5, -1).gather(-1, index) * row_mask.unsqueeze(-1)
    torch.testing.assert_close(ours, naive, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z: selective_log_softmax(z, index, 1.5, row_mask=row_mask, chunk=3), (logits,)
    )


@pytest.mark.parametrize("chunk", [1, 4, 512])
def test_logps_from_hidden_match_projected_logits_values_and_grads(chunk):
    torch.manual_seed(7)
    hidden = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(40, 8, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (3, 5))
    labels[1, 3:] = -100
    ours = per_token_logps_from_hidden(hidden, weight, labels, temperature=0.8, chunk=chunk, bias=bias)
    via_logits = per_token_logps_from_logits(hidden @ weight.T + bias, labels, temperature=0.8)
    torch.testing.assert_close(ours, via_logits, rtol=0, atol=1e-12)
    assert torch.all(ours[1, 3:] == 0)
    upstream = torch.randn(3, 5, dtype=torch.float64)
    ours_grads = torch.autograd.grad((ours * upstream).sum(), (hidden, weight, bias))
    logits_grads = torch.autograd.grad((via_logits * upstream).sum(), (hidden, weight, bias))
    for mine, reference in zip(ours_grads, logits_grads):
        torch.testing.assert_close(mine, reference, rtol=0, atol=1e-12)


def test_logps_from_hidden_with_frozen_bf16_head_and_autocast():
    torch.manual_seed(8)
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    frozen = torch.randn(40, 8).bfloat16()
    labels = torch.randint(0, 40, (2, 6))
    ours = per_token_logps_from_hidden(hidden, frozen, labels, chunk=5)
    exact = _naive_logps(hidden.detach().bfloat16().double() @ frozen.double().T, labels)
    torch.testing.assert_close(ours.double(), exact, rtol=0, atol=0.05)  # bf16 matmul
    ours.sum().backward()
    assert hidden.grad.dtype == torch.float32 and hidden.grad.abs().sum() > 0
    trainable = torch.randn(40, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = per_token_logps_from_hidden(hidden.detach(), trainable, labels, chunk=5)
    out.sum().backward()
    assert out.dtype == torch.float32 and trainable.grad.dtype == torch.float32
    assert trainable.grad.abs().sum() > 0


def test_logps_reject_mismatched_shapes_and_bad_temperature():
    with pytest.raises(ValueError, match="labels shape"):
        per_token_logps_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="temperature"):
        per_token_logps_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 3, dtype=torch.long), temperature=0)
    with pytest.raises(ValueError, match="must be"):
        per_token_logps_from_hidden(torch.zeros(2, 3, 4), torch.zeros(5, 6), torch.zeros(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------------
# Policy loss: hand-checked aggregations
# ----------------------------------------------------------------------------------------------------------------

MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
# The 9.0 sits on padding and must not count.
RATIOS = torch.tensor([[1.5, 0.5, 9.0], [1.1, 0.7, 1.0]], dtype=torch.float64)
ADV = torch.tensor([1.0, -1.0])


def _clip_batch():
    """logps with grad and old_logps chosen so that exp(logps - old_logps) == RATIOS."""
    logps = torch.full((2, 3), -1.0, dtype=torch.float64, requires_grad=True)
    old = (logps.detach() - RATIOS.double().log()).clone()
    return logps, old


# Per-token clipped losses (eps 0.2): row 0 (A=+1): -min(1.5, 1.2) = -1.2, -min(0.5, 0.8) = -0.5;
# row 1 (A=-1): -min(-1.1, -1.1) = 1.1, -min(-0.7, -0.8) = 0.8, -min(-1, -1) = 1.0. Token sum = 1.2.
@pytest.mark.parametrize(
    "loss_type, expected",
    [
        ("clip", ((-1.2 - 0.5) / 2 + (1.1 + 0.8 + 1.0) / 3) / 2),
        ("dapo", 1.2 / 5),
        ("bnpo", 1.2 / 5),
        ("dr_grpo", 1.2 / (2 * 4)),
    ],
)
def test_clipped_loss_aggregations_hand_checked(loss_type, expected):
    logps, old = _clip_batch()
    loss, metrics = policy_loss(logps, old, ADV.double(), MASK, loss_type=loss_type, max_completion_length=4)
    assert loss.item() == pytest.approx(expected, abs=1e-12)
    assert metrics["clip_ratio/low_mean"].item() == pytest.approx(1 / 5)  # ratio 0.7 with A < 0
    assert metrics["clip_ratio/high_mean"].item() == pytest.approx(1 / 5)  # ratio 1.5 with A > 0
    assert metrics["clip_ratio/region_mean"].item() == pytest.approx(2 / 5)
    assert metrics["ratio/mean"].item() == pytest.approx((1.5 + 0.5 + 1.1 + 0.7 + 1.0) / 5)


def test_clipped_tokens_and_padding_get_no_gradient():
    logps, old = _clip_batch()
    loss, _ = policy_loss(logps, old, ADV.double(), MASK, loss_type="clip")
    loss.backward()
    grad = logps.grad
    assert grad[0, 0] == 0 and grad[1, 1] == 0  # clipped: outside the trust region
    assert grad[0, 2] == 0  # padding
    # d/dlogp of -ratio * A / (tokens in row * rows) = -ratio * A / (n * B)
    assert grad[0, 1].item() == pytest.approx(-0.5 * 1.0 / (2 * 2))
    assert grad[1, 0].item() == pytest.approx(1.1 / (3 * 2))


def test_r1v_loss_and_k3_kl_hand_checked():
    logps = torch.full((2, 3), -0.5, dtype=torch.float64, requires_grad=True)
    ref = logps.detach() + math.log(2.0)  # k3 = 2 - ln 2 - 1 on every token
    adv = torch.tensor([1.0, -2.0], dtype=torch.float64)
    loss, metrics = policy_loss(logps, None, adv, MASK, loss_type="r1v", beta=0.04, ref_logps=ref)
    k3 = 1 - math.log(2.0)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2 + 0.04 * k3, abs=1e-12)
    assert metrics["kl"].item() == pytest.approx(k3)
    assert metrics["ratio/mean"].item() == 1.0
    loss.backward()
    # policy part: -A / (n * B); KL part: beta * d k3/d logp = beta * (1 - exp(ref - logp)) / (n * B) = -beta / (n*B)
    assert logps.grad[0, 0].item() == pytest.approx((-1.0 - 0.04) / (2 * 2))
    assert logps.grad[1, 2].item() == pytest.approx((2.0 - 0.04) / (3 * 2))


def test_r1v_ignores_old_logps_except_for_tis():
    logps, old = _clip_batch()
    loss_old, _ = policy_loss(logps, old, ADV.double(), MASK, loss_type="r1v")
    loss_none, _ = policy_loss(logps, None, ADV.double(), MASK, loss_type="r1v")
    assert loss_old.item() == loss_none.item() == pytest.approx(-(1.0 - 1.0) / 2)


def test_kl_bias_correction_multiplies_kl_by_ratio():
    logps, old = _clip_batch()
    ref = logps.detach() + math.log(2.0)
    _, plain = policy_loss(logps, old, ADV.double(), MASK, beta=0.1, ref_logps=ref)
    _, corrected = policy_loss(logps, old, ADV.double(), MASK, beta=0.1, ref_logps=ref, kl_bias_correction=True)
    k3 = 1 - math.log(2.0)
    assert plain["kl"].item() == pytest.approx(k3)
    assert corrected["kl"].item() == pytest.approx(k3 * (1.5 + 0.5 + 1.1 + 0.7 + 1.0) / 5)


# ----------------------------------------------------------------------------------------------------------------
# Truncated importance sampling
# ----------------------------------------------------------------------------------------------------------------


def test_tis_weights_truncate_and_mask_hand_checked():
    old = torch.zeros(2, 3)
    rollout = -torch.tensor([[math.log(3.0), math.log(0.5), 0.0], [0.0, math.log(1.5), 5.0]])
    weights = rollout_importance_weights(old, rollout, MASK, "token_truncate", cap=2.0)
    torch.testing.assert_close(weights, torch.tensor([[2.0, 0.5, 1.0], [1.0, 1.5, math.exp(5.0)]]).clamp(max=2.0))
    masked = rollout_importance_weights(old, rollout, MASK, "token_mask", cap=2.0, floor=0.6)
    torch.testing.assert_close(masked, torch.tensor([[0.0, 0.0, 1.0], [1.0, 1.5, 0.0]]))
    # Sequence modes use the summed log-ratio over real tokens: row 0 -> 3 * 0.5 = 1.5, row 1 -> 1.5 * e^5.
    seq = rollout_importance_weights(old, rollout, MASK, "sequence_truncate", cap=2.0)
    torch.testing.assert_close(seq, torch.tensor([[1.5], [2.0]]))
    seq_mask = rollout_importance_weights(old, rollout, MASK, "sequence_mask", cap=2.0)
    torch.testing.assert_close(seq_mask, torch.tensor([[1.5], [0.0]]))


def test_tis_weights_scale_policy_term_and_metrics():
    logps = torch.zeros(2, 3, dtype=torch.float64, requires_grad=True)
    old = logps.detach().clone()
    rollout = old.clone()
    rollout[0, 0] = -math.log(3.0)  # learner thinks the token 3x likelier than the server did -> capped at 2
    rollout[1, 1] = float("nan")  # server gave no log-prob: weight 1, left out of the gap
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, metrics = policy_loss(logps, old, adv, MASK, loss_type="dapo", rollout_logps=rollout, tis_cap=2.0)
    assert loss.item() == pytest.approx((-2.0 - 1.0 + 1.0 + 1.0 + 1.0) / 5)
    assert metrics["tis_weight/max"].item() == pytest.approx(2.0)
    assert metrics["tis_weight/mean"].item() == pytest.approx((2.0 + 4 * 1.0) / 5)
    assert metrics["logprob_gap/max"].item() == pytest.approx(math.log(3.0))
    assert metrics["logprob_gap/mean"].item() == pytest.approx(math.log(3.0) / 4)


def test_tis_cap_none_turns_weighting_off_but_reports_gap():
    logps, old = _clip_batch()
    rollout = old - 1.0
    with_off, metrics = policy_loss(logps, old, ADV.double(), MASK, rollout_logps=rollout, tis_cap=None)
    plain, _ = policy_loss(logps, old, ADV.double(), MASK)
    assert with_off.item() == plain.item()
    assert "tis_weight/mean" not in metrics
    assert metrics["logprob_gap/mean"].item() == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------------------------
# Gradients and accumulation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ALL_LOSS_TYPES)
def test_positive_advantage_raises_logp_and_negative_lowers_it(loss_type):
    torch.manual_seed(4)
    logits = torch.nn.Parameter(torch.randn(2, 5, 16))
    labels = torch.randint(0, 16, (2, 5))
    mask = torch.ones(2, 5)
    adv = torch.tensor([1.0, -1.0])
    before = per_token_logps_from_logits(logits, labels).detach()
    logps = per_token_logps_from_logits(logits, labels, chunk=2)
    loss, _ = policy_loss(logps, before, adv, mask, loss_type=loss_type, max_completion_length=5)
    loss.backward()
    with torch.no_grad():
        logits -= 0.05 * logits.grad  # one small SGD step, inside the clip range
    after = per_token_logps_from_logits(logits, labels).detach()
    assert torch.all(after[0] > before[0])
    assert torch.all(after[1] < before[1])


@pytest.mark.parametrize("loss_type", ["r1v", "clip", "dapo", "dr_grpo"])  # bnpo is local-batch by definition
def test_micro_batches_with_batch_totals_sum_to_full_batch_loss(loss_type):
    torch.manual_seed(5)
    logps = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    old = logps.detach() + 0.3 * torch.randn(4, 6, dtype=torch.float64)
    ref = logps.detach() + 0.1 * torch.randn(4, 6, dtype=torch.float64)
    mask = (torch.rand(4, 6) > 0.3).double()
    mask[:, 0] = 1
    adv = torch.randn(4, dtype=torch.float64)
    common = dict(loss_type=loss_type, beta=0.05, max_completion_length=6)
    full, _ = policy_loss(logps, old, adv, mask, ref_logps=ref, **common)
    totals = dict(num_items_in_batch=mask.sum(), num_seqs_in_batch=4)
    parts = [
        policy_loss(logps[rows], old[rows], adv[rows], mask[rows], ref_logps=ref[rows], **common, **totals)[0]
        for rows in (slice(0, 1), slice(1, 4))
    ]
    assert sum(parts).item() == pytest.approx(full.item(), abs=1e-12)


def test_zero_advantage_sequences_get_no_policy_gradient():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])  # first group all equal
    adv, _ = group_advantages(rewards, 2)
    logps = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    old = logps.detach() + 0.1
    loss, _ = policy_loss(logps, old, adv.double(), torch.ones(4, 3), loss_type="dapo")
    loss.backward()
    assert torch.all(logps.grad[:2] == 0)
    assert torch.all(logps.grad[2:] != 0)


def test_policy_loss_rejects_bad_input():
    logps, old = _clip_batch()
    with pytest.raises(SuzakError, match="grpo.loss_type"):
        policy_loss(logps, old, ADV, MASK, loss_type="ppo")
    with pytest.raises(SuzakError, match="max_completion"):
        policy_loss(logps, old, ADV, MASK, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        policy_loss(logps, old, ADV, MASK, beta=0.1)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(logps, old, ADV, MASK[:, :2])

"""The host-offloaded optimizer and reference (trainer/offload.py), on CPU.

    .venv/bin/python -m pytest tests/unit/test_offload.py -q

Numerics (issue 15): at lr 1e-6 a bf16 weight cannot move (its spacing near 1 is 2^-8 = 0.0039, and an Adam step
is about lr), so plain bf16 AdamW loses every update, while HostAdamW's fp32 masters track an fp32 run.
"""

from __future__ import annotations

import pytest
import torch

from trainer.offload import HostAdamW, HostReference

LR = 1e-6
STEPS = 200


def _mlp(dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The same starting weights in any dtype: values representable in bf16, as a bf16 checkpoint's are."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.sign(p))  # weights around +-0.5..1, where bf16's spacing is 2^-9..2^-8
    return model.to(torch.bfloat16).to(dtype)


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)) for _ in range(n)]


def _train(model, optimizer, batches, dtype):
    for x, y in batches:
        loss = torch.nn.functional.mse_loss(model(x.to(dtype)).float(), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in params])


def _fp32_run(batches) -> tuple[torch.Tensor, torch.Tensor]:
    """(starting weights, accumulated update) of plain fp32 AdamW at LR: the reference the schemes are held to."""
    start = _flat(_mlp(torch.float32).parameters())
    reference = _mlp(torch.float32)
    _train(reference, torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.0), batches, torch.float32)
    return start, _flat(reference.parameters()) - start


def test_plain_bf16_loses_small_updates_and_host_adamw_tracks_fp32():
    batches = _batches(STEPS)
    start, moved = _fp32_run(batches)
    assert moved.abs().mean() > 0.2 * LR * STEPS  # Adam moves each weight by up to lr a step

    plain = _mlp(torch.float32).to(torch.bfloat16)
    bf16_start = _flat(plain.parameters())
    _train(plain, torch.optim.AdamW(plain.parameters(), lr=LR, weight_decay=0.0), batches, torch.bfloat16)
    lost = (_flat(plain.parameters()) == bf16_start).float().mean().item()
    assert lost > 0.99, f"plain bf16 kept {1 - lost:.1%} of its updates; expected ~none at lr {LR}"

    model = _mlp(torch.float32).to(torch.bfloat16)
    optimizer = HostAdamW(model, lr=LR, weight_decay=0.0, bucket_bytes=4096)  # several buckets
    assert len(optimizer.buckets) > 1
    _train(model, optimizer, batches, torch.bfloat16)
    tracked = _flat(optimizer.masters) - start
    # Stated tolerance: the accumulated update (200 steps) is within 2% of the fp32 run's, elementwise on average,
    # and points the same way; the gradients differ only by the bf16 forward.
    rel = (tracked - moved).norm() / moved.norm()
    cosine = torch.nn.functional.cosine_similarity(tracked, moved, dim=0)
    assert rel < 0.02 and cosine > 0.999, (rel.item(), cosine.item())
    # The model's weights are the masters rounded to bf16: they move once the sum of the small steps crosses
    # bf16's rounding boundary, which plain bf16 never reaches.
    assert torch.equal(_flat(model.parameters()), _flat(m.to(torch.bfloat16) for m in optimizer.masters))


def test_host_adamw_on_the_same_gradients_equals_torch_adamw_exactly():
    fp32 = _mlp(torch.float32)
    host_model = _mlp(torch.float32)
    reference = torch.optim.AdamW(fp32.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    host = HostAdamW(host_model, lr=1e-3, weight_decay=0.01, bucket_bytes=2048)
    for x, y in _batches(20):
        for model in (fp32, host_model):
            torch.nn.functional.mse_loss(model(x), y).backward()
        for a, b in zip(fp32.parameters(), host_model.parameters()):
            b.grad = a.grad.clone()  # identical gradients: only the optimizers differ
        reference.step()
        host.step()
        reference.zero_grad()
        host.zero_grad()
    assert len(host.masters) > len(list(fp32.parameters()))  # big weights were cut into chunks
    assert torch.equal(_flat(fp32.parameters()), _flat(host.masters))
    assert torch.equal(_flat(fp32.parameters()), _flat(host_model.parameters()))


@pytest.mark.parametrize("momentum", [torch.float32, torch.bfloat16])
def test_state_dict_round_trip_resumes_exactly(momentum):
    batches = _batches(12)
    straight = _mlp(torch.bfloat16)
    opt = HostAdamW(straight, lr=1e-4, momentum_dtype=momentum, bucket_bytes=1024)
    _train(straight, opt, batches, torch.bfloat16)

    first = _mlp(torch.bfloat16)
    opt1 = HostAdamW(first, lr=1e-4, momentum_dtype=momentum, bucket_bytes=1024)
    _train(first, opt1, batches[:6], torch.bfloat16)
    saved_weights = {k: v.clone() for k, v in first.state_dict().items()}
    saved = {k: v for k, v in opt1.state_dict().items()}
    assert len(saved["masters"]) == len(opt1.masters)

    resumed = _mlp(torch.bfloat16, seed=5)  # other weights: everything must come from the checkpoint
    resumed.load_state_dict(saved_weights)
    opt2 = HostAdamW(resumed, lr=1e-4, momentum_dtype=momentum, bucket_bytes=1024)
    opt2.load_state_dict(saved)
    _train(resumed, opt2, batches[6:], torch.bfloat16)
    for a, b in zip(opt.masters, opt2.masters):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_host_adamw_refuses_mixed_dtypes_and_a_mismatched_state():
    from suzak.errors import SuzakError

    model = _mlp(torch.float32)
    model[0].weight.data = model[0].weight.data.to(torch.bfloat16)
    with pytest.raises(SuzakError, match="one parameter dtype"):
        HostAdamW(model, lr=1e-3)
    small = HostAdamW(torch.nn.Linear(4, 4), lr=1e-3)
    state = HostAdamW(_mlp(torch.float32), lr=1e-3).state_dict()
    with pytest.raises(Exception):
        small.load_state_dict(state)


def test_host_reference_swaps_the_starting_weights_in_and_restores_the_policy():
    model = _mlp(torch.bfloat16)
    model[0].bias.requires_grad_(False)  # frozen weights are not copied
    start = _mlp(torch.bfloat16)
    ref = HostReference(model)
    assert len(ref.weights) == len(list(model.parameters())) - 1
    optimizer = HostAdamW(model, lr=1e-2)
    _train(model, optimizer, _batches(5), torch.bfloat16)
    trained = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad(), ref.swapped_in(model) as swapped:
        assert torch.equal(swapped(x), start(x))
    for p, t in zip(model.parameters(), trained):
        assert torch.equal(p, t)
    assert not torch.equal(model(x), start(x))


@pytest.mark.gpu
def test_host_reference_of_a_cuda_model_is_page_locked_in_one_exact_buffer():
    """The reference's upload runs from page-locked memory, without the power-of-two rounding of torch's pinned
    allocator: one buffer of exactly the trainable weights' size."""
    model = _mlp(torch.bfloat16).cuda()
    start = [p.detach().clone() for p in model.parameters()]
    ref = HostReference(model)
    assert ref.pinned and ref.buffer.is_pinned() and all(w.is_pinned() for w in ref.weights)
    assert ref.nbytes == sum(p.numel() * 2 for p in model.parameters())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        moved = [p.detach().clone() for p in model.parameters()]
        with ref.swapped_in(model):
            assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert all(torch.equal(p, m) for p, m in zip(model.parameters(), moved))


def test_bf16_first_moment_still_tracks_fp32_and_the_host_budget_picks_it():
    from trainer.offload import host_bytes_needed, pick_momentum_dtype

    batches = _batches(STEPS)
    start, moved = _fp32_run(batches)
    model = _mlp(torch.bfloat16)
    optimizer = HostAdamW(model, lr=LR, weight_decay=0.0, bucket_bytes=4096, momentum_dtype=torch.bfloat16)
    _train(model, optimizer, batches, torch.bfloat16)
    assert all(m.dtype == torch.bfloat16 for m in optimizer._momentum.values())
    assert all(optimizer.state[m]["exp_avg_sq"].dtype == torch.float32 for m in optimizer.masters)
    tracked = _flat(optimizer.masters) - start
    rel = (tracked - moved).norm() / moved.norm()
    assert rel < 0.03, rel.item()  # stated tolerance for the 16-bit first moment: 3% of the accumulated update

    seven_b, gib = 8_292_000_000, 1024**3
    assert host_bytes_needed(seven_b, seven_b, 4) > 108 * gib > host_bytes_needed(seven_b, seven_b, 2) + 12 * gib
    assert pick_momentum_dtype("auto", seven_b, seven_b, 123 * gib) == torch.bfloat16  # the H100 host: 125 GiB
    assert pick_momentum_dtype("auto", 3_755_000_000, 3_755_000_000, 123 * gib) == torch.float32
    assert pick_momentum_dtype("float32", seven_b, seven_b, 1) == torch.float32

"""The server's direct weight loads (vllm_server/direct_load.py): a plan learned from load_weights, then copies.

    .venv/bin/python -m pytest tests/unit/test_direct_load.py -q

vLLM's own loaders are not needed to test the recorder: `VLLMLikeModel.load_weights` loads the way vLLM's do
(q/k/v and gate/up into fused parameters, tensor-parallel narrowing, a padded vocabulary zero-filled, a tied head
skipped, a transforming loader). The plan must reproduce load_weights exactly on new weights, and must send what
it cannot copy through load_weights.
"""

from __future__ import annotations

import torch

from vllm_server.direct_load import DirectLoadPlan

VOCAB, PADDED_VOCAB, HIDDEN = 6, 8, 4


class VLLMLikeModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Parameter(torch.zeros(3 * HIDDEN, HIDDEN))
        self.gate_up = torch.nn.Parameter(torch.zeros(2 * HIDDEN, HIDDEN))
        self.embed = torch.nn.Parameter(torch.zeros(PADDED_VOCAB, HIDDEN))
        self.norm = torch.nn.Parameter(torch.zeros(HIDDEN))
        self.down_shard = torch.nn.Parameter(torch.zeros(HIDDEN, HIDDEN // 2))  # this rank's half of the columns

    @torch.no_grad()
    def load_weights(self, weights):
        for name, w in weights:
            if name in ("q", "k", "v"):
                i = "qkv".index(name)
                self.qkv.data[i * HIDDEN:(i + 1) * HIDDEN].copy_(w)
            elif name in ("gate", "up"):
                i = ("gate", "up").index(name)
                self.gate_up.data.narrow(0, i * HIDDEN, HIDDEN).copy_(w)
            elif name == "embed":
                self.embed.data[:VOCAB].copy_(w)
                self.embed.data[VOCAB:].fill_(0)
            elif name == "norm":  # Gemma-style: the stored weight is w + 1
                self.norm.data.copy_(w + 1)
            elif name == "down":  # tensor parallelism: rank 1 takes the second half of the columns
                self.down_shard.data.copy_(w.narrow(1, HIDDEN // 2, HIDDEN // 2))
            elif name == "lm_head":  # tied to the embedding: ignored
                continue
            else:
                raise KeyError(name)


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"q": (HIDDEN, HIDDEN), "k": (HIDDEN, HIDDEN), "v": (HIDDEN, HIDDEN), "gate": (HIDDEN, HIDDEN),
              "up": (HIDDEN, HIDDEN), "embed": (VOCAB, HIDDEN), "norm": (HIDDEN,), "down": (HIDDEN, HIDDEN),
              "lm_head": (VOCAB, HIDDEN)}
    return [(name, torch.randn(shape, generator=g)) for name, shape in shapes.items()]


def _reference(weights) -> dict[str, torch.Tensor]:
    model = VLLMLikeModel()
    model.load_weights(weights)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state(model, expected):
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_building_the_plan_loads_the_weights_like_load_weights():
    model, first = VLLMLikeModel(), _weights(0)
    plan = DirectLoadPlan.build(model, first)
    _assert_state(model, _reference(first))
    assert not plan.entries["norm"].direct  # the loader transformed it before copying
    assert plan.entries["lm_head"].direct and not plan.entries["lm_head"].copies  # ignored: nothing to copy
    assert not plan.entries["down"].copies[0].src_is_whole  # a narrowed source view
    assert plan.direct_names == len(first) - 1


def test_later_pushes_are_copies_that_equal_load_weights():
    model = VLLMLikeModel()
    plan = DirectLoadPlan.build(model, _weights(0))
    for seed in (1, 2):
        pushed = _weights(seed)
        stats = plan.apply(pushed)
        _assert_state(model, _reference(pushed))
        assert stats["fallback"] == ["norm"]
        assert stats["copies"] == len(pushed) - 2  # everything but norm (fallback) and lm_head (skipped)


def test_unexpected_shapes_or_dtypes_go_through_load_weights():
    model = VLLMLikeModel()
    plan = DirectLoadPlan.build(model, _weights(0))
    pushed = [(n, w.t().contiguous().t() if n == "q" else w) for n, w in _weights(3)]  # q: another stride
    pushed = [(n, w.double() if n == "gate" else w) for n, w in pushed]
    stats = plan.apply(pushed)
    assert {"q", "gate"} <= set(stats["fallback"])
    _assert_state(model, _reference(pushed))


def test_a_replaced_parameter_invalidates_the_plan():
    model = VLLMLikeModel()
    plan = DirectLoadPlan.build(model, _weights(0))
    assert plan.still_valid()
    model.qkv = torch.nn.Parameter(torch.zeros(3 * HIDDEN, HIDDEN))  # as a reload or a level-2 wake would
    assert not plan.still_valid()

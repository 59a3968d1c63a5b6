"""suzak/kernels.py: the vision tower's packed windows give transformers' per-window results, in fewer calls.

    .venv/bin/python -m pytest tests/unit/test_kernels.py -q
"""

from __future__ import annotations

import json

import pytest
import torch

from suzak.kernels import PACKED_VISION_ATTENTION, pack_vision_attention, packed_sdpa_attention, vision_attention_of
from suzak.errors import SuzakError
from suzak.models import load_model

# Mixed sizes: full windows, edge windows of other lengths, and an image smaller than one window.
GRIDS = {"qwen25vl": [[1, 16, 24], [1, 22, 34], [1, 16, 24], [1, 8, 6]],
         "qwen3vl": [[1, 16, 24], [1, 10, 14], [1, 16, 24]]}


@pytest.fixture(scope="module", params=["qwen25vl", "qwen3vl"])
def tiny_any(request, tmp_path_factory):
    from suzak.tiny import build_tiny_model

    family = request.param
    folder = build_tiny_model(tmp_path_factory.mktemp(family), family=family, hidden=64, layers=1, vision_depth=2,
                              vision_hidden=64, vocab_target=512)
    return family, folder


def _vision_pass(model, grid: torch.Tensor, pixels: torch.Tensor):
    """Merged features, their pixel gradient and the first block's qkv gradient for a square loss."""
    model.train()
    model.zero_grad()
    pixels = pixels.clone().requires_grad_(True)
    out = model.model.visual(pixels, grid_thw=grid).pooler_output
    out.square().sum().backward()
    return out.detach(), pixels.grad, model.model.visual.blocks[0].attn.qkv.weight.grad.clone()


def test_packed_windows_equal_transformers_per_window_attention(tiny_any):
    family, folder = tiny_any
    per_window = load_model(folder, dtype="float32", attn_implementation="sdpa", vision_attention="per_window")
    packed = load_model(folder, dtype="float32", attn_implementation="sdpa")
    assert vision_attention_of(per_window) == "sdpa" and vision_attention_of(packed) == PACKED_VISION_ATTENTION
    assert packed.config.text_config._attn_implementation == "sdpa"  # the language model keeps its own
    grid = torch.tensor(GRIDS[family])
    patch = per_window.config.vision_config.patch_size
    pixels = torch.randn(int(grid.prod(1).sum()), 3 * 2 * patch * patch, generator=torch.Generator().manual_seed(0))
    for a, b in zip(_vision_pass(per_window, grid, pixels), _vision_pass(packed, grid, pixels)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_packed_windows_make_one_call_per_window_length(tiny_any, monkeypatch):
    """The point of packing: the windowed block calls SDPA once per distinct window length, not once per window."""
    family, folder = tiny_any
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape)
        return sdpa(q, *args, **kwargs)

    grid = torch.tensor(GRIDS[family])
    counts = {}
    for mode in ("per_window", "packed"):
        model = load_model(folder, dtype="float32", attn_implementation="sdpa", vision_attention=mode)
        patch = model.config.vision_config.patch_size
        pixels = torch.randn(int(grid.prod(1).sum()), 3 * 2 * patch * patch)
        calls.clear()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        with torch.no_grad():
            model.model.visual(pixels, grid_thw=grid)
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", sdpa)
        counts[mode] = len(calls)
    images = len(GRIDS[family])
    assert counts["per_window"] >= images * 2  # the loop: at least one call per window or image, per block
    assert counts["packed"] <= 2 * 4  # two blocks, at most four lengths each (full, right, bottom, corner)
    # Qwen2.5-VL's windowed block has many windows of few lengths; Qwen3-VL attends per image (two sizes here).
    assert counts["packed"] * (4 if family == "qwen25vl" else 1.5) <= counts["per_window"], counts


def test_only_an_sdpa_vision_tower_is_switched(tiny, tmp_path):
    eager = load_model(tiny, dtype="float32", attn_implementation="eager")
    assert vision_attention_of(eager) == "eager" and not pack_vision_attention(eager)
    with pytest.raises(SuzakError, match="vision_attention 'loop' is not one of packed, per_window"):
        load_model(tiny, dtype="float32", vision_attention="loop")
    packed = load_model(tiny, dtype="float32", attn_implementation="sdpa")
    packed.save_pretrained(tmp_path / "saved")  # a checkpoint must not name an implementation only suzak registers
    assert PACKED_VISION_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert "vision_config" in json.loads((tmp_path / "saved" / "config.json").read_text())


def test_packed_attention_refuses_a_mask_or_mismatched_pieces():
    q = torch.randn(1, 2, 6, 4)
    cu = torch.tensor([0, 3, 6], dtype=torch.int32)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="not an attention mask"):
        packed_sdpa_attention(module, q, q, q, attention_mask=torch.ones(1, 1, 6, 6), cu_seq_lens_q=cu)
    with pytest.raises(ValueError, match="same pieces"):
        packed_sdpa_attention(module, q, q, q, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 2, 6]))
    out, _ = packed_sdpa_attention(module, q, q, q, cu_seq_lens_q=torch.tensor([0, 2, 3, 6]), scaling=0.5)
    cu = torch.tensor([0, 2, 3, 6])  # the lengths come to the host once per cu_seqlens tensor, not once per block
    from suzak import kernels
    assert kernels._plan(cu, 6, "cpu") is kernels._plan(cu, 6, "cpu")
    assert kernels._plan(cu.clone(), 6, "cpu") is not kernels._plan(cu, 6, "cpu")
    pieces = [(0, 2), (2, 3), (3, 6)]
    for start, end in pieces:  # each piece attends only within itself
        own = torch.nn.functional.scaled_dot_product_attention(q[:, :, start:end], q[:, :, start:end],
                                                               q[:, :, start:end], scale=0.5)
        torch.testing.assert_close(out[:, start:end], own.transpose(1, 2))


def test_liger_kernels_name_their_needs(tiny):
    """Without liger-kernel (CI) or without a GPU the option is refused with what to do, not a Triton traceback."""
    with pytest.raises(SuzakError, match="model.liger_kernels needs .*model.liger_kernels=false"):
        load_model(tiny, dtype="float32", liger_kernels=True)


@pytest.mark.gpu
def test_liger_kernels_keep_the_log_probs(tiny_any):
    """Liger's fused RMSNorm/SwiGLU on a CUDA model: the hidden states and gradients of the plain model."""
    pytest.importorskip("liger_kernel")
    family, folder = tiny_any
    plain = load_model(folder, dtype="float32", device="cuda")
    fused = load_model(folder, dtype="float32", device="cuda", liger_kernels=True)
    assert "forward" in vars(fused.model.language_model.norm) and "forward" not in vars(plain.model.language_model.norm)
    ids = torch.randint(10, 400, (2, 48), device="cuda")
    outputs = []
    for model in (plain, fused):
        model.zero_grad()
        hidden = model.model.language_model(input_ids=ids).last_hidden_state
        hidden.square().mean().backward()
        outputs.append((hidden.detach(), model.model.language_model.layers[0].mlp.up_proj.weight.grad.clone()))
    for a, b in zip(*outputs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)

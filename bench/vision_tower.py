"""The vision tower alone, transformers' per-window SDPA against suzak's packed windows (suzak/kernels.py).

    python -m bench.vision_tower --arch 7b --images 5 --size 896x448                  # one 7B micro-batch's images
    python -m bench.vision_tower --arch 3b --images 16 --size 476x308 --depth 8       # CPU: fewer blocks
    python -m bench.vision_tower --arch tiny --images 4 --size 224x160 --repeats 2     # smoke

Builds only the vision tower of the real architecture (random init, bf16 on a GPU, fp32 on a CPU), runs the same
images through it in both settings, checks that they give the same features, and times forward + backward (the
learner's update runs the tower forward, again in the recompute, and backward). Both settings alternate over
--repeats rounds after one untimed round each. --depth keeps the first N blocks (the full-attention blocks among
them stay full), for a CPU's patience. Prints `RESULT {json}` (also $OUT/vision_tower_<arch>.json).
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import cuda_sync, run_and_emit, versions
from bench.make_arch import ARCH_CHOICES, arch_factor, build_config

MODES = ("per_window", "packed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Time the vision tower with per-window and packed SDPA.")
    p.add_argument("--arch", choices=ARCH_CHOICES, default="7b")
    p.add_argument("--images", type=int, default=5, help="images per forward (one learner micro-batch's)")
    p.add_argument("--size", default="896x448", help="WxH in pixels, rounded to the patch grid (28 or 32 px)")
    p.add_argument("--depth", type=int, default=None, help="keep the first N vision blocks (default: all)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds (each times both settings once)")
    args = p.parse_args(argv)
    args.width, args.height = (int(v) for v in args.size.lower().split("x"))
    return args


def vision_config(arch: str, depth: int | None):
    if arch.startswith("tiny"):
        from suzak.tiny import build_tokenizer, tiny_config

        config = tiny_config(build_tokenizer(), family="qwen3vl" if arch == "tiny-qwen3vl" else "qwen25vl")
    else:
        config = build_config(arch)
    vision = config.vision_config
    if depth is not None:
        vision.depth = min(depth, vision.depth)
        if hasattr(vision, "fullatt_block_indexes"):
            vision.fullatt_block_indexes = [i for i in vision.fullatt_block_indexes if i < vision.depth]
        if hasattr(vision, "deepstack_visual_indexes"):
            vision.deepstack_visual_indexes = [i for i in vision.deepstack_visual_indexes if i < vision.depth]
    return config


def build_tower(config, device, dtype):
    """The vision tower alone (an 8B model's language half would not fit a small host in fp32)."""
    import torch
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

    tower_class = {"qwen2_5_vl": Qwen2_5_VisionTransformerPretrainedModel,
                   "qwen3_vl": Qwen3VLVisionModel}[config.model_type]
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        tower = tower_class._from_config(config.vision_config, dtype=dtype, attn_implementation="sdpa")
    tower.train()
    return tower


def forward_backward(tower, pixels, grid):
    out = tower(pixels, grid_thw=grid).pooler_output
    out.float().square().mean().backward()
    return out.detach()


def run(args) -> dict:
    import torch

    from suzak.kernels import set_vision_attention

    on_cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if on_cuda else ("cpu", torch.float32)
    config = vision_config(args.arch, args.depth)
    tower = build_tower(config, device, dtype)
    vision = config.vision_config
    factor = arch_factor(args.arch)
    grid_h, grid_w = (max(1, args.height // factor) * 2, max(1, args.width // factor) * 2)
    grid = torch.tensor([[1, grid_h, grid_w]] * args.images, device=device)
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(args.images * grid_h * grid_w, patch_dim, device=device, dtype=dtype,
                         generator=torch.Generator(device).manual_seed(0))
    features, times = {}, {mode: [] for mode in MODES}
    for round_index in range(args.repeats + 1):
        for mode in MODES:
            set_vision_attention(tower.config, mode)
            tower.zero_grad(set_to_none=True)
            cuda_sync()
            start = time.perf_counter()
            features[mode] = forward_backward(tower, pixels, grid)
            cuda_sync()
            if round_index > 0:  # the first round warms both up
                times[mode].append(time.perf_counter() - start)
        print(f"[vision] round {round_index}: " + ", ".join(f"{m} {times[m][-1]:.4f} s" for m in MODES if times[m]),
              flush=True)
    diff = float((features["packed"].float() - features["per_window"].float()).abs().max())
    mean = {mode: sum(v) / len(v) for mode, v in times.items()}
    windows = _windows(tower, grid)
    return {"bench": "vision_tower", "arch": args.arch, "device": torch.cuda.get_device_name() if on_cuda else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "images": args.images, "grid_hw": [grid_h, grid_w],
            "patches": int(pixels.shape[0]), "depth": vision.depth, "windows_per_forward": windows,
            "fwd_bwd_s": {m: round(v, 4) for m, v in mean.items()},
            "speedup": round(mean["per_window"] / mean["packed"], 2), "max_abs_diff": diff,
            "threads": torch.get_num_threads(), "versions": versions()}


def _windows(tower, grid) -> int | None:
    """Windows one windowed block attends over (Qwen2.5-VL), or images (Qwen3-VL has no windows)."""
    if not hasattr(tower, "window_size"):
        return int(grid.shape[0])
    from transformers.vision_utils import get_vision_window_index

    _, cu = get_vision_window_index(grid, spatial_merge_size=tower.spatial_merge_size,
                                    window_size=tower.window_size, patch_size=tower.patch_size)
    return int(cu.numel() - 1)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    return run_and_emit("vision", lambda: run(args), f"vision_tower_{args.arch}.json")


if __name__ == "__main__":
    sys.exit(main())

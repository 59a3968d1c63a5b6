"""Real FLOPs of a GRPO step: what the learner and the server actually compute, for an MFU that does not flatter.

    python -m bench.flops bench/grpo_step_7b_full_h100.json [...]     # real MFU of saved bench.grpo_step records

verl's tokens/s/GPU (and the "MFU" bench.grpo_step logged until 2026-12-07) credits 6N FLOPs to every prompt and
completion token of every rollout. With shared-prompt rows the learner runs a group's prompt (image included)
once, not G times, so that credit overstates the work; it also ignores the recompute of gradient checkpointing,
the reference pass and generation. Here each pass is counted as it runs:

- matmuls at 2 FLOPs a multiply-add: the language model's projections, MLP and LM head per token, plus attention
  scores and values (4 * hidden FLOPs per query-key pair and layer), causal; shared rows: each completion sees the
  prompt and itself only;
- the vision tower per patch (4 patches per visual token), its attention windowed (Qwen2.5-VL) or full (Qwen3-VL);
- learner: the loss forward, gradient checkpointing's recompute of what has gradients, the backward (2x forward for
  trained weights; 1x for the activations of a frozen or LoRA language model), the reference pass when beta > 0;
- server: one prefill per prompt (prefix caching shares it among the G samples) and G x C decode tokens.
Embedding lookups, norms, activations and the optimizer are not counted (they are not matmuls).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

H100_BF16_PEAK = 989e12


@dataclass(frozen=True)
class Dims:
    layers: int
    hidden: int
    kv_dim: int
    intermediate: int
    vocab: int
    vis_depth: int
    vis_hidden: int
    vis_intermediate: int
    vis_mlp_mats: int  # 3: gated SwiGLU (Qwen2.5-VL), 2: plain MLP (Qwen3-VL)
    vis_window_patches: int | None  # Qwen2.5-VL's windowed attention (full in its fullatt blocks); None: all full
    vis_full_blocks: int
    mergers: int  # Qwen3-VL's DeepStack adds one merger per deepstack layer
    merge_out: int

    @classmethod
    def from_config(cls, config: dict) -> Dims:
        text, vision = config.get("text_config", config), config["vision_config"]
        heads = text["num_attention_heads"]
        head_dim = text.get("head_dim") or text["hidden_size"] // heads
        window = vision.get("window_size")
        return cls(layers=text["num_hidden_layers"], hidden=text["hidden_size"],
                   kv_dim=text["num_key_value_heads"] * head_dim, intermediate=text["intermediate_size"],
                   vocab=text["vocab_size"], vis_depth=vision["depth"], vis_hidden=vision["hidden_size"],
                   vis_intermediate=vision["intermediate_size"],
                   vis_mlp_mats=3 if "fullatt_block_indexes" in vision else 2,
                   vis_window_patches=(window // vision["patch_size"]) ** 2 if window else None,
                   vis_full_blocks=len(vision.get("fullatt_block_indexes", [])),
                   mergers=1 + len(vision.get("deepstack_visual_indexes", [])),
                   merge_out=vision.get("out_hidden_size", text["hidden_size"]))

    def lm_token(self) -> float:
        """Forward FLOPs of one token through the language model's matmuls (LM head included)."""
        h = self.hidden
        per_layer = h * h + 2 * h * self.kv_dim + h * h + 3 * h * self.intermediate
        return 2.0 * (self.layers * per_layer + h * self.vocab)

    def lm_attention(self, pairs: float) -> float:
        return 4.0 * self.hidden * self.layers * pairs

    def image(self, visual_tokens: int) -> float:
        """Forward FLOPs of the vision tower and merger(s) for one image."""
        patches = 4 * visual_tokens
        v = self.vis_hidden
        linear = 2.0 * self.vis_depth * patches * (4 * v * v + self.vis_mlp_mats * v * self.vis_intermediate)
        merger = 2.0 * self.mergers * visual_tokens * (16 * v * v + 4 * v * self.merge_out)
        if self.vis_window_patches:
            windowed = self.vis_depth - self.vis_full_blocks
            pairs = windowed * patches * self.vis_window_patches + self.vis_full_blocks * patches * patches
        else:
            pairs = self.vis_depth * patches * patches
        return linear + merger + 4.0 * v * pairs


def causal_pairs(n: float) -> float:
    return n * (n + 1) / 2


def grpo_step_flops(dims: Dims, *, prompts: int, G: int, prompt_tokens: int, visual_tokens: int, completion: float,
                    train: str, beta: float, gradient_checkpointing: bool = True, share_prompt: bool = True
                    ) -> dict[str, float]:
    """{"learner", "generation", "total"} FLOPs of one step; train is full, frozen_vision or lora."""
    P, C = prompt_tokens, completion
    if share_prompt:  # one row a group: the prompt once, then G completions that each see the prompt and themselves
        tokens, images = P + G * C, 1
        pairs = causal_pairs(P) + G * (C * P + causal_pairs(C))
    else:
        tokens, images = G * (P + C), G
        pairs = G * causal_pairs(P + C)
    lm_fwd = prompts * (tokens * dims.lm_token() + dims.lm_attention(pairs))
    vis_fwd = prompts * images * dims.image(visual_tokens)
    lm_trained, vis_trained = train != "lora", train == "full"
    backward = lm_fwd * (2.0 if lm_trained else 1.0) + (2.0 * vis_fwd if vis_trained else 0.0)
    recompute = (lm_fwd + (vis_fwd if vis_trained else 0.0)) if gradient_checkpointing else 0.0
    passes = 1 + (1 if beta > 0 else 0)  # the loss's forward, and the reference's
    learner = passes * (lm_fwd + vis_fwd) + recompute + backward
    prefill = prompts * (P * dims.lm_token() + dims.lm_attention(causal_pairs(P)) + dims.image(visual_tokens))
    decode = prompts * G * (C * dims.lm_token() + dims.lm_attention(C * P + causal_pairs(C)))
    return {"learner": learner, "generation": prefill + decode, "total": learner + prefill + decode}


def real_mfu(dims: Dims, record: dict, peak: float = H100_BF16_PEAK) -> dict:
    """Real FLOPs and MFU of a bench.grpo_step record (its shape, setting and mean phase times)."""
    shape, setting, phases = record["shape"], record["setting"], record["phases_s"]
    flops = grpo_step_flops(dims, prompts=shape["prompts"], G=shape["G"], prompt_tokens=shape["prompt_tokens"],
                            visual_tokens=shape["visual_tokens"], completion=record.get("completion_len_mean")
                            or shape["completion_tokens"], train=record["train"], beta=setting["beta"],
                            gradient_checkpointing=setting["gradient_checkpointing"],
                            share_prompt=setting["share_prompt"])
    return {"real_flops_per_step": flops["total"], "real_flops_learner": flops["learner"],
            "real_flops_generation": flops["generation"],
            "real_mfu_step": round(flops["total"] / record["step_s"] / peak, 4),
            "real_mfu_learner": round(flops["learner"] / max(phases.get("update", 0.0), 1e-9) / peak, 4),
            "real_mfu_generation": round(flops["generation"] / max(phases.get("generate", 0.0), 1e-9) / peak, 4)}


def record_dims(record: dict) -> Dims:
    """The model shapes of a record: its model folder when it is still there, else bench.make_arch's arch."""
    from bench.make_arch import make_arch

    folder = Path(record.get("run_dir", "")).parent.parent / "models" / record["arch"]
    if not (folder / "config.json").is_file():
        folder = make_arch(Path("/tmp/suzak-bench-flops") / record["arch"], record["arch"])
    return Dims.from_config(json.loads((folder / "config.json").read_text()))


def main(argv: list[str] | None = None) -> int:
    for path in argv if argv is not None else sys.argv[1:]:
        record = json.loads(Path(path).read_text())
        mfu = real_mfu(record_dims(record), record)
        print(f"{path}: {record['arch']} {record['train']}, {record['step_s']:.1f} s/step, "
              f"{mfu['real_flops_per_step'] / 1e15:.1f} PFLOP/step; real MFU step {mfu['real_mfu_step']:.1%}, "
              f"learner {mfu['real_mfu_learner']:.1%}, generation {mfu['real_mfu_generation']:.1%} "
              f"(logged 6N MFU: step {record.get('mfu_step')}, learner {record.get('mfu_learner')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

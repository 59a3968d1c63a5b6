"""Benchmark: generation throughput through `suzak serve` (HTTP) against vLLM's offline LLM on the same batch.

    python -m bench.server_throughput --model 7b --prompts 64 --n 8 --max-tokens 256        # H100, 7B shapes
    python -m bench.server_throughput --model tiny --prompts 4 --n 2 --max-tokens 16 --gpu-memory-utilization 0.12

Both sides get identical work: `--prompts` chat prompts with one random `--image-size` image each (resized to the
pixel budget), n samples per prompt, `--max-tokens` tokens each (ignore_eos, temperature 1, seeded). HTTP runs
first (one warm-up request, then the timed batch as `--requests` concurrent requests); the server is stopped
before the offline engine starts, so each owns the GPU alone. Prints one line `RESULT {json}` with output
tokens/s of both and their ratio (the cost of HTTP, validation, images as data URLs and per-token logprobs).
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.common import nvidia_present
from bench.weight_sync import model_dir

QUESTION = "How many items are there in the image? Output the thinking process in <think> </think> and final " \
           "answer (number) in <answer> </answer> tags."


def images(count: int, size: int, min_pixels: int, max_pixels: int) -> list:
    import numpy as np
    from PIL import Image

    from suzak.images import resize_to_budget

    rng = np.random.RandomState(0)
    return [resize_to_budget(Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)),
                             min_pixels, max_pixels) for _ in range(count)]


def run_http(args, cfg, imgs, engine_args: dict) -> dict:
    from suzak import wire
    from suzak.images import encode_image_data_url
    from vllm_server.client import LocalServer, RolloutClient

    env = {"SUZAK_VLLM_ENGINE_ARGS": json.dumps(engine_args)} if engine_args else {}
    t0 = time.perf_counter()
    with LocalServer(cfg, Path(args.out) / "server.log", env=env, timeout_s=1200) as server:
        start_s = time.perf_counter() - t0
        client = RolloutClient(server.url, timeout=3600)
        refs = [encode_image_data_url(im) for im in imgs]
        sampling = wire.SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True,
                                       seed=0, logprobs=True)

        def request(chunk: list[str]) -> wire.GenerateResponse:
            prompts = [wire.Prompt(messages=[wire.ChatMessage(role="user", content=[
                wire.ContentPart(type="image", image=r), wire.ContentPart(type="text", text=QUESTION)])])
                for r in chunk]
            return client.generate(wire.GenerateRequest(prompts=prompts, sampling=sampling))

        request(refs[:1])  # warm-up: first-call JIT and caches
        result = {"server_start_s": round(start_s, 1), "engine_version": client.info().engine_version,
                  "request_mb": round(sum(len(r) for r in refs) / 1e6, 1)}
        for split in args.requests:
            client.reset_prefix_cache()
            size = -(-len(refs) // split)
            chunks = [refs[i:i + size] for i in range(0, len(refs), size)]
            t = time.perf_counter()
            with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
                responses = list(pool.map(request, chunks))
            seconds = time.perf_counter() - t
            tokens = sum(len(c.token_ids) for resp in responses for r in resp.results for c in r.completions)
            key = "http" if split == args.requests[0] else f"http_{split}req"
            # server_seconds: request received -> response built, so the rest is HTTP + JSON + the client.
            result |= {f"{key}_seconds": round(seconds, 3), f"{key}_output_tokens": tokens,
                       f"{key}_tok_per_s": round(tokens / seconds, 1),
                       f"{key}_server_seconds": round(max(r.seconds for r in responses), 3)}
        return result


def run_offline(args, cfg, imgs, engine_args: dict) -> dict:
    from vllm import LLM, SamplingParams

    from suzak.models import load_processor

    srv = cfg.server
    llm = LLM(model=cfg.model.name_or_path, dtype=srv.dtype, max_model_len=srv.max_model_len,
              gpu_memory_utilization=srv.gpu_memory_utilization, max_num_seqs=srv.max_num_seqs, seed=srv.seed,
              enforce_eager=srv.enforce_eager, limit_mm_per_prompt={"image": 4, "video": 0},
              mm_processor_kwargs={"min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels},
              **engine_args)
    processor = load_processor(cfg.model.name_or_path, min_pixels=cfg.model.min_pixels,
                               max_pixels=cfg.model.max_pixels)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                           "text": QUESTION}]}], add_generation_prompt=True, tokenize=False)
    prompts = [{"prompt": text, "multi_modal_data": {"image": [im]}} for im in imgs]
    params = SamplingParams(n=args.n, temperature=1.0, max_tokens=args.max_tokens, ignore_eos=True, seed=0,
                            logprobs=0)
    llm.generate(prompts[:1], params, use_tqdm=False)  # warm-up, as on the HTTP side
    llm.reset_prefix_cache()
    t = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"offline_seconds": round(seconds, 3), "offline_output_tokens": tokens,
            "offline_tok_per_s": round(tokens / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, 7b (Qwen2.5-VL-7B shapes, dummy weights) or a folder")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--requests", default="1", type=lambda v: [int(x) for x in v.split(",")],
                    help="split the batch into this many concurrent requests; a list (1,8) times each in turn")
    ap.add_argument("--mode", choices=["both", "http", "offline"], default="both")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs (always on CPU)")
    ap.add_argument("--out", default="runs/bench/server_throughput")
    args = ap.parse_args()

    from suzak.config import load_config
    from suzak.images import visual_tokens

    Path(args.out).mkdir(parents=True, exist_ok=True)
    on_gpu = nvidia_present()
    path, engine_args = model_dir(args.model, Path(args.out))
    cfg = load_config(None, [
        f"out_dir={args.out}", f"model.name_or_path={path}", "model.min_pixels=3136", "model.max_pixels=401408",
        f"server.dtype={'bfloat16' if on_gpu else 'float32'}",
        f"server.gpu_memory_utilization={args.gpu_memory_utilization}", f"server.max_model_len={args.max_model_len}",
        f"server.max_num_seqs={args.max_num_seqs}", f"server.enforce_eager={args.enforce_eager or not on_gpu}",
        "server.transport=files"])
    imgs = images(args.prompts, args.image_size, cfg.model.min_pixels, cfg.model.max_pixels)
    result = {"bench": "server_throughput", "model": args.model, "prompts": args.prompts, "n": args.n,
              "max_tokens": args.max_tokens, "requests": args.requests,
              "image_tokens": visual_tokens(imgs[0].height, imgs[0].width, 3136, 401408)}
    if args.mode in ("both", "http"):
        result |= run_http(args, cfg, imgs, engine_args)
    if args.mode in ("both", "offline"):
        result |= run_offline(args, cfg, imgs, engine_args)
    if args.mode == "both":
        result["http_over_offline"] = round(result["http_tok_per_s"] / result["offline_tok_per_s"], 3)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()

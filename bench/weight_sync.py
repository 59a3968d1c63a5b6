"""Benchmark: push learner weights into a running `suzak serve`, and check the server really serves them.

    python -m bench.weight_sync --model 7b --transport ipc --repeats 3            # H100: 7B shapes, CUDA IPC
    python -m bench.weight_sync --model 7b --transport ipc --set server.direct_weight_load=false   # vLLM's path
    python -m bench.weight_sync --model 7b --transport ipc --packed --bucket-mb 2048
    python -m bench.weight_sync --model tiny --transport files                    # CPU smoke check

Starts the server first (vLLM sizes its KV cache from the memory it sees free), then builds the learner's model
(random init; 7b = Qwen2.5-VL-7B shapes, with the server on dummy weights), takes the learner's own transport
(trainer.weight_push.choose_transport for server.transport), pushes it `--repeats` times and times
each push end to end plus the server's phases (pause with cache clearing, start, load, finish, resume). The check
pushes a perturbed copy (lm_head/embeddings negated) and then the original: greedy tokens must change, then come
back identical. Prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench.common import nvidia_present

QWEN25VL_7B_TEXT = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, max_window_layers=28, vocab_size=152064, max_position_embeddings=128000,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                         "mrope_section": [16, 24, 24]},
                        tie_word_embeddings=False, dtype="bfloat16")
QWEN25VL_7B_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                          fullatt_block_indexes=[7, 15, 23, 31])


def model_dir(name: str, root: Path) -> tuple[Path, dict]:
    """(model folder, extra vLLM engine args): tiny, 7b (the tiny tokenizer/processor with 7B shapes, no
    weights: the server loads dummy ones) or an existing folder."""
    from suzak.tiny import ensure_tiny_model

    if name not in ("tiny", "7b"):
        return Path(name), {}
    tiny = ensure_tiny_model(root / "tiny")
    if name == "tiny":
        return tiny, {}
    out = root / "qwen25vl-7b-shapes"
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            (out / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((tiny / "config.json").read_text())
    layers = QWEN25VL_7B_TEXT["num_hidden_layers"]
    cfg["text_config"].update(QWEN25VL_7B_TEXT, layer_types=["full_attention"] * layers)
    cfg["vision_config"].update(QWEN25VL_7B_VISION)
    cfg.update(tie_word_embeddings=False, dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out, {"load_format": "dummy"}


def learner_model(path: Path, device: str, dtype: str):
    """A random-init model of the folder's config, built directly on the device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(path)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=getattr(torch, dtype))
    return model.eval().requires_grad_(False)


def greedy_tokens(client, image_ref: str, max_tokens: int = 16) -> list[list[int]]:
    from suzak import wire

    prompt = wire.Prompt(messages=[wire.ChatMessage(role="user", content=[
        wire.ContentPart(type="image", image=image_ref), wire.ContentPart(type="text", text="Count the objects.")])])
    req = wire.GenerateRequest(prompts=[prompt], sampling=wire.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                                                ignore_eos=True, logprobs=False))
    return [c.token_ids for r in client.generate(req).results for c in r.completions]


def perturbed(weights: dict) -> dict:
    """lm_head and embeddings negated: a change that greedy decoding cannot miss."""
    return {k: (-v if ("lm_head" in k or "embed_tokens" in k) else v) for k, v in weights.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny", help="tiny, 7b (Qwen2.5-VL-7B shapes, random) or a model folder")
    ap.add_argument("--transport", choices=["ipc", "nccl", "files"], default=None,
                    help="default: ipc on a GPU, files on CPU (nccl needs a second GPU for the learner)")
    ap.add_argument("--packed", action="store_true", help="ipc: copy into bucket_mb buffers (bounded memory)")
    ap.add_argument("--bucket-mb", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.35)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--no-check", action="store_true", help="skip the perturb/restore correctness check")
    ap.add_argument("--learner-device", default=None, help="default cuda:0 when CUDA is available, else cpu")
    ap.add_argument("--out", default="runs/bench/weight_sync")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides, e.g. server.direct_weight_load=false (vLLM's weight-transfer engine)")
    args = ap.parse_args()
    run(args)


def run(args) -> None:
    from suzak.config import load_config
    from suzak.images import encode_image_data_url
    from trainer.weight_push import choose_transport
    from vllm_server.client import LocalServer, RolloutClient

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # No torch.cuda call before the server is up: vLLM sizes its KV cache from the free memory it sees.
    on_gpu = nvidia_present()
    transport_name = args.transport or ("ipc" if on_gpu else "files")
    path, engine_args = model_dir(args.model, out)
    dtype = "bfloat16" if on_gpu else "float32"
    cfg = load_config(None, [
        f"out_dir={out}", f"model.name_or_path={path}", "model.min_pixels=3136", "model.max_pixels=200704",
        f"server.dtype={dtype}", f"server.gpu_memory_utilization={args.gpu_memory_utilization if on_gpu else 0.12}",
        f"server.max_model_len={args.max_model_len}", "server.enforce_eager=true", "server.max_num_seqs=32",
        f"server.transport={transport_name}", f"server.bucket_mb={args.bucket_mb}", *args.overrides])
    t0 = time.perf_counter()
    env = {"SUZAK_VLLM_ENGINE_ARGS": json.dumps(engine_args)} if engine_args else {}
    server = LocalServer(cfg, out / "server.log", env=env, timeout_s=1200).wait()
    result: dict = {"bench": "weight_sync", "model": args.model, "transport": transport_name, "packed": args.packed,
                    "bucket_mb": args.bucket_mb, "server_start_s": round(time.perf_counter() - t0, 1),
                    "direct_weight_load": cfg.server.direct_weight_load, "overrides": args.overrides}
    with server:
        client = RolloutClient(server.url, timeout=1200)
        info = client.info()
        result.update(engine_version=info.engine_version, server_dtype=info.dtype)
        device = args.learner_device or ("cuda:0" if on_gpu else "cpu")
        t = time.perf_counter()
        model = learner_model(path, device, dtype)
        weights = dict(model.named_parameters())
        result.update(learner_init_s=round(time.perf_counter() - t, 2), tensors=len(weights),
                      gbytes=round(sum(w.numel() * w.element_size() for w in weights.values()) / 1e9, 3))
        transport = choose_transport(cfg, device, info, out_dir=out)  # the learner's own choice and settings
        if transport_name == "ipc":
            transport.packed = args.packed  # the learner pushes unpacked; --packed measures the other layout
        t = time.perf_counter()
        transport.init(client)
        result["init_s"] = round(time.perf_counter() - t, 3)
        image = encode_image_data_url(_test_image())
        before = greedy_tokens(client, image)
        pushes = []
        for i in range(args.repeats):
            stats = transport.push(weights.items(), version=i + 1)
            pushes.append({k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()
                           if k in ("total_s", "server_s", "write_s", "chunks", "shards", "bytes")}
                          | {"server": {k: round(v, 4) for k, v in stats.get("server_timings", {}).items()}})
            print(f"push {i + 1}: {pushes[-1]}", flush=True)
        result["pushes"] = pushes
        result["best_push_s"] = min(p["total_s"] for p in pushes)
        result["gbytes_per_s"] = round(result["gbytes"] / result["best_push_s"], 2)
        pushed = greedy_tokens(client, image)
        result["pushed_differs_from_initial"] = pushed != before  # 7b: random init vs vLLM's dummy weights
        if not args.no_check:
            transport.push(perturbed(weights).items(), version=args.repeats + 1)
            changed = greedy_tokens(client, image)
            transport.push(weights.items(), version=args.repeats + 2)
            restored = greedy_tokens(client, image)
            result.update(check_changed=changed != pushed, check_restored=restored == pushed,
                          final_version=client.info().policy_version)
    print("RESULT " + json.dumps(result), flush=True)


def _test_image():
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.RandomState(0).randint(0, 256, (224, 224, 3), dtype=np.uint8))


if __name__ == "__main__":
    main()

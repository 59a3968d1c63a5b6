"""Shared pieces of the fault suite: a fake engine, image bombs, process checks, a short real `suzak train`
(imported by the test modules and census.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import zlib
from pathlib import Path

from suzak import wire
from vllm_server.app import descendants  # noqa: F401 - the fault tests' process-tree helper
from vllm_server.client import pid_alive as alive  # noqa: F401 - the same liveness test as the product
from vllm_server.engine import Engine, RequestError, safetensors_shards

MIN_PIXELS, MAX_PIXELS = 3136, 100352


def png_bytes(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of any size, a few KB on disk (a decompression bomb when large): made without PIL."""
    row = b"\0" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def image_body(ref: str, **sampling) -> dict:
    return {"prompts": [{"messages": [{"role": "user", "content": [
        {"type": "image", "image": ref}, {"type": "text", "text": "How many objects?"}]}]}],
        "sampling": {"max_tokens": 4, **sampling}}


def text_body(text: str = "hi", **sampling) -> dict:
    return {"prompts": [{"messages": [{"role": "user", "content": text}]}], "sampling": {"max_tokens": 4, **sampling}}


def is_engine_core(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().startswith(b"VLLM::EngineCore")
    except OSError:
        return False


def parent_pid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def engine_core(server_pid: int) -> int:
    """The engine process itself: children it forks (compile workers) inherit its title, so take the topmost."""
    cores = [pid for pid in descendants(server_pid) if is_engine_core(pid)]
    top = [pid for pid in cores if not is_engine_core(parent_pid(pid))]
    if len(top) != 1:
        raise AssertionError(f"expected one VLLM::EngineCore under the server, found {top} (all: {cores})")
    return top[0]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 1024


class FakeEngine(Engine):
    """Answers every prompt with one completion [image count, pixels]; `hold` makes generate wait (in flight),
    `dead` makes check_alive report a death."""

    name = "fake"

    def __init__(self):
        super().__init__()
        self.hold: asyncio.Event | None = None
        self.dead: str | None = None
        self.generated = 0
        self.pushes = 0

    async def start(self) -> None:
        self.ready = True

    def check_alive(self) -> str | None:
        return self.dead

    def info(self) -> wire.ModelInfo:
        return wire.ModelInfo(model="fake", engine="fake", engine_version="0", policy_version=self.policy_version,
                              max_model_len=512, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32",
                              transports=["files"], max_images_per_prompt=2)

    async def generate(self, prompts, sampling):
        if self.hold is not None:
            await self.hold.wait()
        self.generated += 1
        # Like the real engine, prompt i samples with seed + i (echoed as the third token).
        return [wire.PromptResult(prompt_token_ids=[1], completions=[wire.Completion(
            text="x", token_ids=[len(p.images), sum(i.width * i.height for i in p.images), (sampling.seed or 0) + k],
            logprobs=None, finish_reason="length", policy_version=self.policy_version)]) for k, p in enumerate(prompts)]

    async def init_transport(self, req):
        return {"transport": req.transport}

    async def update_weights(self, req):
        if self.hold is not None:
            await self.hold.wait()
        _, count = safetensors_shards(req.path)
        self.pushes += 1
        self.policy_version = req.version
        return wire.WeightUpdateResponse(policy_version=req.version, seconds=0.0, tensors=count)

    async def sleep(self, level):
        raise RequestError("sleep mode is off", status=409)

    async def wake(self, tags):
        raise RequestError("sleep mode is off", status=409)

    async def reset_caches(self):
        return {}


# --------------------------------------------------------------------------- a real `suzak train`, cut short

TRAIN_STEPS = 5
TRAIN_SHORT = ["data.synth.n=32", "sft.max_steps=3", f"grpo.steps={TRAIN_STEPS}", "grpo.prompts_per_step=2",
               "grpo.num_generations=16", "grpo.max_completion_tokens=400", "grpo.ignore_eos=true", "eval.synth_n=8",
               "logging.progress=false", "checkpoint.every_steps=1", "checkpoint.keep_last=2"]
"""The embedded default cut to 3 SFT steps and 5 GRPO steps of fixed-length completions (grpo.ignore_eos): one
step's generation lasts seconds on 2 cores, long enough to be killed in the middle."""


def steps_logged(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def server_pid_of(out: Path) -> int | None:
    """The local rollout server a run in `out` started (its server.pid)."""
    try:
        return int(json.loads((out / "server.pid").read_text())["pid"])
    except (OSError, ValueError, KeyError):
        return None


def wait_for_grpo_step(proc, out: Path, log: Path, step: int = 3, timeout: float = 600) -> None:
    """Until the checkpoint of step - 1 is complete and its metrics line written, and step `step` is generating."""
    deadline = time.monotonic() + timeout
    checkpoint = out / "grpo" / "checkpoints" / f"step-{step - 1:06d}" / "state.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"`suzak train` ended ({proc.returncode}) before GRPO step {step}:\n"
                                 + log.read_text()[-3000:])
        if checkpoint.exists() and step - 1 in steps_logged(out / "grpo_metrics.jsonl"):
            time.sleep(0.5)  # into the step's generation
            assert steps_logged(out / "grpo_metrics.jsonl")[-1] == step - 1, f"step {step} ended before the kill"
            return
        time.sleep(0.1)
    raise AssertionError(f"no GRPO step-{step - 1} checkpoint after {timeout:.0f} s:\n" + log.read_text()[-3000:])

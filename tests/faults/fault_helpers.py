"""Shared pieces of the fault suite: a fake engine, image bombs, process checks (imported by the test modules)."""

from __future__ import annotations

import asyncio
import base64
import struct
import zlib

from suzak import wire
from vllm_server.app import descendants  # noqa: F401 - the fault tests' process-tree helper
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


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


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

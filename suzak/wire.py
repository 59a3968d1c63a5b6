"""Wire types between the learner/evaluator and the rollout server (pydantic, JSON over HTTP).

The server (`suzak serve`) validates every request against these models, so a malformed body is a 422/400
JSON error naming the field. `vllm_server/client.py` builds and parses them; neither side imports vLLM here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContentPart(Wire):
    """One part of a chat message: text, or an image given by local path, http(s) URL or data: URL (base64)."""

    type: Literal["text", "image"]
    text: str | None = None
    image: str | None = None

    @field_validator("image")
    @classmethod
    def _image_not_empty(cls, v: str | None) -> str | None:
        if v is not None and not v.strip():
            raise ValueError("image must be a path, an http(s) URL or a data: URL, not empty")
        return v


class ChatMessage(Wire):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]


class Prompt(Wire):
    """One multimodal chat prompt; the server applies the model's chat template with a generation prompt."""

    messages: list[ChatMessage] = Field(min_length=1)


class SamplingParams(Wire):
    n: int = Field(1, ge=1, le=1024)
    """Completions per prompt."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1)
    max_tokens: int = Field(256, ge=1)
    stop: list[str] = []
    seed: int | None = None
    """Makes sampling repeatable; prompt i of a request samples with seed + i."""
    ignore_eos: bool = False
    logprobs: bool = True
    """Return the sampled token's log-prob for every completion token."""


class GenerateRequest(Wire):
    prompts: list[Prompt] = Field(min_length=1)
    sampling: SamplingParams = SamplingParams()


class Completion(Wire):
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str | None
    policy_version: int


class PromptResult(Wire):
    prompt_token_ids: list[int]
    """Prompt ids as the engine saw them (image placeholders expanded); the learner checks its own against these."""
    completions: list[Completion]


class GenerateResponse(Wire):
    results: list[PromptResult]
    policy_version: int
    seconds: float


class ModelInfo(Wire):
    model: str
    engine: str
    engine_version: str
    policy_version: int
    max_model_len: int
    min_pixels: int
    max_pixels: int
    dtype: str
    patch_factor: int = 28
    """Pixels per side of one merged visual token of the served model (28 Qwen2.5-VL, 32 Qwen3-VL): images are
    resized to multiples of it."""
    transports: list[str]
    """Weight transports the server accepts: always 'files', plus 'ipc' or 'nccl' when vLLM's weight transfer is on."""
    sleeping: bool = False
    can_sleep: bool = False
    """Whether POST /sleep frees memory (vLLM sleep mode on a GPU, server.sleep_during_update=true)."""
    gpu_uuids: list[str] = []
    """NVML UUIDs of the server's GPUs; the learner picks the ipc transport only when it sits on one of them."""
    max_images_per_prompt: int = 4
    max_request_bytes: int | None = None
    """Largest request body the server reads (server.max_request_mb); larger ones get a 413."""


class WeightUpdateRequest(Wire):
    """Control message of a weight push; the tensors travel on the transport's own data plane."""

    version: int = Field(ge=0)
    transport: Literal["files", "ipc", "nccl"]
    path: str | None = None
    """files: the folder holding the safetensors shards."""
    payload: dict | None = None
    """ipc / nccl: transport-specific update_info (names, dtypes, shapes, handles)."""
    begin: bool = True
    """First message of the push: the server pauses generation (clearing its caches) and opens the update."""
    end: bool = True
    """Last message of the push: the server closes the update, sets `version` and resumes generation.
    A push in several chunks (packed ipc buckets) sends begin=true on the first and end=true on the last."""


class WeightUpdateResponse(Wire):
    policy_version: int
    seconds: float
    tensors: int
    timings: dict[str, float] = {}
    """Server-side seconds per phase: pause, load, finish, resume."""


class TransportInitRequest(Wire):
    """One-time set-up of a weight transport (POST /weights/init) before the first push."""

    transport: Literal["files", "ipc", "nccl"]
    init_info: dict = {}
    """ipc: {"packed": bool}; nccl: {"master_address", "master_port", "world_size", "packed", ...}; files: {}."""


class SleepRequest(Wire):
    level: int = Field(1, ge=1, le=2)
    """1: offload weights to CPU and drop the KV cache; 2: drop the weights too (push new ones before waking)."""


class WakeRequest(Wire):
    tags: list[str] | None = None
    """What to wake: ["weights"], ["kv_cache"], or everything (null)."""


class ErrorResponse(Wire):
    error: str
    field: str | None = None
    detail: str | None = None

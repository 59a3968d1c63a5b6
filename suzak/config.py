"""The one typed configuration tree of suzak, read from YAML with dotted command-line overrides.

    suzak train --config configs/qwen25vl_7b_clevr.yaml grpo.num_generations=4 server.port=8001

Every field carries a docstring (pydantic turns them into descriptions, shown by `suzak config --explain`).
Unknown keys and bad values are errors that name the key and what is allowed. This module imports only
pydantic and yaml, so it validates a config before anything heavy (torch, vLLM) is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from suzak.errors import SuzakError
from suzak.files import write_atomic


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, field docstrings become descriptions."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters instead of the full model; the reference model is then the adapters switched off."""
    r: int = Field(64, ge=1)
    """LoRA rank."""
    alpha: int = Field(128, ge=1)
    """LoRA alpha (scale = alpha / r)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Language-model module names that receive adapters."""


class ModelConfig(Section):
    name_or_path: str = "tiny"
    """'tiny' (the embedded random-init model of model.family, built on first use), a local HF folder, or a hub id
    such as Qwen/Qwen2.5-VL-7B-Instruct or Qwen/Qwen3-VL-8B-Instruct."""
    family: Literal["auto", "qwen25vl", "qwen3vl"] = "auto"
    """Model family: qwen25vl (Qwen2.5-VL, Qwen2-VL) or qwen3vl (Qwen3-VL). 'auto' follows the checkpoint's
    config.json; a family picks the tiny model (tiny + qwen3vl is tiny-qwen3vl) and is checked against a
    checkpoint's config.json at load."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Learner weight dtype. 'auto': bfloat16 on CUDA, float32 on CPU."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    """Attention kernel. 'auto': flash_attention_2 when importable on CUDA, otherwise sdpa."""
    vision_attention: Literal["packed", "per_window"] = "packed"
    """How an sdpa vision tower runs its windows: 'packed' batches the windows of each length into one SDPA call
    (suzak/kernels.py; the same numbers), 'per_window' keeps transformers' one call per window. flash_attention_2
    and eager are not changed."""
    liger_kernels: bool = False
    """Liger's fused Triton kernels (RMSNorm, and SwiGLU on Qwen2.5-VL) in the learner's model: CUDA only, needs
    the liger-kernel package."""
    min_pixels: int = Field(3136, ge=784)
    """Smallest image area (pixels) after resizing; must equal the server's (checked at connect time)."""
    max_pixels: int = Field(401408, ge=784)
    """Largest image area (pixels) after resizing (401408 = 512 visual tokens); larger images are downscaled."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass to save memory."""
    freeze_vision: bool = False
    """Freeze the vision tower (ViT blocks)."""
    freeze_merger: bool = False
    """Freeze the vision-to-language merger."""
    freeze_lm: bool = False
    """Freeze the language model (train only vision parts)."""
    lora: LoraConfig = LoraConfig()
    """LoRA adapters (peft)."""

    @model_validator(mode="before")
    @classmethod
    def _tiny_of_family(cls, data: Any) -> Any:
        """`tiny` with a family becomes that family's tiny model; a known name fixes an 'auto' family."""
        from suzak.families import FAMILIES, tiny_family

        if not isinstance(data, dict):
            return data
        data = dict(data)
        name, family = data.get("name_or_path", "tiny"), data.get("family", "auto")
        known = next((f for f in FAMILIES.values() if name in f.hub_ids), None)
        if family in FAMILIES and tiny_family(name) is not None:
            data["name_or_path"] = FAMILIES[family].tiny_name
        elif family in FAMILIES and known is not None and known.name != family:
            raise ValueError(f"model.family is {family} but {name} is {known.label}: set model.family to "
                             f"{known.name} or auto")
        elif family == "auto":
            known = tiny_family(name) or known
            if known is not None:
                data["family"] = known.name
        return data

    @model_validator(mode="after")
    def _pixels_ordered(self) -> ModelConfig:
        from suzak.families import FAMILIES

        if self.min_pixels > self.max_pixels:
            raise ValueError(f"min_pixels ({self.min_pixels}) must be <= max_pixels ({self.max_pixels})")
        if self.family in FAMILIES:  # multiples of the family's visual-token area (784 or 1024)
            try:
                FAMILIES[self.family].check_pixel_bounds(self.min_pixels, self.max_pixels)
            except SuzakError as e:
                raise ValueError(str(e)) from None
        return self


class SynthConfig(Section):
    n: int = Field(2000, ge=1)
    """Number of synthetic samples to generate."""
    seed: int = 0
    """Seed of the generator; the same seed gives the same data."""
    split: Literal["A", "B"] = "A"
    """CLEVR CoGenT condition of the generated scenes."""
    min_objects: int = Field(3, ge=1)
    """Fewest objects in a CLEVR scene."""
    max_objects: int = Field(10, ge=1)
    """Most objects in a CLEVR scene."""
    image_width: int = Field(480, ge=28)
    """Width of generated images in pixels."""
    image_height: int = Field(320, ge=28)
    """Height of generated images in pixels."""
    total_count_fraction: float = Field(1.0, ge=0.0, le=1.0)
    """Fraction of CLEVR questions that ask for the total count (the rest ask attribute counts)."""
    thinking: Literal["describe", "enumerate"] = "describe"
    """SFT thinking text: describe (list every object, then the count) or enumerate (count aloud "1 2 3", a short
    scratchpad small models can follow)."""


class DataConfig(Section):
    task: Literal["clevr_count", "geoqa", "superclevr"] = "clevr_count"
    """Task: defines prompts, answer extraction, rewards and scoring."""
    source: str = "synth"
    """Where the training data comes from: 'synth', a hub dataset id, a save_to_disk folder, or a JSONL file in the
    R1-V benchmark format."""
    split: str = "train"
    """Dataset split to read (hub datasets and DatasetDict folders)."""
    image_root: str | None = None
    """Folder that relative image paths in a JSONL are resolved against (default: the JSONL's folder)."""
    limit: int | None = Field(None, ge=1)
    """Use at most this many rows."""
    train_prompt: Literal["train", "eval"] = "train"
    """Prompt template used while training: R1-V's training prompt, or the benchmark's eval prompt (avoids the
    train/eval mismatch)."""
    system_prompt: bool = False
    """Prepend R1-V's text-only system prompt to every conversation."""
    synth: SynthConfig = SynthConfig()
    """Settings of the synthetic generator (source='synth')."""


class OptimConfig(Section):
    lr: float = Field(1e-6, gt=0)
    """Peak learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_ratio: float = Field(0.0, ge=0, le=1)
    """Fraction of the steps spent in linear warm-up."""
    scheduler: Literal["constant", "cosine", "linear"] = "constant"
    """Learning-rate schedule after warm-up."""
    max_grad_norm: float = Field(1.0, gt=0)
    """Gradient clipping norm."""
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    """Optimizer. adamw keeps fp32 master state; adamw_8bit needs bitsandbytes (CUDA)."""
    master_weights_fp32: bool = True
    """Keep fp32 master weights when the model runs in bf16 (plain bf16 loses updates at lr 1e-6)."""
    offload: Literal["auto", "gpu", "cpu"] = "auto"
    """Where full-parameter training keeps its fp32 master weights and AdamW moments. cpu: in host RAM (12 bytes a
    trainable parameter), with bf16 weights and grads on the GPU and the step streamed through the host
    (trainer/offload.py). gpu: on the GPU (fp32 parameters under bf16 autocast). auto: cpu when the GPU-resident
    layout does not fit the card (one process, CUDA, no LoRA, no DeepSpeed/FSDP strategy), else gpu."""
    offload_momentum_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """With offload=cpu: dtype of AdamW's first moment in host RAM (the masters and the second moment stay fp32).
    auto: float32 when the host has room for 12 bytes a trainable parameter plus the reference, else bfloat16
    (10 bytes: what lets a 7B with a reference fit a 128 GiB host)."""


class SFTConfig(Section):
    enabled: bool = True
    """Run the SFT stage before GRPO."""
    epochs: float = Field(1.0, gt=0)
    """Passes over the SFT data."""
    max_steps: int | None = Field(None, ge=1)
    """Stop after this many optimizer steps (overrides epochs)."""
    batch_size: int = Field(4, ge=1)
    """Examples per micro-batch per process."""
    grad_accum: int = Field(4, ge=1)
    """Micro-batches per optimizer step."""
    mask_prompt: bool = True
    """Mask the prompt (and image) tokens from the loss; R1-V's sft.py trains on the prompt too (set false for that)."""
    optim: OptimConfig = OptimConfig(lr=2e-5, warmup_ratio=0.1, scheduler="cosine")
    """Optimizer of the SFT stage (R1-V: lr 2e-5, cosine, warm-up 0.1)."""


class GRPOConfig(Section):
    enabled: bool = True
    """Run the GRPO stage."""
    steps: int = Field(100, ge=1)
    """Number of rollout batches (R1-V's 'steps')."""
    prompts_per_step: int = Field(8, ge=1)
    """Prompts sampled per step (all processes together)."""
    num_generations: int = Field(8, ge=2)
    """G: completions per prompt, forming one group."""
    max_completion_tokens: int = Field(512, ge=1)
    """Longest completion the server generates."""
    temperature: float = Field(0.9, ge=0)
    """Sampling temperature of the rollouts (R1-V's vLLM path: 0.9)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts."""
    top_k: int = Field(-1, ge=-1)
    """Top-k sampling of the rollouts (-1: off)."""
    ignore_eos: bool = False
    """Generate exactly max_completion_tokens per rollout (benchmarks: fixed-length steps)."""
    loss_type: Literal["r1v", "clip", "dapo", "dr_grpo"] = "clip"
    """Policy loss: r1v (no clip, k3 KL, sequence mean), clip (PPO-style), dapo (token mean), dr_grpo."""
    beta: float = Field(0.0, ge=0)
    """KL coefficient to a frozen reference model; 0 loads no reference (R1-V used 0.04)."""
    eps_low: float = Field(0.2, ge=0)
    """Lower clip range of the ratio."""
    eps_high: float = Field(0.28, ge=0)
    """Upper clip range of the ratio (DAPO clip-higher)."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage normalisation: group std (GRPO), batch std, or none (Dr.GRPO)."""
    num_iterations: int = Field(1, ge=1)
    """Optimisation passes over each rollout batch (mu)."""
    mini_batches: int = Field(1, ge=1)
    """Optimizer steps per pass; the rollout batch is split into this many mini-batches."""
    micro_batch_tokens: int = Field(16384, ge=64)
    """Token budget of one learner forward/backward micro-batch."""
    oversample: float = Field(1.0, ge=1.0)
    """Generate for this many times prompts_per_step prompts, then train on prompts_per_step groups, those whose
    rewards differ first (DAPO-style dynamic sampling with a fixed batch): groups with one reward for every
    completion have zero advantage and teach nothing. 1.0: off."""
    share_prompt: bool = True
    """Run each group's prompt (image included) once in the learner, its G completions after it in one row, each
    attending to the prompt and itself only: exact, and G-fold less prompt compute. Needs sdpa or eager attention
    (model.attn_implementation auto picks sdpa for it); with flash_attention_2 groups run unshared."""
    shared_prompt_attention: Literal["bias", "flex"] = "bias"
    """How the language model masks shared-prompt rows. bias: SDPA with a dense [W, W] additive mask per group (any
    device). flex: torch's FlexAttention with a block mask, which skips the blocks where one completion would see
    another (compiled on first use; CUDA learners only, as FlexAttention has no CPU backward)."""
    cpu_threads: int = Field(0, ge=0)
    """Intra-op threads of a learner on CPU. 0: half the cores when the pipeline runs the rollout server on the same
    host (server.url unset), else all. The server's threads stay busy after each generate (vLLM's shared-memory
    queue readers busy-poll; see server.cpu_threads), and a learner that wants every core then waits on them at
    each op: on 2 cores one thread halved the update time."""
    tis_cap: float | None = Field(2.0, gt=0)
    """Cap of the truncated importance-sampling correction for the server/learner log-prob mismatch (null: off)."""
    async_steps: Literal[0, 1] = 0
    """One-step off-policy overlap. 1: the server generates step t+1's rollouts while the learner updates on step
    t's, so each batch comes from the policy one update behind; the loss's ratio is then taken against the server's
    log-probs of the version that generated each rollout, and the staleness is logged (async/staleness_max <= 1).
    0: on-policy, every batch generated by the weights it trains. Needs the server awake during the update."""
    reward_mode: Literal["guarded", "r1v"] = "guarded"
    """Reward rules: guarded (hack guards on) or r1v (R1-V's exact rules)."""
    reward_weights: dict[str, float] = {"accuracy": 1.0, "format": 1.0}
    """Weight of each reward function in the summed reward."""
    optim: OptimConfig = OptimConfig()
    """Optimizer of the GRPO stage (R1-V: lr 1e-6, constant)."""


class ServerConfig(Section):
    url: str | None = None
    """URL of a running rollout server; when unset, the learner starts a local one."""
    host: str = "127.0.0.1"
    """Address the server binds; off localhost, admin routes need SUZAK_SERVER_TOKEN."""
    port: int = Field(8000, ge=1, le=65535)
    """Port the server listens on."""
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1)
    """Share of GPU memory vLLM takes (on CPU: share of RAM for the KV cache)."""
    max_model_len: int = Field(4096, ge=128)
    """Longest prompt + completion in tokens."""
    max_num_seqs: int = Field(256, ge=1)
    """Most sequences vLLM runs at once."""
    seed: int = 0
    """Seed of the engine's sampler."""
    enable_prefix_caching: bool = True
    """Share KV cache between rollouts of one prompt (and across steps until a weight update)."""
    enforce_eager: bool | Literal["auto"] = False
    """Disable CUDA graphs / torch.compile in vLLM (faster start, slower decode). auto: eager on a CPU host (where
    compiling only slows the start), CUDA graphs on a GPU."""
    dtype: Literal["auto", "bfloat16", "float32", "float16"] = "auto"
    """Server weight dtype. 'auto': bfloat16 on CUDA, float32 on CPU."""
    transport: Literal["auto", "files", "ipc", "nccl"] = "auto"
    """Weight transport from learner to server. auto: ipc when both share a GPU, nccl for other GPUs, files on CPU."""
    direct_weight_load: bool = True
    """ipc pushes copy straight into the served parameters, along a map learned from vLLM's own load_weights on
    the first push (vllm_server/direct_load.py); false: vLLM's weight-transfer engine (layerwise reload, slower)."""
    nccl_port: int = Field(29555, ge=1, le=65535)
    """TCP port of the NCCL weight-transfer rendezvous."""
    bucket_mb: int = Field(1024, ge=1)
    """Bucket size for packed weight pushes, in MiB."""
    cpu_threads: int = Field(0, ge=0)
    """Threads of a rollout server's model on a CPU host (no effect on a GPU). N > 0: the model runs inside vLLM's
    engine-core process (its one-process executor) on N threads, instead of in a worker process of its own bound
    to every core but one: one process fewer to start, and no shared-memory queue between the two, whose readers
    busy-poll for a second after each message. 0: a local server that the pipeline starts beside a CPU learner
    gets the cores the learner leaves (see grpo.cpu_threads); `suzak serve` on its own keeps vLLM's layout."""
    start_during_sft: bool | Literal["auto"] = False
    """Start the pipeline's local rollout server when SFT starts, on the base weights, and hand it the SFT weights
    when SFT ends: its start-up then overlaps SFT. Costs the server's memory (gpu_memory_utilization) during SFT.
    auto: only when a GPU is visible; on a CPU host the server's start-up and SFT compete for the same cores."""
    sleep_during_update: bool = False
    """Put the server to sleep (free its GPU memory) while the learner runs its update."""
    sleep_level: Literal[1, 2] = 2
    """vLLM sleep level for sleep_during_update. 2 drops the served weights as well as the KV cache (every step
    pushes fresh weights after the update anyway); 1 moves the weights to host RAM and back."""
    startup_timeout_s: float = Field(600.0, gt=0)
    """How long the learner waits for a local server to become ready."""
    request_timeout_s: float = Field(1800.0, gt=0)
    """HTTP timeout of one generate call."""
    weights_timeout_s: float = Field(300.0, gt=0)
    """HTTP timeout of one weight push (and of the other admin calls: transport set-up, sleep, wake)."""
    max_request_mb: float = Field(128.0, gt=0)
    """Largest request body the server reads; larger ones get a 413 before they are parsed."""
    max_prompt_chars: int = Field(0, ge=0)
    """Most characters of text in one prompt, checked before tokenising. 0: 32 x max_model_len."""
    allowed_image_roots: list[str] | None = None
    """Folders the server may open image paths under. Default (null): any local path when bound to loopback,
    none otherwise ([] also means none). Clients elsewhere send images as data: URLs."""
    allow_image_urls: bool | None = None
    """Whether the server fetches http(s) image URLs (no redirects followed). Default (null): on when bound to
    loopback, off otherwise."""
    token_for_generate: bool = False
    """Off loopback, require SUZAK_SERVER_TOKEN on /generate and /info too (the admin routes always need it)."""


class EvalConfig(Section):
    benchmarks: list[str] = ["clevr-synth"]
    """What `suzak train` evaluates after SFT, after GRPO and every `every_steps` steps: clevr-synth (held-out
    CoGenT-A and -B), clevr-synth-a/-b, geo-synth, or the files superclevr and geoqa (eval.data); [] for none."""
    every_steps: int = Field(0, ge=0)
    """Also evaluate every K GRPO steps, as eval/<set> metrics (0: only after SFT and after GRPO)."""
    scoring: Literal["r1v", "strict"] = "r1v"
    """r1v: R1-V's scripts exactly; strict: extract the <answer> first."""
    prompt: Literal["eval", "train"] = "eval"
    """R1-V's eval prompt of the benchmark, or the training prompt."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Completion budget; default per benchmark (SuperCLEVR 256, GeoQA 1024)."""
    limit: int | None = Field(None, ge=1)
    """Evaluate at most this many problems."""
    data: str | None = None
    """Data of the file benchmarks: their jsonl, or a folder holding it (default: data/superclevr, data/geoqa)."""
    synth_n: int = Field(200, ge=1)
    """Problems in the synthetic benchmarks."""
    synth_seed: int = 12345
    """Seed of the synthetic benchmarks (held out: differs from the training seed)."""


class CheckpointConfig(Section):
    every_steps: int = Field(50, ge=1)
    """Save a full checkpoint every K optimizer steps (and always at the end)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept on disk; older ones are deleted after a newer one is complete."""
    resume: bool = True
    """Continue from the newest checkpoint in the output folder when one exists."""
    push_to_hub: bool = False
    """Upload the final export (grpo/final, else sft/final) to the hub at the end of `suzak train`; HF_TOKEN and
    the repo are checked before training starts, pushed.json records the upload."""
    hub_model_id: str | None = None
    """Hub repo of the final export (default: $HUB_MODEL_ID)."""


class LoggingConfig(Section):
    log_every: int = Field(1, ge=1)
    """Print and record metrics every K steps."""
    wandb: bool = False
    """Log to Weights & Biases (needs WANDB_API_KEY; project and entity from WANDB_PROJECT / WANDB_ENTITY)."""
    tensorboard: bool = False
    """Write tensorboard event files (tensorboardX) under out_dir/tb."""
    progress: bool = True
    """Show progress bars."""


class RunConfig(Section):
    out_dir: str = "runs/default"
    """Folder of every output of the run: checkpoints, metrics, reports, the resolved config."""
    seed: int = 0
    """Seed of everything random in the learner (data order, init, dropout)."""
    model: ModelConfig = ModelConfig()
    """The policy model and its processor."""
    data: DataConfig = DataConfig()
    """Training data and task."""
    sft: SFTConfig = SFTConfig()
    """Supervised fine-tuning stage."""
    grpo: GRPOConfig = GRPOConfig()
    """GRPO stage."""
    server: ServerConfig = ServerConfig()
    """Rollout server."""
    eval: EvalConfig = EvalConfig()
    """Evaluation."""
    checkpoint: CheckpointConfig = CheckpointConfig()
    """Checkpointing and export."""
    logging: LoggingConfig = LoggingConfig()
    """Console, file, wandb and tensorboard logging."""

    @model_validator(mode="after")
    def _overlap_needs_an_awake_server(self) -> RunConfig:
        if self.grpo.async_steps and self.server.sleep_during_update:
            raise ValueError("grpo.async_steps=1 has the server generate while the learner updates, but "
                             "server.sleep_during_update=true puts it to sleep then: set server.sleep_during_update="
                             "false (more card memory for the server) or grpo.async_steps=0")
        return self


# --------------------------------------------------------------------------- loading


def parse_override(item: str) -> tuple[list[str], Any]:
    """'grpo.num_generations=4' -> (['grpo', 'num_generations'], 4); the value is parsed as YAML."""
    if "=" not in item:
        raise SuzakError(f"override '{item}' must look like section.key=value (e.g. grpo.num_generations=4)")
    key, raw = item.split("=", 1)
    value = yaml.safe_load(raw) if raw != "" else ""
    return key.strip().split("."), value


def _set_dotted(tree: dict, path: list[str], value: Any, model: type[BaseModel]) -> None:
    """Set tree[path] = value, checking each key against the schema so a typo names the allowed keys."""
    node, schema = tree, model
    for depth, key in enumerate(path):
        fields = schema.model_fields if schema is not None else {}
        if schema is not None and key not in fields:
            where = ".".join(path[:depth]) or "top level"
            raise SuzakError(f"unknown config key '{'.'.join(path)}': '{key}' is not in {where}; "
                             f"allowed: {', '.join(fields)}")
        if depth == len(path) - 1:
            node[key] = value
            return
        annotation = fields[key].annotation if schema is not None else None
        schema = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise SuzakError(f"config key '{'.'.join(path[: depth + 1])}' is a value, not a section")


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; `suzak config --explain` lists the keys)")
        else:
            lines.append(f"  {key}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML config (or the defaults), apply dotted overrides, and validate the whole tree."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise SuzakError(f"config file {path} not found; the recipes live in configs/ "
                             "(e.g. configs/tiny_clevr.yaml)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise SuzakError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise SuzakError(f"config file {path} must hold a mapping of sections (model:, data:, grpo: ...)")
        source = str(path)
    for item in overrides:
        keys, value = parse_override(item)
        _set_dotted(tree, keys, value, RunConfig)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise SuzakError(_format_validation_error(e, source)) from None


def save_config(cfg: RunConfig, folder: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config next to an output, atomically."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return write_atomic(folder / name, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def explain(model: type[BaseModel] = RunConfig, prefix: str = "") -> list[str]:
    """One line per leaf key: 'grpo.beta = 0.0  # KL coefficient ...'."""
    lines = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.extend(explain(ann, key + "."))
        else:
            lines.append(f"{key} = {field.default!r}  # {field.description or ''}")
    return lines

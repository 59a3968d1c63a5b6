"""Full-parameter training on one card: fp32 master weights and AdamW moments in host RAM, bf16 weights on the GPU.

    from trainer.offload import HostAdamW, HostReference
    optimizer = HostAdamW(model, lr=1e-6, weight_decay=0.0)   # model: bf16 parameters (GPU or CPU)
    loss.backward(); optimizer.step(); optimizer.zero_grad()  # grads down, AdamW on the host, bf16 weights up
    ref = HostReference(model)                                # the starting weights, in host RAM
    with ref.swapped_in(model): logps = model(...)            # the reference's outputs, no second GPU copy

Run its tests:  .venv/bin/python -m pytest tests/unit/test_offload.py -q

Why this layout: the GPU keeps 4 bytes a parameter (bf16 weight + bf16 grad) instead of 16 (fp32 master, grad and
two moments), which is what lets a 7B policy train beside the rollout server on one 80 GB card. The update is
exact in the sense that matters at lr 1e-6: AdamW runs on the fp32 masters, and the GPU weights are those masters
rounded to bf16 after every step, so updates below bf16's resolution accumulate instead of vanishing.
The step streams buckets: bucket k+1's gradients come down while the host updates bucket k, and bucket k's new
weights go up on a second stream while the host moves on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import torch

from suzak.cpu import usable_cores
from suzak.errors import SuzakError
from suzak.log import get_logger

DEFAULT_BUCKET_BYTES = 512 * 1024**2  # bytes of one streamed bucket: a power of two, so pinning wastes nothing
RUNTIME_HOST_BYTES = 16 * 1024**3  # the learner and server processes themselves, with a margin


def _pinned(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    # torch's pinned allocator rounds every block up to a power of two: buffers are sized to be one.
    buffer = torch.empty(numel, dtype=dtype)
    return buffer.pin_memory() if pin else buffer


def host_bytes_needed(trainable: int, reference: int = 0, momentum_bytes: int = 4) -> int:
    """Host RAM of the offloaded optimizer (fp32 master, fp32 second moment, first moment of `momentum_bytes`),
    a bf16 reference copy of `reference` parameters, and the pinned staging buckets."""
    return (8 + momentum_bytes) * trainable + 2 * reference + 4 * DEFAULT_BUCKET_BYTES


def host_memory_available() -> int | None:
    """MemAvailable of this host in bytes (None where /proc/meminfo is missing)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pick_momentum_dtype(setting: str, trainable: int, reference: int, available: int | None) -> torch.dtype:
    """optim.offload_momentum_dtype: float32 when the host has room for it (with the runtime's share), else bf16."""
    if setting != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16}[setting]
    if available is None or host_bytes_needed(trainable, reference, 4) + RUNTIME_HOST_BYTES <= available:
        return torch.float32
    return torch.bfloat16


class _Chunk:
    """A contiguous range of one parameter: the unit that is streamed and stepped (a master of its own)."""

    __slots__ = ("param", "start", "end")

    def __init__(self, param: torch.Tensor, start: int, end: int):
        self.param, self.start, self.end = param, start, end

    @property
    def numel(self) -> int:
        return self.end - self.start

    def weight(self) -> torch.Tensor:
        return self.param.detach().view(-1)[self.start:self.end]

    def grad(self) -> torch.Tensor | None:
        return None if self.param.grad is None else self.param.grad.view(-1)[self.start:self.end]


class HostAdamW(torch.optim.AdamW):
    """torch's AdamW over fp32 host copies of the model's (bf16) trainable parameters.

    The optimizer's own parameters are the host masters (one per chunk of at most one bucket, so a 1 GB embedding
    streams like any other weight), so LR schedulers, param_groups and the moments' state work as for any torch
    optimizer; state_dict() carries the masters too, so a resumed run continues from the exact fp32 weights, not
    from their bf16 rounding. Gradient clipping runs on the model's gradients before step().
    momentum_dtype bfloat16 keeps the first moment in 16 bits (a 7B's fp32 state would not fit a 128 GiB host
    beside the reference); the second moment stays fp32, since its 0.999 decay is below bf16's resolution.
    """

    def __init__(self, model: torch.nn.Module | list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bucket_bytes: int = DEFAULT_BUCKET_BYTES, threads: int | None = None,
                 momentum_dtype: torch.dtype = torch.float32):
        groups = model if isinstance(model, list) else [{"params": [p for p in model.parameters() if p.requires_grad],
                                                         "weight_decay": weight_decay}]
        params = [p for g in groups for p in g["params"]]
        if not params:
            raise SuzakError("HostAdamW got no trainable parameters (check the freeze_* flags)")
        dtypes = {p.dtype for p in params}
        if len(dtypes) != 1:
            raise SuzakError(f"HostAdamW needs one parameter dtype, got {sorted(map(str, dtypes))}")
        self.device_params = params
        bucket_numel = max(1, bucket_bytes // params[0].element_size())
        self.chunks: list[_Chunk] = []
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                for start in range(0, p.numel(), bucket_numel):
                    chunk = _Chunk(p, start, min(p.numel(), start + bucket_numel))
                    self.chunks.append(chunk)
                    masters.append(chunk.weight().to("cpu", torch.float32, copy=True))
            master_groups.append({**group, "params": masters})
        self.masters = [m for g in master_groups for m in g["params"]]
        self.on_cuda = params[0].is_cuda
        # fused is torch's vectorised CPU kernel; it needs float masters, which these always are.
        super().__init__(master_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
        self.momentum_dtype = momentum_dtype
        self._momentum: dict[int, torch.Tensor] = {}  # chunk index -> compressed exp_avg between steps
        self.buckets = self._cut_buckets(bucket_numel)
        self.last_step_s: float | None = None
        self.threads = threads or usable_cores()
        # Pinned buffers are one bucket exactly (a power of two: no rounding waste); host-only ones just fit.
        size = bucket_numel if self.on_cuda else max(sum(self.chunks[i].numel for i in b) for b in self.buckets)
        self._grads = [_pinned(size, params[0].dtype, self.on_cuda) for _ in range(2)]
        self._weights = [_pinned(size, params[0].dtype, self.on_cuda) for _ in range(2)]
        self._grad32 = torch.empty(size, dtype=torch.float32)
        if self.on_cuda:
            self._down, self._up = torch.cuda.Stream(), torch.cuda.Stream()
            self._uploaded = [None, None]  # events: when the upload from weight buffer i has finished

    def _cut_buckets(self, bucket_numel: int) -> list[list[int]]:
        buckets, current, size = [], [], 0
        for i, chunk in enumerate(self.chunks):
            if current and size + chunk.numel > bucket_numel:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += chunk.numel
        return buckets + ([current] if current else [])

    # ------------------------------------------------------------------ the step

    def _download(self, k: int):
        """Queue bucket k's gradients into grad buffer k % 2; returns what to wait on."""
        buffer, offset = self._grads[k % 2], 0
        stream = self._down if self.on_cuda else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            for i in self.buckets[k]:
                chunk = self.chunks[i]
                grad = chunk.grad()
                if grad is None:
                    buffer[offset:offset + chunk.numel].zero_()
                else:
                    buffer[offset:offset + chunk.numel].copy_(grad, non_blocking=True)
                offset += chunk.numel
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _upload(self, k: int) -> None:
        """Round bucket k's masters to the model's dtype and copy them into its parameters."""
        slot = k % 2
        if self.on_cuda and self._uploaded[slot] is not None:
            self._uploaded[slot].synchronize()  # that buffer's previous upload is done: safe to overwrite
        buffer, offset, pending = self._weights[slot], 0, []
        for i in self.buckets[k]:
            n = self.chunks[i].numel
            buffer[offset:offset + n].copy_(self.masters[i])
            pending.append((self.chunks[i].weight(), buffer[offset:offset + n]))
            offset += n
        if not self.on_cuda:
            for dst, src in pending:
                dst.copy_(src)
            return
        with torch.cuda.stream(self._up):
            for dst, src in pending:
                dst.copy_(src, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._up)
        self._uploaded[slot] = event

    def _expand_momentum(self, bucket: list[int]) -> None:
        for i in bucket:
            if i in self._momentum:
                self.state[self.masters[i]]["exp_avg"] = self._momentum[i].float()

    def _compress_momentum(self, bucket: list[int]) -> None:
        for i in bucket:
            self._momentum[i] = self.state[self.masters[i]].pop("exp_avg").to(self.momentum_dtype)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise SuzakError("HostAdamW.step takes no closure")
        start = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # memory-bound on the host: every core helps (the server sleeps)
        try:
            self._stream_buckets()
        finally:
            torch.set_num_threads(threads)
        self.last_step_s = time.perf_counter() - start
        return None

    def _stream_buckets(self) -> None:
        compressed = self.momentum_dtype != torch.float32
        pending = self._download(0)
        for k, bucket in enumerate(self.buckets):
            if pending is not None:
                pending.synchronize()
            total = sum(self.chunks[i].numel for i in bucket)
            grad32 = self._grad32[:total]
            grad32.copy_(self._grads[k % 2][:total])
            offset = 0
            for i in bucket:
                n = self.chunks[i].numel
                self.masters[i].grad = grad32[offset:offset + n]
                offset += n
            # The next bucket comes down while the host updates this one (its buffer was consumed above).
            pending = self._download(k + 1) if k + 1 < len(self.buckets) else None
            if compressed:
                self._expand_momentum(bucket)
            super().step()  # torch's AdamW steps exactly the masters that have a grad: this bucket's
            if compressed:
                self._compress_momentum(bucket)
            for i in bucket:
                self.masters[i].grad = None
            self._upload(k)
        if self.on_cuda:
            torch.cuda.current_stream().wait_stream(self._up)  # the next forward reads the new weights
            self._up.synchronize()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.device_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        state = super().state_dict()
        # References, not copies: a 7B copy would be tens of GB of host RAM.
        state["masters"] = list(self.masters)
        state["momentum"] = dict(self._momentum)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        momentum = state_dict.pop("momentum", {})
        super().load_state_dict(state_dict)
        self._momentum = {i: m.to(self.momentum_dtype) for i, m in momentum.items()}
        if self.momentum_dtype == torch.float32:  # a checkpoint written with compressed momentum
            for i in list(self._momentum):
                self.state[self.masters[i]]["exp_avg"] = self._momentum.pop(i).float()
        else:  # one written with fp32 momentum
            for i, master in enumerate(self.masters):
                if "exp_avg" in self.state.get(master, {}):
                    self._momentum[i] = self.state[master].pop("exp_avg").to(self.momentum_dtype)
        if masters is None:
            return  # an optimizer state without masters: keep the ones taken from the loaded weights
        if len(masters) != len(self.masters):
            raise SuzakError(f"the optimizer state holds {len(masters)} master tensors, the model trains "
                             f"{len(self.masters)}: was a freeze_* flag (or the bucket size) changed since the "
                             "checkpoint?")
        with torch.no_grad():
            for i, (master, saved) in enumerate(zip(self.masters, masters)):
                master.copy_(saved)
                self.chunks[i].weight().copy_(saved.to(self.chunks[i].param.dtype))


class HostReference:
    """The reference policy of GRPO's KL term, as a bf16 copy of the starting trainable weights in host RAM.

    Frozen weights never change, so only the trainable ones are copied. swapped_in() puts them into the live
    model for a no-grad pass and then restores the policy from a same-device stash: the card briefly holds the
    trainable weights twice, but never a second model.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        # One flat buffer of exactly the weights' size, page-locked in place for a CUDA model: torch's pinned
        # allocator rounds each block up to a power of two, which nearly doubled a 7B reference (and ran the host
        # out of memory), while pageable memory uploads through a staging copy at a fraction of the bus's speed.
        dtype = self.params[0].dtype if self.params else torch.bfloat16
        self.buffer = torch.empty(sum(p.numel() for p in self.params), dtype=dtype)
        self.weights, offset = [], 0
        for p in self.params:
            weight = self.buffer[offset:offset + p.numel()].view(p.shape)
            weight.copy_(p.detach())  # copy_ converts device and dtype in one pass
            self.weights.append(weight)
            offset += p.numel()
        self.pinned = bool(self.params) and self.params[0].is_cuda and _page_lock(self, self.buffer)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    @contextmanager
    def swapped_in(self, model: torch.nn.Module):
        with torch.no_grad():
            stash = [p.detach().clone() for p in self.params]
            for p, w in zip(self.params, self.weights):
                p.copy_(w, non_blocking=True)
        try:
            yield model
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, stash):
                    p.copy_(s)
            del stash


def _page_lock(owner, buffer: torch.Tensor) -> bool:
    """Page-lock a host tensor in place (cudaHostRegister) until `owner`, which holds it, is collected; False (and
    the buffer stays pageable) where the driver refuses."""
    import weakref

    cudart = torch.cuda.cudart()
    size = buffer.numel() * buffer.element_size()
    if size == 0 or int(cudart.cudaHostRegister(buffer.data_ptr(), size, 0)) != 0:
        get_logger("offload").warning("could not page-lock the host reference: its uploads run at pageable speed")
        return False
    weakref.finalize(owner, cudart.cudaHostUnregister, buffer.data_ptr())
    return True

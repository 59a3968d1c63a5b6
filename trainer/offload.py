"""Full-parameter training on one card: fp32 master weights and AdamW moments in host RAM, bf16 weights on the GPU.

    from trainer.offload import HostAdamW, HostReference
    optimizer = HostAdamW(model, lr=1e-6, weight_decay=0.0)   # model: bf16 parameters (GPU or CPU)
    loss.backward(); optimizer.step(); optimizer.zero_grad()  # grads down, AdamW on the host, bf16 weights up
    ref = HostReference(model)                                # the starting weights, pinned in host RAM
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

import os
import time
from contextlib import contextmanager, nullcontext

import torch

from suzak.errors import SuzakError

DEFAULT_BUCKET_BYTES = 512 * 1024**2  # bf16 bytes of one streamed bucket (two are in flight, pinned)


def _pinned(numel: int, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    buffer = torch.empty(numel, dtype=dtype)
    return buffer.pin_memory() if pin else buffer


def host_bytes_needed(trainable: int, reference: int = 0) -> int:
    """Host RAM the offloaded optimizer (fp32 master + two fp32 moments) and a bf16 reference copy take."""
    return 12 * trainable + 2 * reference


def host_memory_available() -> int | None:
    """MemAvailable of this host in bytes (None where /proc/meminfo is missing)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class HostAdamW(torch.optim.AdamW):
    """torch's AdamW over fp32 host copies of the model's (bf16) trainable parameters.

    The optimizer's own parameters are the host masters, so LR schedulers, param_groups and the moments' state
    work as for any torch optimizer; state_dict() carries the masters too, so a resumed run continues from the
    exact fp32 weights, not from their bf16 rounding. Gradient clipping runs on the model's gradients before step().
    """

    def __init__(self, model: torch.nn.Module | list[dict], lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, bucket_bytes: int = DEFAULT_BUCKET_BYTES, threads: int | None = None):
        groups = model if isinstance(model, list) else [{"params": [p for p in model.parameters() if p.requires_grad],
                                                         "weight_decay": weight_decay}]
        self.device_params: list[torch.Tensor] = []
        master_groups = []
        for group in groups:
            masters = []
            for p in group["params"]:
                self.device_params.append(p)
                masters.append(p.detach().to("cpu", torch.float32, copy=True))
            master_groups.append({**group, "params": masters})
        if not self.device_params:
            raise SuzakError("HostAdamW got no trainable parameters (check the freeze_* flags)")
        self.masters = [m for g in master_groups for m in g["params"]]
        self.on_cuda = self.device_params[0].is_cuda
        # fused is torch's vectorised CPU kernel; it needs float masters, which these always are.
        super().__init__(master_groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, fused=True)
        self.buckets = self._cut_buckets(bucket_bytes)
        self.last_step_s: float | None = None
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.threads = threads or cores
        biggest = max(sum(self.device_params[i].numel() for i in b) for b in self.buckets)
        dtypes = {p.dtype for p in self.device_params}
        if len(dtypes) != 1:
            raise SuzakError(f"HostAdamW needs one parameter dtype, got {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        self._grads = [_pinned(biggest, dtype, self.on_cuda) for _ in range(2)]
        self._weights = [_pinned(biggest, dtype, self.on_cuda) for _ in range(2)]
        self._grad32 = torch.empty(biggest, dtype=torch.float32)
        if self.on_cuda:
            self._down, self._up = torch.cuda.Stream(), torch.cuda.Stream()
            self._uploaded = [None, None]  # events: when the upload from weight buffer i has finished

    def _cut_buckets(self, bucket_bytes: int) -> list[list[int]]:
        buckets, current, size = [], [], 0
        for i, p in enumerate(self.device_params):
            nbytes = p.numel() * p.element_size()
            if current and size + nbytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += nbytes
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
                p = self.device_params[i]
                n = p.numel()
                if p.grad is None:
                    buffer[offset:offset + n].zero_()
                else:
                    buffer[offset:offset + n].copy_(p.grad.reshape(-1), non_blocking=True)
                offset += n
        if stream is None:
            return None
        event = torch.cuda.Event()
        event.record(stream)
        return event

    def _upload(self, k: int) -> None:
        """Round bucket k's masters to bf16 and copy them into the model's parameters."""
        slot = k % 2
        if self.on_cuda and self._uploaded[slot] is not None:
            self._uploaded[slot].synchronize()  # that buffer's previous upload is done: safe to overwrite
        buffer, offset, pending = self._weights[slot], 0, []
        for i in self.buckets[k]:
            n = self.masters[i].numel()
            buffer[offset:offset + n].copy_(self.masters[i].reshape(-1))
            pending.append((self.device_params[i], buffer[offset:offset + n]))
            offset += n
        if not self.on_cuda:
            with torch.no_grad():
                for p, src in pending:
                    p.copy_(src.view_as(p))
            return
        with torch.cuda.stream(self._up), torch.no_grad():
            for p, src in pending:
                p.copy_(src.view_as(p), non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._up)
        self._uploaded[slot] = event

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
        pending = self._download(0)
        for k, bucket in enumerate(self.buckets):
            if pending is not None:
                pending.synchronize()
            grads, offset = self._grads[k % 2], 0
            total = sum(self.masters[i].numel() for i in bucket)
            grad32 = self._grad32[:total]
            grad32.copy_(grads[:total])
            for i in bucket:
                n = self.masters[i].numel()
                self.masters[i].grad = grad32[offset:offset + n].view_as(self.masters[i])
                offset += n
            # The next bucket comes down while the host updates this one (its buffer was consumed above).
            pending = self._download(k + 1) if k + 1 < len(self.buckets) else None
            super().step()  # torch's AdamW steps exactly the masters that have a grad: this bucket's
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
        state["masters"] = list(self.masters)  # references, not copies: a 7B copy would be 33 GB of host RAM
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        masters = state_dict.pop("masters", None)
        super().load_state_dict(state_dict)
        if masters is None:
            return  # an optimizer state without masters: keep the ones taken from the loaded weights
        if len(masters) != len(self.masters):
            raise SuzakError(f"the optimizer state holds {len(masters)} master tensors, the model trains "
                             f"{len(self.masters)}: was a freeze_* flag changed since the checkpoint?")
        with torch.no_grad():
            for master, saved, p in zip(self.masters, masters, self.device_params):
                master.copy_(saved)
                p.copy_(saved.to(p.device, p.dtype))


class HostReference:
    """The reference policy of GRPO's KL term, as a bf16 copy of the starting trainable weights in host RAM.

    Frozen weights never change, so only the trainable ones are copied. swapped_in() puts them into the live
    model for a no-grad pass and then restores the policy from a same-device stash: the card briefly holds the
    trainable weights twice, but never a second model.
    """

    def __init__(self, model: torch.nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        pin = bool(self.params) and self.params[0].is_cuda
        self.weights = []
        for p in self.params:
            # Straight into pinned memory: pin_memory() of a host copy would hold the weights twice for a moment.
            self.weights.append(torch.empty(p.shape, dtype=p.dtype, pin_memory=pin).copy_(p.detach()))

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.weights)

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

"""Direct weight updates for the rollout server: learn once where `model.load_weights` puts each tensor, then
apply later pushes as plain copies into those parameter slices.

    plan = DirectLoadPlan.build(model, named_tensors)   # runs model.load_weights once (it loads these weights)
    plan.apply(named_tensors)                          # later pushes: one batched copy, no load_weights

Used by the `ipc` transport inside vLLM's worker (vllm_server/engine.py, `DirectWeightsWorker`, run by
`suzak serve` on a GPU). Why: vLLM's weight-transfer engine reloads through its layerwise-reload machinery, which
runs every loader twice (once on meta tensors), allocates a fresh copy of each layer and copies it back, for a
copy that HBM does in a small fraction of that time (bench/RESULTS.md, weight update).

How the plan is learned, with no model-specific names: each tensor is loaded through the model's own
`load_weights` under a TorchDispatchMode that sees every aten op. A `copy_` whose destination aliases a model
parameter or buffer and whose source aliases the tensor being loaded is recorded as (destination view, source
geometry), so the plan holds exactly what vLLM's name mappers and weight loaders did (q/k/v and gate/up shards,
tensor-parallel narrowing, vocabulary padding). A name whose loader did anything else to a model tensor (a
transform before the copy, an in-place op other than copy_/fill_) always goes through `load_weights`.
This module needs only torch; the tests drive it with small modules that load like vLLM's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

NamedTensors = Iterable[tuple[str, torch.Tensor]]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@dataclass
class _Copy:
    dst: torch.Tensor
    """A view of the parameter's storage (it aliases the live parameter)."""
    src_offset: int
    """Element offset of the source view from the pushed tensor's own offset."""
    src_size: tuple
    src_stride: tuple
    src_is_whole: bool
    """The source is the whole pushed tensor (the usual case without tensor parallelism)."""


@dataclass
class _Entry:
    shape: tuple
    dtype: torch.dtype
    stride: tuple
    copies: list[_Copy] = field(default_factory=list)
    direct: bool = True
    """False: the loader transformed the tensor or wrote otherwise; this name always goes through load_weights."""


class _WriteRecorder(TorchDispatchMode):
    """Records the writes into model tensors while load_weights runs for one pushed tensor."""

    def __init__(self, model_storages: set[int]):
        super().__init__()
        self.model_storages = model_storages
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.other_writes: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for i, arg in enumerate(func._schema.arguments):
            if arg.alias_info is None or not arg.alias_info.is_write:
                continue
            target = args[i] if i < len(args) else kwargs.get(arg.name)
            if not isinstance(target, torch.Tensor) or target.device.type == "meta":
                continue
            if _storage_key(target) not in self.model_storages:
                continue
            if func is torch.ops.aten.copy_.default and isinstance(args[1], torch.Tensor):
                self.copies.append((target, args[1]))
            elif func is not torch.ops.aten.fill_.Scalar:  # fill_: padding rows zeroed, idempotent
                self.other_writes.append(str(func))
        return out


class DirectLoadPlan:
    """For each pushed name: the parameter slices it lands in, or a note that it needs load_weights."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.entries: dict[str, _Entry] = {}
        self._pointers = self._parameter_pointers()

    def _parameter_pointers(self) -> list[tuple]:
        # (module, attribute, data_ptr): catches a replaced Parameter object and a replaced .data alike.
        return [(m, k, t.data_ptr()) for m in self.model.modules()
                for d in (m._parameters, m._buffers) for k, t in d.items() if t is not None]

    @classmethod
    @torch.no_grad()
    def build(cls, model: torch.nn.Module, named_tensors: NamedTensors,
              load_fn: Callable[[list], object] | None = None) -> DirectLoadPlan:
        """Load `named_tensors` through load_fn (default model.load_weights), one call per tensor, and learn the
        plan."""
        plan = cls(model)
        load_fn = load_fn or model.load_weights
        storages = {_storage_key(t) for t in model.state_dict(keep_vars=True).values()
                    if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for name, tensor in named_tensors:
            recorder = _WriteRecorder(storages)
            with recorder:
                load_fn([(name, tensor)])
            plan.entries[name] = _entry(tensor, recorder)
        return plan

    def still_valid(self) -> bool:
        """False when the model's parameters moved since the plan was built (a reload, a level-2 sleep)."""
        return all(getattr(m, k) is not None and getattr(m, k).data_ptr() == p for m, k, p in self._pointers)

    @property
    def direct_names(self) -> int:
        return sum(e.direct for e in self.entries.values())

    @torch.no_grad()
    def apply(self, named_tensors: NamedTensors, load_fn: Callable[[list], object] | None = None) -> dict:
        """Copy each tensor into its recorded slices (one batched copy); anything unplanned goes through load_fn."""
        start = time.perf_counter()
        destinations, sources, fallback = [], [], []
        for name, tensor in named_tensors:
            entry = self.entries.get(name)
            if entry is None or not entry.direct or entry.shape != tuple(tensor.shape) \
                    or entry.dtype != tensor.dtype or entry.stride != tuple(tensor.stride()):
                fallback.append((name, tensor))
                continue
            for c in entry.copies:
                destinations.append(c.dst)
                sources.append(tensor if c.src_is_whole else tensor.as_strided(
                    c.src_size, c.src_stride, tensor.storage_offset() + c.src_offset))
        planned = time.perf_counter()
        if destinations:
            torch._foreach_copy_(destinations, sources)
        copied = time.perf_counter()
        if fallback:
            (load_fn or self.model.load_weights)(fallback)
        return {"plan_s": planned - start, "copy_s": copied - planned, "fallback_s": time.perf_counter() - copied,
                "copies": len(destinations), "fallback": [n for n, _ in fallback]}


def _entry(tensor: torch.Tensor, recorder: _WriteRecorder) -> _Entry:
    entry = _Entry(tuple(tensor.shape), tensor.dtype, tuple(tensor.stride()), direct=not recorder.other_writes)
    key, offset = _storage_key(tensor), tensor.storage_offset()
    for dst, src in recorder.copies:
        if _storage_key(src) != key or src.dtype != tensor.dtype:
            entry.direct = False  # the loader made a new tensor (a transform, a cast) before copying it
            break
        whole = (src.storage_offset() == offset and tuple(src.shape) == tuple(tensor.shape)
                 and src.stride() == tensor.stride())
        entry.copies.append(_Copy(dst.detach(), src.storage_offset() - offset, tuple(src.shape), tuple(src.stride()),
                                  whole))
    return entry

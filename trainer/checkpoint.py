"""Full training checkpoints that a crash can never leave half-written, and exact resume from them.

    from trainer.checkpoint import CheckpointManager
    ckpt = CheckpointManager("runs/x/grpo", keep_last=2)
    ckpt.save(step, model, optimizer, scheduler, {"policy_version": 7, "sampler": {...}})
    if (path := ckpt.latest()) is not None:
        extra = ckpt.load(path, model, optimizer, scheduler)      # extra["step"] is the saved step

Run its tests:  .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q

Layout: out_dir/checkpoints/step-000050/ holding
    trainable.safetensors   the trainable parameters (LoRA: the adapters; full fine-tuning: every unfrozen weight;
                            frozen weights never change, so they come from the base model on resume)
    optimizer.pt, scheduler.pt
    rng-rank{r}.pt          python / numpy / torch (/ cuda) RNG states of each process
    state.json              step, extra (data position, policy version, ...), and the size of every file above
    sharded/                under DeepSpeed/FSDP (CheckpointManager(..., accelerator=acc)): accelerate's save_state
A checkpoint is written into checkpoints/.tmp-step-000050 and renamed into place only once every file is on disk,
so `latest()` never sees a partial one; state.json is written last and lists every file with its size, so even a
folder copied by hand is only taken when complete. Older checkpoints are deleted after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from suzak.errors import SuzakError
from trainer import distributed as dist_utils

FORMAT_VERSION = 1
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories; the rename is still atomic
    finally:
        os.close(fd)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model) -> dict[str, torch.Tensor]:
    """Name -> tensor of the trainable parameters (tied parameters appear once)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _unwrap(model):
    # DDP/DeepSpeed wrappers keep the real module under .module; names must not carry the wrapper's prefix.
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class CheckpointManager:
    """Atomic, pruned, resumable checkpoints under out_dir/checkpoints."""

    def __init__(self, out_dir, keep_last: int = 2, accelerator=None):
        if keep_last < 1:
            raise SuzakError(f"checkpoint.keep_last must be >= 1 (got {keep_last})")
        self.root = Path(out_dir) / "checkpoints"
        self.keep_last = keep_last
        self.accelerator = accelerator

    # ------------------------------------------------------------------ finding

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for child in self.root.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir() and self._is_complete(child):
                found.append((int(m.group(1)), child))
        return [p for _, p in sorted(found)]

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        done = self.complete()
        return done[-1] if done else None

    @staticmethod
    def _is_complete(path: Path) -> bool:
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except (OSError, ValueError):
            return False
        files = state.get("files", {})
        return state.get("format") == FORMAT_VERSION and all(
            (path / name).is_file() and (path / name).stat().st_size == size for name, size in files.items())

    # ------------------------------------------------------------------ saving

    def _sharded(self) -> bool:
        return self.accelerator is not None and dist_utils.is_sharded(self.accelerator)

    def save(self, step: int, model, optimizer, scheduler, extra: dict | None = None) -> Path:
        """Write the full training state of `step`; every process must call it (each writes its RNG state)."""
        extra = dict(extra or {})
        try:
            json.dumps(extra)
        except TypeError as e:
            raise TypeError(f"checkpoint extra must be JSON-serialisable: {e}") from None
        rank, main = dist_utils.rank(), dist_utils.is_main()
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}"
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        dist_utils.barrier()

        if self._sharded():
            # Shards of weights and optimizer state live on every rank: accelerate writes them collectively.
            self.accelerator.save_state(str(tmp / "sharded"))
        elif main:
            from safetensors.torch import save_file

            weights = {n: t.to("cpu").contiguous() for n, t in trainable_state(_unwrap(model)).items()}
            save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "step": str(step)})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        if main:
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng_state(), tmp / f"rng-rank{rank}.pt")
        dist_utils.barrier()

        if main:
            self._finish(tmp, final, step, extra)
        dist_utils.barrier()
        return final

    def _finish(self, tmp: Path, final: Path, step: int, extra: dict) -> None:
        files = {}
        for path in sorted(tmp.rglob("*")):
            if path.is_file():
                _fsync_file(path)
                files[str(path.relative_to(tmp))] = path.stat().st_size
        state = {"format": FORMAT_VERSION, "step": step, "extra": extra, "files": files,
                 "world_size": dist_utils.world_size(), "saved_at": time.time()}
        state_path = tmp / STATE_FILE
        state_path.write_text(json.dumps(state, indent=1))
        _fsync_file(state_path)
        _fsync_dir(tmp)
        if final.exists():
            # Re-saving a step (after a resume): move the old copy aside so the rename stays atomic.
            aside = self.root / f".old-{final.name}-{os.getpid()}"
            os.rename(final, aside)
            os.rename(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)
        self.prune()

    def prune(self) -> None:
        """Keep the newest keep_last complete checkpoints; drop older ones and leftovers of crashed saves."""
        done = self.complete()
        for old in done[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for child in self.root.iterdir():
            if child.name.startswith((".tmp-step-", ".old-step-")):
                shutil.rmtree(child, ignore_errors=True)

    # ------------------------------------------------------------------ loading

    def load(self, path, model, optimizer=None, scheduler=None) -> dict:
        """Restore weights, optimizer, scheduler and this process's RNG state; returns extra (with 'step')."""
        path = Path(path)
        if not self._is_complete(path):
            raise SuzakError(f"checkpoint {path} is incomplete or not a suzak checkpoint (no valid {STATE_FILE}); "
                             "delete it to resume from an older one")
        state = json.loads((path / STATE_FILE).read_text())
        if (path / "sharded").is_dir():
            if not self._sharded():
                raise SuzakError(f"checkpoint {path} was written under DeepSpeed/FSDP; resume it with the same "
                                 "SUZAK_STRATEGY (and CheckpointManager(..., accelerator=...))")
            self.accelerator.load_state(str(path / "sharded"))
        else:
            self._load_weights(path, _unwrap(model))
            if optimizer is not None:
                optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
        if scheduler is not None:
            scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
        rng_file = path / f"rng-rank{dist_utils.rank()}.pt"
        if not rng_file.is_file():
            # Resumed on more processes than were saved: the extra ranks take rank 0's stream.
            rng_file = path / "rng-rank0.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        extra = dict(state.get("extra", {}))
        extra.setdefault("step", state["step"])
        return extra

    @staticmethod
    def _load_weights(path: Path, model) -> None:
        from safetensors.torch import load_file

        saved = load_file(str(path / WEIGHTS_FILE))
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        missing, unexpected = sorted(trainable - set(saved)), sorted(set(saved) - set(params))
        if missing or unexpected:
            raise SuzakError(
                f"checkpoint {path} does not match the model: {len(missing)} missing (e.g. {missing[:2]}), "
                f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}). Was model.lora or a freeze_* flag "
                "changed since it was saved? Restore the settings, or start a new out_dir")
        with torch.no_grad():
            for name, tensor in saved.items():
                param = params[name]
                if param.shape != tensor.shape:
                    raise SuzakError(f"checkpoint {path}: {name} has shape {tuple(tensor.shape)}, the model "
                                     f"{tuple(param.shape)}; the model architecture changed since the save")
                param.copy_(tensor.to(param.device, param.dtype))

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
so `latest()` never sees a partial one; state.json is written last and lists every file with its size and
sha256, so even a folder copied by hand is only taken when complete. Older checkpoints are deleted after the new
one is in place. `latest()` verifies sizes and checksums: a bad newest checkpoint is reported with its path and
the newest good one is used instead; when checkpoints exist but none is good it stops with an error rather than
start over (checkpoint.resume=false / --no-resume is the explicit way to do that).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from suzak.errors import SuzakError
from suzak.log import get_logger
from trainer import distributed as dist_utils

FORMAT_VERSION = 1
STATE_FILE = "state.json"
WEIGHTS_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")
log = get_logger("checkpoint")


def sha256_file(path: Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)  # hashlib releases the GIL on large blocks: files hash in parallel threads
    return h.hexdigest()


def _hash_all(paths: list[Path]) -> list[str]:
    if len(paths) < 2:
        return [sha256_file(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths))) as pool:
        return list(pool.map(sha256_file, paths))


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

    def _step_dirs(self) -> list[Path]:
        """Every step-N folder, oldest first (good or not)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), child) for child in self.root.iterdir()
                 if (m := _STEP_DIR.match(child.name)) and child.is_dir()]
        return [p for _, p in sorted(found)]

    def complete(self) -> list[Path]:
        """Complete checkpoints (every file present at its recorded size), oldest first; checksums unread."""
        return [p for p in self._step_dirs() if self._is_complete(p)]

    def latest(self) -> Path | None:
        """The newest checkpoint that passes `verify`, or None when there is no checkpoint at all.

        Bad newer ones are reported (a warning naming the path and the problem) and skipped; when there are
        checkpoints but none is good, a SuzakError says so instead of letting the run start over."""
        bad = []
        for path in reversed(self._step_dirs()):
            problem = self.verify(path)
            if problem is None:
                if bad:
                    self._warn_fallback(bad, path)
                return path
            bad.append((path, problem))
        if bad:
            listed = "; ".join(f"{p}: {why}" for p, why in bad)
            raise SuzakError(f"no usable checkpoint in {self.root} ({listed}). Restore a good copy, or start over "
                             "explicitly with --no-resume (checkpoint.resume=false), which keeps the old metrics "
                             "aside")
        return None

    @staticmethod
    def _warn_fallback(bad: list[tuple[Path, str]], used: Path | str) -> None:
        for path, why in bad:
            message = f"checkpoint {path} is unusable ({why}); resuming from {used} instead"
            log.warning(message)

    @staticmethod
    def verify(path: Path, checksums: bool = True) -> str | None:
        """None when `path` is a whole, unaltered checkpoint; else what is wrong with it (sizes and sha256 of every
        file are compared with those recorded in state.json at write time)."""
        try:
            state = json.loads((path / STATE_FILE).read_text())
        except FileNotFoundError:
            return f"no {STATE_FILE}"
        except (OSError, ValueError) as e:
            return f"unreadable {STATE_FILE} ({type(e).__name__})"
        if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
            return f"{STATE_FILE} is not a suzak checkpoint record (format {FORMAT_VERSION})"
        files, sums = state.get("files", {}), state.get("sha256", {})
        if not isinstance(files, dict) or not isinstance(sums, dict):
            return f"{STATE_FILE} is damaged"
        for name, size in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != size:
                return f"{name} is {f.stat().st_size} bytes, {size} when written (truncated or altered)"
        if checksums:
            names = [n for n in files if n in sums]
            for name, digest in zip(names, _hash_all([path / n for n in names])):
                if digest != sums[name]:
                    return f"{name} does not match its sha256 recorded at write time (corrupted)"
        return None

    @classmethod
    def _is_complete(cls, path: Path) -> bool:
        return cls.verify(path, checksums=False) is None

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
        paths = [path for path in sorted(tmp.rglob("*")) if path.is_file()]
        for path in paths:
            _fsync_file(path)
            files[str(path.relative_to(tmp))] = path.stat().st_size
        sums = dict(zip(files, _hash_all(paths)))
        state = {"format": FORMAT_VERSION, "step": step, "extra": extra, "files": files, "sha256": sums,
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
        """Restore weights, optimizer, scheduler and this process's RNG state; returns extra (with 'step').

        Every file is read before anything is restored. A checkpoint whose files are not as recorded is a SuzakError;
        one whose files cannot be read back (a checkpoint written before checksums were recorded) is reported with
        its path and the next older good one is loaded instead, with a warning."""
        path = Path(path)
        problem = self.verify(path, checksums=False)
        if problem is not None:
            raise SuzakError(f"checkpoint {path} is incomplete or damaged ({problem}); latest() picks the newest good "
                             "one, or move this one away")
        while True:
            if problem is not None:
                older = [p for p in self._step_dirs() if _step_of(p) < _step_of(path)]
                fallback = self._newest_good(older)
                if fallback is None:
                    raise SuzakError(f"checkpoint {path} is unusable ({problem}) and no older good one is left in "
                                     f"{self.root}. Restore a good copy, or start over explicitly with --no-resume "
                                     "(checkpoint.resume=false)")
                self._warn_fallback([(path, problem)], fallback)
                path = fallback
            try:
                return self._load_verified(path, model, optimizer, scheduler)
            except _Unreadable as e:
                problem = str(e)

    def _newest_good(self, candidates: list[Path]) -> Path | None:
        for path in reversed(candidates):
            problem = self.verify(path)
            if problem is None:
                return path
            self._warn_fallback([(path, problem)], "an older one")
        return None

    def _load_verified(self, path: Path, model, optimizer, scheduler) -> dict:
        state = json.loads((path / STATE_FILE).read_text())
        rng_file = path / f"rng-rank{dist_utils.rank()}.pt"
        if not rng_file.is_file():
            # Resumed on more processes than were saved: the extra ranks take rank 0's stream.
            rng_file = path / "rng-rank0.pt"
        if (path / "sharded").is_dir():
            if not self._sharded():
                raise SuzakError(f"checkpoint {path} was written under DeepSpeed/FSDP; resume it with the same "
                                 "SUZAK_STRATEGY (and CheckpointManager(..., accelerator=...))")
            sched_state, rng = _read(path / "scheduler.pt"), _read(rng_file)
            try:
                self.accelerator.load_state(str(path / "sharded"))
            except Exception as e:  # noqa: BLE001 - a shard that cannot be read
                raise _Unreadable(f"sharded/ cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
        else:
            weights = _read(path / WEIGHTS_FILE)
            optim_state = _read(path / "optimizer.pt") if optimizer is not None else None
            sched_state, rng = _read(path / "scheduler.pt"), _read(rng_file)
            self._apply_weights(path, _unwrap(model), weights)
            if optimizer is not None:
                optimizer.load_state_dict(optim_state)
        if scheduler is not None:
            scheduler.load_state_dict(sched_state)
        set_rng_state(rng)
        extra = dict(state.get("extra", {}))
        extra.setdefault("step", state["step"])
        return extra

    @classmethod
    def _load_weights(cls, path: Path, model) -> None:
        cls._apply_weights(path, model, _read(path / WEIGHTS_FILE))

    @staticmethod
    def _apply_weights(path: Path, model, saved: dict) -> None:
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


class _Unreadable(Exception):
    """A checkpoint file that cannot be read back (corrupt, truncated, wrong format)."""


def _step_of(path: Path) -> int:
    m = _STEP_DIR.match(path.name)
    return int(m.group(1)) if m else -1


def _read(file: Path):
    """A checkpoint file's content (safetensors or torch.save), or _Unreadable naming the file and the error."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(file))
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - safetensors, pickle, zip and EOF errors alike mean a bad file
        raise _Unreadable(f"{file.name} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None

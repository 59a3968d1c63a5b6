"""`suzak train` end to end, shortened: every stage of the embedded default runs and leaves its outputs.

    .venv/bin/python -m pytest tests/integration/test_pipeline.py -q -m vllm

Same command as the README's main job, with fewer samples and steps. A second run with the same --out must
skip the finished stages (resume) and produce the same summary accuracies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
]

SHORT = ["data.synth.n=64", "sft.max_steps=6", "grpo.steps=2", "grpo.prompts_per_step=4", "grpo.num_generations=4",
         "eval.synth_n=12", "logging.progress=false", "checkpoint.every_steps=1"]


def _train(out, home, *extra):
    env = {**os.environ, "SUZAK_HOME": str(home)}
    return subprocess.run([sys.executable, "-m", "suzak", "train", "--out", str(out), *SHORT, *extra], env=env,
                          capture_output=True, text=True, timeout=1500)


def test_default_pipeline_runs_every_stage_and_resumes(tmp_path):
    out, home = tmp_path / "run", tmp_path / "home"
    first = _train(out, home, "server.start_during_sft=true")  # GPU hosts' default (auto); CPU runs it on request
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert (home / "tiny-qwen25vl" / "config.json").exists()  # stage 1: the tiny model was built
    assert (out / "data_preview.png").exists()  # stage 2: synthetic data
    assert (out / "sft" / "final" / "config.json").exists()  # stage 3: SFT export
    assert (out / "sft_metrics.jsonl").read_text().count("\n") == 6
    assert (out / "server.log").exists()  # stage 4: a local rollout server ran
    assert "into the server started during SFT" in first.stdout
    grpo_lines = [json.loads(x) for x in (out / "grpo_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in grpo_lines] == [1, 2] and grpo_lines[-1]["policy_version"] == 2  # stage 5
    assert (out / "grpo" / "final" / "config.json").exists()
    for label in ("sft", "grpo"):  # stage 6: both checkpoints on held-out A and B
        for split in ("A", "B"):
            assert (out / "eval" / f"{label}_{split}.json").exists()
    summary = json.loads((out / "summary.json").read_text())  # stage 7
    assert set(summary) >= {"sft", "grpo", "seed", "seconds"}
    for label in ("sft", "grpo"):
        assert set(summary[label]) == {"A", "B"} and all(0.0 <= v <= 1.0 for v in summary[label].values())
    assert "CoGenT-B" in first.stdout and (out / "report.html").read_text().count("<img") >= 2
    assert (out / "config.yaml").exists()

    # The rerun adds a file benchmark to eval.benchmarks: only it is evaluated, on both checkpoints.
    superclevr = tmp_path / "superclevr"
    made = subprocess.run([sys.executable, "-m", "suzak", "data", "synth", "clevr", "--n", "6", "--format",
                           "superclevr", "--out", str(superclevr)], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    again = _train(out, home, "eval.benchmarks=[clevr-synth,superclevr]", f"eval.data={superclevr}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "sft: done earlier" in again.stdout
    resumed = json.loads((out / "summary.json").read_text())
    for label in ("sft", "grpo"):
        assert {k: resumed[label][k] for k in ("A", "B")} == summary[label]
        assert json.loads((out / "eval" / f"{label}_superclevr.json").read_text())["summary"]["n"] == 6
    assert "superclevr" in again.stdout

    # The server started during SFT held the SFT weights when it scored them: a server started on the SFT folder
    # itself (the resumed run's path) gives the same greedy answers, where the base weights would not.
    first_records = {split: json.loads((out / "eval" / f"sft_{split}.json").read_text()) for split in ("A", "B")}
    for split in ("A", "B"):
        (out / "eval" / f"sft_{split}.json").unlink()
    third = _train(out, home)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "into the server started during SFT" not in third.stdout
    for split in ("A", "B"):
        rescored = json.loads((out / "eval" / f"sft_{split}.json").read_text())
        assert rescored["records"] == first_records[split]["records"]

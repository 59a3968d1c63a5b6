"""`suzak train` end to end, shortened: every stage of the embedded default runs and leaves its outputs.

    .venv/bin/python -m pytest tests/integration/test_pipeline.py -q -m vllm

Same command as the README's main job, with fewer samples and steps. A second run with the same --out must
skip the finished stages (resume) and produce the same summary accuracies. The tiny Qwen3-VL runs it too
(model.family=qwen3vl), and its GRPO reward must rise.
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


# The tiny Qwen3-VL through `suzak train` (model.family=qwen3vl on the default recipe), in two invocations on one
# output folder, as test_grpo.py does in-process: SFT on scenes of 1 to 4 objects teaches the format and some spread
# of counts; GRPO then trains on scenes that always hold 3 objects, which it learns within a few steps, so its mean
# reward must rise. The server runs the Qwen3-VL checkpoint (DeepStack, 32 px tokens) and takes every push.
QWEN3VL = ["model.family=qwen3vl", "model.min_pixels=4096", "model.max_pixels=50176", "data.synth.n=128",
           "data.synth.image_width=112", "data.synth.image_height=112", "logging.progress=false",
           "checkpoint.every_steps=100"]
QWEN3VL_SFT = ["data.synth.min_objects=1", "data.synth.max_objects=4", "sft.max_steps=40", "sft.batch_size=8",
               "sft.optim.warmup_ratio=0"]
QWEN3VL_GRPO = ["data.synth.min_objects=3", "data.synth.max_objects=3", "data.synth.seed=1", "grpo.steps=12",
                "grpo.prompts_per_step=16", "grpo.num_generations=4", "grpo.max_completion_tokens=24",
                "grpo.temperature=0.8", "grpo.optim.lr=2e-4", "grpo.beta=0",
                "grpo.reward_weights={accuracy: 1.0, format: 0.5}", "eval.synth_n=8"]


def test_qwen3vl_pipeline_trains_and_reward_rises(tmp_path):
    out, home = tmp_path / "run", tmp_path / "home"
    env = {**os.environ, "SUZAK_HOME": str(home)}

    def train(*extra):
        done = subprocess.run([sys.executable, "-m", "suzak", "train", "--out", str(out), *QWEN3VL, *extra], env=env,
                              capture_output=True, text=True, timeout=1500)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done

    train("--stages", "model,data,sft", *QWEN3VL_SFT)
    built = json.loads((home / "tiny-qwen3vl" / "config.json").read_text())
    assert built["model_type"] == "qwen3_vl" and built["vision_config"]["patch_size"] == 16
    exported = json.loads((out / "sft" / "final" / "config.json").read_text())
    assert exported["architectures"] == ["Qwen3VLForConditionalGeneration"]

    train("--stages", "grpo,eval", *QWEN3VL_GRPO)
    history = [json.loads(x) for x in (out / "grpo_metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in history] == list(range(1, 13)) and history[-1]["policy_version"] == 12
    rewards = [m["reward/total"] for m in history]
    print("qwen3vl rewards per step:", [round(r, 3) for r in rewards])
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first, f"mean reward did not rise: first 3 steps {first:.3f}, last 3 steps {last:.3f}"
    # Server and learner agree after every push (fp32 on both sides): the server runs the pushed Qwen3-VL weights.
    gaps = [m["logprob_gap/mean"] for m in history]
    print(f"qwen3vl server vs learner log-prob gap: mean {sum(gaps) / len(gaps):.2e}")
    assert max(gaps) <= 1e-5
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["grpo"]) == {"A", "B"}

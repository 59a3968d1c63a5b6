"""`suzak eval` end to end on CPU: the tiny model behind a real vLLM rollout server, benchmark files in R1-V's formats.

    .venv/bin/python -m pytest tests/integration/test_eval_e2e.py -q -m vllm

The files come from `suzak data synth ... --format superclevr|geoqa`, so they have the exact layout of the
real downloads. superclevr and geoqa each start their own server through `--model` (about 30 s each on CPU);
the synthetic benchmarks share one server started here and reached through `--server`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
]

REPO = Path(__file__).resolve().parents[2]
FIELDS = ["id", "image_path", "question", "ground_truth", "output", "extracted", "correct"]
# Overrides must come right after the benchmark name (argparse stops collecting positionals at the first flag).
# eager: no compile, a faster start
SMALL = ["eval.max_new_tokens=32", "logging.progress=false", "server.enforce_eager=true"]


def _suzak(*argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "suzak", *argv], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"suzak {' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    _suzak("model", "tiny", "--out", str(out))
    return out


@pytest.fixture(scope="module")
def bench_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bench")
    _suzak("data", "synth", "clevr", "--n", "6", "--format", "superclevr", "--out", str(root / "superclevr"))
    _suzak("data", "synth", "geo", "--n", "6", "--format", "geoqa", "--out", str(root / "geoqa"))
    return {"superclevr": root / "superclevr", "geoqa": root / "geoqa"}


@pytest.fixture(scope="module")
def shared_server(tiny_model, tmp_path_factory):
    """One rollout server for the synthetic benchmarks (on a free port), stopped at the end of the module."""
    from suzak.config import load_config
    from vllm_server.client import start_local_server, stop_local_server

    cfg = load_config(None, [f"model.name_or_path={tiny_model}", "server.enforce_eager=true"])
    process, url = start_local_server(cfg, tmp_path_factory.mktemp("server") / "server.log")
    yield url
    stop_local_server(process)


def _check_outputs(out: Path, benchmark: str, n: int, gt_type: type, model: str | None) -> dict:
    preds = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == n
    for p in preds:
        assert list(p) == FIELDS
        assert type(p["ground_truth"]) is gt_type and isinstance(p["output"], str)
        assert type(p["correct"]) is bool and Path(p["image_path"]).is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == benchmark and summary["n"] == n
    assert summary["correct"] == sum(p["correct"] for p in preds)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / n)
    lo, hi = summary["ci95"]
    assert 0.0 <= lo <= summary["accuracy"] <= hi <= 1.0
    assert set(summary["failures"]) == {"no_tag", "unparsable", "wrong"}
    assert sum(summary["failures"].values()) == n - summary["correct"]
    assert (summary["scoring"], summary["prompt"], summary["max_new_tokens"]) == ("r1v", "eval", 32)
    assert summary["seconds"] > 0
    if model is not None:
        assert summary["model"] == model
    assert (out / "report.html").stat().st_size > 0 and (out / "config.yaml").is_file()
    return summary


@pytest.mark.parametrize("benchmark,gt_type", [("superclevr", int), ("geoqa", str)])
def test_eval_with_local_server(benchmark, gt_type, tiny_model, bench_files, tmp_path):
    out = tmp_path / benchmark
    proc = _suzak("eval", benchmark, *SMALL, "--model", str(tiny_model),
                  "--data", str(bench_files[benchmark]), "--out", str(out), "--limit", "4")
    assert str(out) in proc.stdout and "accuracy" in proc.stdout  # the console table
    _check_outputs(out, benchmark, 4, gt_type, model=str(tiny_model))

    # Rescoring the saved outputs needs no model and reproduces the numbers.
    again = tmp_path / "again"
    _suzak("eval", benchmark, "--rescore", str(out / "predictions.jsonl"), "--out", str(again))
    first, second = (json.loads((d / "summary.json").read_text()) for d in (out, again))
    assert (second["correct"], second["failures"]) == (first["correct"], first["failures"])


@pytest.mark.parametrize("benchmark,extra,gt_type", [("clevr-synth", ["--data", "B"], int), ("geo-synth", [], str)])
def test_synthetic_benchmarks_through_a_running_server(benchmark, extra, gt_type, shared_server, tmp_path):
    out = tmp_path / benchmark
    _suzak("eval", benchmark, *SMALL, "eval.synth_n=3", "--server", shared_server, "--out", str(out), *extra)
    summary = _check_outputs(out, benchmark, 3, gt_type, model=None)
    if benchmark == "clevr-synth":
        assert summary["data"] == "synth seed=12345 n=3 split=B"

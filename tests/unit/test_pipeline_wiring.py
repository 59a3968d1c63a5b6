"""What `suzak train` does with eval.benchmarks and checkpoint.push_to_hub, without training anything.

    .venv/bin/python -m pytest tests/unit/test_pipeline_wiring.py -q

The end-to-end run with a file benchmark is in tests/integration/test_pipeline.py.
"""

from __future__ import annotations

import json

import pytest

from suzak.config import load_config
from suzak.errors import SuzakError
from trainer import pipeline


def _cfg(tmp_path, *overrides):
    return load_config(None, [f"out_dir={tmp_path / 'run'}", *overrides])


def test_eval_sets_follow_eval_benchmarks(tmp_path):
    sc = tmp_path / "superclevr"
    sc.mkdir()
    from PIL import Image

    Image.new("RGB", (64, 48), "gray").save(sc / "a.png")
    rows = [{"image_path": "a.png", "question": "How many cubes?", "ground_truth": 3}] * 3
    (sc / "superclevr_test200.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = _cfg(tmp_path, "eval.benchmarks=[clevr-synth,superclevr,clevr-synth-b]", f"eval.data={sc}",
               "eval.synth_n=5")
    sets = pipeline.eval_sets(cfg)
    assert list(sets) == ["A", "B", "superclevr"]  # clevr-synth-b is the same set as clevr-synth's B
    assert [len(s.examples) for s in sets.values()] == [5, 5, 3]
    assert sets["superclevr"].benchmark == "superclevr" and sets["A"].benchmark == "clevr-synth"
    assert {ex.meta["split"] for ex in sets["B"].examples} == {"B"}
    assert pipeline.eval_sets(_cfg(tmp_path, "eval.benchmarks=[]")) == {}


def test_a_missing_benchmark_file_fails_before_any_model_or_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default data/superclevr folder does not exist here
    cfg = _cfg(tmp_path, "eval.benchmarks=[superclevr]")
    monkeypatch.setattr(pipeline, "stage_model", lambda cfg: pytest.fail("the model stage ran"))
    with pytest.raises(SuzakError, match="superclevr benchmark data not found"):
        pipeline.run_pipeline(cfg)


def test_push_to_hub_without_token_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(pipeline, "stage_model", lambda cfg: pytest.fail("the model stage ran"))
    cfg = _cfg(tmp_path, "checkpoint.push_to_hub=true", "checkpoint.hub_model_id=me/model")
    with pytest.raises(SuzakError, match="HF_TOKEN"):
        pipeline.run_pipeline(cfg)
    monkeypatch.setenv("HF_TOKEN", "hf_x")
    monkeypatch.delenv("HUB_MODEL_ID", raising=False)
    with pytest.raises(SuzakError, match="hub_model_id"):
        pipeline.run_pipeline(_cfg(tmp_path, "checkpoint.push_to_hub=true"))


class _FakeApi:
    calls: list = []
    fail = False

    def __init__(self, token):
        self.token = token

    def create_repo(self, repo_id, exist_ok, private):
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, commit_message):
        if _FakeApi.fail:
            raise RuntimeError(f"503 with {self.token}")
        _FakeApi.calls.append((folder_path, repo_id))


def test_push_final_uploads_the_grpo_export_once_and_a_failure_keeps_the_files(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", _FakeApi)
    monkeypatch.setenv("HF_TOKEN", "hf_secret_123")
    _FakeApi.calls, _FakeApi.fail = [], False
    cfg = _cfg(tmp_path, "checkpoint.push_to_hub=true", "checkpoint.hub_model_id=me/model")
    out = tmp_path / "run"
    with pytest.raises(SuzakError, match="no exported model"):
        pipeline.push_final(cfg, out)
    for stage in ("sft", "grpo"):
        (out / stage / "final").mkdir(parents=True)
        (out / stage / "final" / "config.json").write_text("{}")

    _FakeApi.fail = True
    with pytest.raises(SuzakError) as err:
        pipeline.push_final(cfg, out)
    assert str(out / "grpo" / "final") in str(err.value) and "hf_secret" not in str(err.value)
    assert not (out / "pushed.json").exists() and (out / "grpo" / "final" / "config.json").exists()

    _FakeApi.fail = False
    pipeline.push_final(cfg, out)
    pipeline.push_final(cfg, out)  # a rerun of a finished run does not upload again
    assert _FakeApi.calls == [(str(out / "grpo" / "final"), "me/model")]
    assert json.loads((out / "pushed.json").read_text())["repo"] == "me/model"

    sft_only = _cfg(tmp_path, "checkpoint.push_to_hub=true", "checkpoint.hub_model_id=me/sft", "grpo.enabled=false")
    pipeline.push_final(sft_only, out)
    assert _FakeApi.calls[-1] == (str(out / "sft" / "final"), "me/sft")

"""The evaluator with a fake rollout client: output files and types, summary math, rescoring, data errors.

    .venv/bin/python -m pytest tests/unit/test_evaluator.py -q
"""

from __future__ import annotations

import argparse
import base64
import io
import json
from pathlib import Path

import pytest
import yaml
from PIL import Image

from evaluator import run as eval_run
from evaluator.benchmarks import get_benchmark, load_benchmark
from suzak import wire
from suzak.config import load_config
from suzak.errors import SuzakError
from suzak.tasks import GEOQA_EVAL_TEMPLATE, SUPERCLEVR_EVAL_TEMPLATE, TRAIN_TEMPLATE, get_task
from suzak.tasks.scoring import wilson_interval

MAX_PIXELS = 28 * 28 * 16  # a budget far below the test images, so resizing must happen


class FakeClient:
    """Stands in for vllm_server.client.RolloutClient: answers each prompt from a question -> output table."""

    def __init__(self, answers: dict[str, str], model: str = "fake-model"):
        self.answers = answers
        self.model = model
        self.requests: list[wire.GenerateRequest] = []

    def info(self) -> wire.ModelInfo:
        return wire.ModelInfo(model=self.model, engine="fake", engine_version="0", policy_version=0,
                              max_model_len=4096, min_pixels=3136, max_pixels=MAX_PIXELS, dtype="float32",
                              transports=["files"])

    def generate(self, request: wire.GenerateRequest) -> wire.GenerateResponse:
        self.requests.append(request)
        results = []
        for prompt in request.prompts:
            text = next(p.text for p in prompt.messages[-1].content if p.type == "text")
            question = next(q for q in self.answers if text.startswith(q + " "))
            results.append(wire.PromptResult(prompt_token_ids=[1, 2], completions=[wire.Completion(
                text=self.answers[question], token_ids=[3], logprobs=None, finish_reason="stop", policy_version=0)]))
        return wire.GenerateResponse(results=results, policy_version=0, seconds=0.01)


def _write_benchmark(folder: Path, filename: str, rows: list[tuple[str, object]], image_dir: str = "images") -> Path:
    """A benchmark jsonl in R1-V's exact format, with one 480x320 PNG per row under folder/image_dir."""
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (question, truth) in enumerate(rows):
        Image.new("RGB", (480, 320), (40 * i % 255, 100, 150)).save(folder / image_dir / f"img_{i}.png")
        row = {"image_path": f"./{image_dir}/img_{i}.png", "question": question, "ground_truth": truth}
        lines.append(json.dumps(row))
    path = folder / filename
    path.write_text("\n".join(lines) + "\n")
    return path


# Four SuperCLEVR problems whose canned outputs hit each outcome once: right, wrong value, no tag, unparsable.
SUPERCLEVR_ROWS = [("How many items A?", 4), ("How many items B?", 5), ("How many items C?", 6),
                   ("How many items D?", 7)]
SUPERCLEVR_OUTPUTS = {
    "How many items A?": "<think>four</think> <answer> 4 </answer>",
    "How many items B?": "<think>x</think><answer>3</answer>",
    "How many items C?": "I think there are 6 items.",
    "How many items D?": "<think>x</think><answer>many</answer>",
}
GEOQA_ROWS = [("Angle ABC is?", "140°"), ("Length of AB?", "\\frac{12}{5}"), ("Area?", "5")]
GEOQA_OUTPUTS = {
    "Angle ABC is?": "<think>180-40</think> <answer> 140° </answer>",
    "Length of AB?": "<think>...</think> <answer> \\frac{12}{5} </answer>",
    "Area?": "<think>...</think> <answer> 6 </answer>",
}


@pytest.fixture
def superclevr_dir(tmp_path):
    folder = tmp_path / "superclevr"
    _write_benchmark(folder, "superclevr_test200_counting_problems.jsonl", SUPERCLEVR_ROWS)
    return folder


@pytest.fixture
def geoqa_dir(tmp_path):
    folder = tmp_path / "geoqa"
    _write_benchmark(folder, "geoqa_test_prompts.jsonl", GEOQA_ROWS, image_dir="Geo170K/images/test")
    return folder


def _args(benchmark: str, **kw) -> argparse.Namespace:
    base = dict(benchmark=benchmark, model=None, server=None, data=None, out=None, rescore=None, scoring=None,
                prompt=None, limit=None)
    base.update(kw)
    return argparse.Namespace(**base)


def _run_main(monkeypatch, client, benchmark: str, **kw) -> int:
    """evaluator.run.main with --server pointing at the fake client (no HTTP, no vLLM)."""
    monkeypatch.setattr(eval_run, "connect", lambda url, cfg: client)
    cfg = load_config(None, ["logging.progress=false"])
    return eval_run.main(_args(benchmark, server=kw.pop("server", "http://fake:1"), **kw), cfg)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- outputs


def test_superclevr_outputs_have_exact_fields_types_and_summary(monkeypatch, tmp_path, superclevr_dir):
    client = FakeClient(SUPERCLEVR_OUTPUTS)
    out = tmp_path / "out"
    assert _run_main(monkeypatch, client, "superclevr", data=str(superclevr_dir), out=str(out)) == 0

    preds = _read_jsonl(out / "predictions.jsonl")
    assert [p["question"] for p in preds] == [q for q, _ in SUPERCLEVR_ROWS]
    for p in preds:
        assert list(p) == ["id", "image_path", "question", "ground_truth", "output", "extracted", "correct"]
        assert type(p["ground_truth"]) is int and type(p["correct"]) is bool
        assert Path(p["image_path"]).is_file()
    assert [p["correct"] for p in preds] == [True, False, False, False]
    assert [p["extracted"] for p in preds] == ["4", "3", None, None]
    assert preds[1]["output"] == SUPERCLEVR_OUTPUTS["How many items B?"]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["benchmark"] == "superclevr" and summary["n"] == 4 and summary["correct"] == 1
    assert summary["accuracy"] == pytest.approx(0.25)
    assert summary["ci95"] == pytest.approx(list(wilson_interval(1, 4)))
    assert summary["failures"] == {"no_tag": 1, "unparsable": 1, "wrong": 1}
    assert (summary["scoring"], summary["prompt"], summary["max_new_tokens"]) == ("r1v", "eval", 256)
    assert summary["model"] == "fake-model" and summary["seconds"] >= 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["eval"]["max_new_tokens"] == 256 and saved["server"]["url"] == "http://fake:1"


def test_requests_are_greedy_batched_resized_with_the_eval_prompt(monkeypatch, tmp_path, superclevr_dir):
    client = FakeClient(SUPERCLEVR_OUTPUTS)
    examples = load_benchmark("superclevr", str(superclevr_dir), load_config())
    records, _ = eval_run.evaluate(client, get_task("superclevr"), examples, max_new_tokens=17, batch_size=3)
    assert [len(r.prompts) for r in client.requests] == [3, 1]
    assert [r["question"] for r in records] == [q for q, _ in SUPERCLEVR_ROWS]  # order survives batching
    sampling = client.requests[0].sampling
    assert (sampling.temperature, sampling.n, sampling.max_tokens) == (0.0, 1, 17)
    content = client.requests[0].prompts[0].messages[0].content
    assert [part.type for part in content] == ["image", "text"]
    assert content[1].text == SUPERCLEVR_EVAL_TEMPLATE.format(Question="How many items A?")
    assert content[0].image.startswith("data:image/")
    image = Image.open(io.BytesIO(base64.b64decode(content[0].image.split(",", 1)[1])))
    assert image.width * image.height <= MAX_PIXELS  # the server refuses larger images


def test_train_prompt_is_used_when_asked(superclevr_dir):
    client = FakeClient(SUPERCLEVR_OUTPUTS)
    examples = load_benchmark("superclevr", str(superclevr_dir), load_config())
    eval_run.evaluate(client, get_task("superclevr"), examples[:1], prompt="train")
    text = client.requests[0].prompts[0].messages[0].content[1].text
    assert text == TRAIN_TEMPLATE.format(Question="How many items A?")


def test_geoqa_ground_truth_stays_string_and_math_is_verified(monkeypatch, tmp_path, geoqa_dir):
    client = FakeClient(GEOQA_OUTPUTS)
    out = tmp_path / "out"
    assert _run_main(monkeypatch, client, "geoqa", data=str(geoqa_dir), out=str(out)) == 0
    preds = _read_jsonl(out / "predictions.jsonl")
    assert [p["ground_truth"] for p in preds] == ["140°", "\\frac{12}{5}", "5"]
    assert [p["correct"] for p in preds] == [True, True, False]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["max_new_tokens"] == 1024 and summary["failures"]["wrong"] == 1
    text = client.requests[0].prompts[0].messages[0].content[1].text
    assert text == GEOQA_EVAL_TEMPLATE.format(Question="Angle ABC is?")


def test_limit_and_config_override_are_applied(monkeypatch, tmp_path, superclevr_dir):
    client = FakeClient(SUPERCLEVR_OUTPUTS)
    monkeypatch.setattr(eval_run, "connect", lambda url, cfg: client)
    cfg = load_config(None, ["logging.progress=false", "eval.max_new_tokens=32"])
    out = tmp_path / "out"
    eval_run.main(_args("superclevr", server="http://fake:1", data=str(superclevr_dir), out=str(out), limit=2), cfg)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 2 and summary["max_new_tokens"] == 32
    assert client.requests[0].sampling.max_tokens == 32


def test_report_marks_right_and_wrong_and_escapes_output(monkeypatch, tmp_path, superclevr_dir):
    out = tmp_path / "out"
    _run_main(monkeypatch, FakeClient(SUPERCLEVR_OUTPUTS), "superclevr", data=str(superclevr_dir), out=str(out))
    html = (out / "report.html").read_text()
    assert html.count('class="card right"') == 1 and html.count('class="card wrong"') == 3
    assert html.count("data:image/jpeg;base64,") == 4
    assert "&lt;answer&gt;" in html and "<answer>" not in html  # model output must not become markup


# --------------------------------------------------------------------------- rescoring


def test_rescore_round_trip_and_other_scoring(monkeypatch, tmp_path, superclevr_dir):
    first = tmp_path / "first"
    _run_main(monkeypatch, FakeClient(SUPERCLEVR_OUTPUTS), "superclevr", data=str(superclevr_dir), out=str(first))

    def boom(*a, **k):
        raise AssertionError("--rescore must not contact a server")

    monkeypatch.setattr(eval_run, "connect", boom)
    same = tmp_path / "same"
    cfg = load_config(None, ["logging.progress=false"])
    assert eval_run.main(_args("superclevr", rescore=str(first / "predictions.jsonl"), out=str(same)), cfg) == 0
    assert _read_jsonl(same / "predictions.jsonl") == _read_jsonl(first / "predictions.jsonl")
    before, after = (json.loads((d / "summary.json").read_text()) for d in (first, same))
    for key in ("n", "correct", "accuracy", "ci95", "failures", "model", "max_new_tokens", "prompt"):
        assert after[key] == before[key], key
    assert (same / "report.html").is_file()

    # Strict scoring reads the single <answer>: a repeated tag that r1v scores right becomes unparsable.
    edited = tmp_path / "edited.jsonl"
    rows = _read_jsonl(first / "predictions.jsonl")
    rows[0]["output"] = "<answer>4</answer> or maybe <answer>5</answer>"
    edited.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for scoring, correct, failures in (("r1v", 1, {"no_tag": 1, "unparsable": 1, "wrong": 1}),
                                       ("strict", 0, {"no_tag": 1, "unparsable": 2, "wrong": 1})):
        out = tmp_path / scoring
        eval_run.main(_args("superclevr", rescore=str(edited), scoring=scoring, out=str(out)), cfg)
        summary = json.loads((out / "summary.json").read_text())
        assert (summary["scoring"], summary["correct"], summary["failures"]) == (scoring, correct, failures)


def test_rescore_bad_line_is_named(tmp_path):
    bad = tmp_path / "p.jsonl"
    rows = [{"ground_truth": 3, "output": "<answer>3</answer>"}, {"output": "x"}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SuzakError, match=r"p\.jsonl:2.*ground_truth"):
        eval_run.rescore(bad, get_benchmark("superclevr"), "r1v", prompt="eval")


# --------------------------------------------------------------------------- data errors


def test_missing_superclevr_data_says_where_to_download(tmp_path):
    with pytest.raises(SuzakError) as err:
        load_benchmark("superclevr", str(tmp_path / "nowhere"), load_config())
    message = str(err.value)
    assert "nowhere" in message
    assert "https://www.cs.jhu.edu/~zhuowan/zhuowan/SuperCLEVR/to_be_released/images.zip" in message
    assert "superclevr_test200_counting_problems.jsonl" in message and "Deep-Agent/R1-V" in message
    assert "images/superCLEVR_new_025000.png" in message  # the expected layout


def test_missing_geoqa_data_says_where_to_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no --data: the default folder data/geoqa is tried and named
    with pytest.raises(SuzakError) as err:
        load_benchmark("geoqa", None, load_config())
    message = str(err.value)
    assert "data/geoqa" in message and "geoqa_test_prompts.jsonl" in message
    assert "git lfs" in message and "unzip images.zip" in message
    assert "huggingface.co/datasets/Luckyjhg/Geo170K" in message


def test_missing_image_names_the_line(superclevr_dir):
    (superclevr_dir / "images" / "img_2.png").unlink()
    with pytest.raises(SuzakError) as err:
        load_benchmark("superclevr", str(superclevr_dir), load_config())
    message = str(err.value)
    assert "superclevr_test200_counting_problems.jsonl:3" in message and "img_2.png" in message
    assert "cs.jhu.edu" in message  # and where the images come from


def test_model_and_server_together_is_an_error(tmp_path, superclevr_dir):
    cfg = load_config()
    with pytest.raises(SuzakError, match="not both"):
        eval_run.main(_args("superclevr", model="m", server="http://x", data=str(superclevr_dir),
                            out=str(tmp_path)), cfg)


# --------------------------------------------------------------------------- synthetic benchmarks


def test_clevr_synth_split_seed_and_limit():
    cfg = load_config(None, ["eval.synth_n=50", "eval.limit=3", "data.synth.image_width=96",
                             "data.synth.image_height=80"])
    a = load_benchmark("clevr-synth", None, cfg)
    b = load_benchmark("clevr-synth", "B", cfg)
    assert len(a) == len(b) == 3
    assert {ex.meta["split"] for ex in a} == {"A"} and {ex.meta["split"] for ex in b} == {"B"}
    assert all(type(ex.ground_truth) is int for ex in a)
    assert [ex.id for ex in a] == [ex.id for ex in load_benchmark("clevr-synth-a", None, cfg)]
    with pytest.raises(SuzakError, match="--data A or --data B"):
        load_benchmark("clevr-synth", "data/superclevr", cfg)


def test_synth_benchmark_writes_images_and_scores(monkeypatch, tmp_path):
    cfg = load_config(None, ["eval.synth_n=2", "data.synth.image_width=96", "data.synth.image_height=80"])
    examples = load_benchmark("geo-synth", None, cfg)
    answers = {ex.problem: f"<think>.</think> <answer> {ex.answer} </answer>" for ex in examples}
    monkeypatch.setattr(eval_run, "connect", lambda url, cfg: FakeClient(answers))
    out = tmp_path / "out"
    eval_run.main(_args("geo-synth", server="http://fake:1", out=str(out)),
                  load_config(None, ["eval.synth_n=2", "data.synth.image_width=96", "data.synth.image_height=80",
                                     "logging.progress=false"]))
    preds = _read_jsonl(out / "predictions.jsonl")
    assert len(preds) == 2 and all(p["correct"] for p in preds)
    assert all(Path(p["image_path"]).is_file() and type(p["ground_truth"]) is str for p in preds)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accuracy"] == 1.0 and summary["data"] == "synth seed=12345 n=2"


def test_cli_missing_data_exits_2_with_the_download_hint(tmp_path, capsys):
    from suzak.cli import main as cli_main

    rc = cli_main(["eval", "superclevr", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                   "--server", "http://127.0.0.1:9"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "superclevr benchmark data not found" in err and "cs.jhu.edu" in err

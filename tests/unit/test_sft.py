"""SFT stage on a tiny random Qwen2.5-VL: label masking, loss going down, exact resume, data order, metrics file.

    .venv/bin/python -m pytest tests/unit/test_sft.py -q
"""

import json
import random

import pytest
import torch
from PIL import Image

from suzak.config import load_config
from suzak.tasks import Example, get_task
from trainer.monitor import Monitor
from trainer.sft import IGNORE_INDEX, ExampleStream, SFTCollator, micro_batch_indices, run_sft, sft_total_steps

TASK = get_task("clevr_count")


def examples(n=8, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        count = rng.randint(1, 5)
        img = Image.new("RGB", (56, 56), (40 * count, 20 * i % 255, 10))
        out.append(Example(id=str(i), problem="How many items are there in the image?", answer=str(count), image=img,
                           thinking=f"<think> I see {count} items. </think>"))
    return out


def config(tiny, out, *overrides):
    return load_config(None, [f"model.name_or_path={tiny}", "model.min_pixels=784", "model.max_pixels=3136",
                              "sft.batch_size=2", "sft.grad_accum=2", "sft.optim.lr=1e-3", "sft.optim.warmup_ratio=0",
                              "sft.optim.scheduler=constant", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
                              "logging.progress=false", f"out_dir={out}", *overrides])


def losses(out):
    rows = [json.loads(line) for line in (out / "sft_metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def test_labels_mask_prompt_and_image_tokens(tiny):
    from suzak.models import load_processor

    processor = load_processor(str(tiny), min_pixels=784, max_pixels=3136)
    tok = processor.tokenizer
    exs = examples(2)
    exs[1].problem = "How many items are there in the image? Count them all carefully please."  # padding on row 0
    batch = SFTCollator(processor, TASK, mask_prompt=True, system=True)(exs)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    assert (labels[ids == image_id] == IGNORE_INDEX).all() and (ids == image_id).any()
    assert (labels[mask == 0] == IGNORE_INDEX).all() and (mask == 0).any()
    for row, ex in enumerate(exs):
        trained = labels[row][labels[row] != IGNORE_INDEX]
        # Exactly the assistant turn (with its end-of-turn marker) is trained.
        assert tok.decode(trained) == TASK.sft_target(ex) + "<|im_end|>\n"
        first = int((labels[row] != IGNORE_INDEX).nonzero()[0])
        assert tok.decode(ids[row, :first]).endswith("<|im_start|>assistant\n")

    r1v = SFTCollator(processor, TASK, mask_prompt=False, system=True)(exs)["labels"]
    assert (r1v[ids == image_id] == IGNORE_INDEX).all() and (r1v[mask == 0] == IGNORE_INDEX).all()
    prompt_text = (r1v[0] != IGNORE_INDEX) & (labels[0] == IGNORE_INDEX)
    assert "How many items" in tok.decode(ids[0][prompt_text])  # R1-V style trains on the question too


def test_data_order_matches_across_process_counts():
    stream = ExampleStream(10, seed=3)
    one = [i for m in range(2) for i in micro_batch_indices(stream, 4, m, 0, 1, 3)]
    two = [i for r in range(2) for i in micro_batch_indices(stream, 4, 0, r, 2, 3)]
    assert one == two == stream.indices(4, 6)
    assert sorted(stream.indices(0, 10)) == list(range(10))  # one epoch is a permutation
    assert stream.indices(0, 10) != ExampleStream(10, seed=4).indices(0, 10)
    cfg = load_config(None, ["sft.batch_size=2", "sft.grad_accum=2", "sft.epochs=1.5"])
    assert sft_total_steps(cfg.sft, 10, world_size=1) == 4 and sft_total_steps(cfg.sft, 10, world_size=2) == 2


def crash_at(step: int, run, monkeypatch) -> None:
    """Run `run` with the monitor raising when it logs `step` (a crash after step - 1's checkpoint)."""
    original = Monitor.log

    def crashing(self, at, metrics):
        if at == step:
            raise RuntimeError("simulated crash")
        return original(self, at, metrics)

    monkeypatch.setattr(Monitor, "log", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        run()
    monkeypatch.setattr(Monitor, "log", original)


def test_loss_goes_down_and_export(tiny, tmp_path):
    out = tmp_path / "run"
    final = run_sft(config(tiny, out, "sft.max_steps=6"), examples(), TASK, out)
    got = losses(out)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]
    assert got[6] < got[1] - 0.3, got
    assert (final / "config.json").is_file() and (final / "tokenizer.json").is_file()
    assert (out / "sft" / "checkpoints" / "step-000006").is_dir()


def test_resume_matches_uninterrupted(tiny, tmp_path, monkeypatch):
    # LoRA with dropout: the next step's loss depends on the restored RNG state, not only on weights and data.
    lora = ["model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8", "model.lora.dropout=0.3",
            "sft.max_steps=3", "sft.optim.lr=5e-3"]
    full_out = tmp_path / "full"
    run_sft(config(tiny, full_out, *lora), examples(), TASK, full_out)
    expected = losses(full_out)

    out = tmp_path / "crashed"
    crash_at(2, lambda: run_sft(config(tiny, out, *lora), examples(), TASK, out), monkeypatch)
    assert [p.name for p in (out / "sft" / "checkpoints").iterdir()] == ["step-000001"]

    run_sft(config(tiny, out, *lora), examples(), TASK, out)
    resumed = losses(out)
    assert sorted(resumed) == [1, 2, 3]
    for step in (2, 3):
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6)
    assert expected[1] != expected[2]


def test_monitor_file_filters_secrets_and_drops_stale_lines(tmp_path, monkeypatch):
    from trainer.monitor import Timer

    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    cfg = load_config(None, ["logging.progress=false", "logging.log_every=1"])
    mon = Monitor(tmp_path, cfg.logging, 5, "sft")
    timer = Timer()
    with timer("update"):
        pass
    for step in (1, 2, 3):
        mon.log(step, {"loss": torch.tensor(1.0 / step), "api_key": "x", "note": "hf_supersecretvalue123 leaked",
                       "tokens_per_s": 10.0, **timer.metrics()})
    mon.close()
    # A resumed run logs from step 2 again: the crashed run's steps 2-3 are replaced.
    mon = Monitor(tmp_path, cfg.logging, 5, "sft")
    mon.log(2, {"loss": 0.25})
    mon.close()
    rows = [json.loads(line) for line in (tmp_path / "sft_metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 0.25
    text = (tmp_path / "sft_metrics.jsonl").read_text()
    assert "supersecret" not in text and "api_key" not in text
    assert rows[0]["tokens_per_s"] == 10.0 and "time/update" in rows[0]


def test_offloaded_sft_matches_resident_and_resumes_exactly(tiny, tmp_path, monkeypatch):
    """sft.optim.offload=cpu (HostAdamW: fp32 masters and moments on the host, with the masters in the checkpoint)
    trains like the resident optimizer, and a run killed after step 2 continues exactly."""
    steps = ["sft.max_steps=4"]
    resident_out, offload_out = tmp_path / "resident", tmp_path / "offload"
    run_sft(config(tiny, resident_out, *steps, "sft.optim.offload=gpu"), examples(), TASK, resident_out)
    run_sft(config(tiny, offload_out, *steps, "sft.optim.offload=cpu"), examples(), TASK, offload_out)
    resident, offloaded = losses(resident_out), losses(offload_out)
    for step in (1, 2, 3, 4):
        assert offloaded[step] == pytest.approx(resident[step], abs=1e-4), step
    state = torch.load(offload_out / "sft" / "checkpoints" / "step-000004" / "optimizer.pt", weights_only=False)
    assert "masters" in state and len(state["masters"]) > 0

    out = tmp_path / "crashed"
    crash_at(3, lambda: run_sft(config(tiny, out, *steps, "sft.optim.offload=cpu"), examples(), TASK, out), monkeypatch)
    run_sft(config(tiny, out, *steps, "sft.optim.offload=cpu"), examples(), TASK, out)
    for step in (3, 4):
        assert losses(out)[step] == pytest.approx(offloaded[step], abs=1e-6)

"""Two CPU processes under torchrun (gloo): gradients are averaged, and an SFT step leaves identical weights on both
ranks that equal a one-process run with the same global batch.

    .venv/bin/python -m pytest tests/unit/test_distributed.py -q
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from suzak.tasks import get_task

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # torchrun with two processes: about 4 minutes on 2 cores

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    sys.path.insert(0, os.environ["REPO"])
    from suzak.tasks import get_task
    from trainer import sft
    from trainer.distributed import barrier, gather_mean, is_main, make_accelerator, rank
    from tests.unit.test_distributed import sft_config, sft_examples

    out = os.environ["OUT"]
    cfg = sft_config(os.environ["TINY"], out, world=2)
    acc = make_accelerator(cfg)
    result = {"backend": dist.get_backend(), "world": acc.num_processes, "rank": acc.process_index,
              "is_main": is_main(), "mean": gather_mean(float(rank() + 1)),
              "mean_tensor": gather_mean(torch.tensor([rank() * 2.0])).tolist()}

    # DDP: each rank's local gradient differs; after backward both hold their mean.
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    net, opt = acc.prepare(net, torch.optim.SGD(net.parameters(), lr=0.1))
    net(torch.full((2, 3), float(rank() + 1))).sum().backward()
    result["grad"] = net.module.weight.grad.tolist()
    barrier()

    captured = []
    sft._export = lambda acc, policy, model, final: captured.append(acc.unwrap_model(model))
    sft.run_sft(cfg, sft_examples(), get_task("clevr_count"), out)
    model = captured[0]
    flat = torch.cat([p.detach().flatten() for _, p in sorted(model.named_parameters())])
    gathered = [None, None]
    dist.all_gather_object(gathered, flat)
    result["max_rank_diff"] = float((gathered[0] - gathered[1]).abs().max())
    if is_main():
        from safetensors.torch import save_file
        weights = {n: p.detach().contiguous() for n, p in model.named_parameters()}
        save_file(weights, os.path.join(out, "ddp.safetensors"))
    with open(os.path.join(out, f"result{rank()}.json"), "w") as fh:
        json.dump(result, fh)
''')


def sft_examples(n=8):
    from PIL import Image

    from suzak.tasks import Example

    return [Example(id=str(i), problem="How many items are there in the image?", answer=str(i % 5 + 1),
                    image=Image.new("RGB", (56, 56), (30 * i, 90, 200 - 20 * i)),
                    thinking=f"<think> I count {i % 5 + 1}. </think>") for i in range(n)]


def sft_config(tiny, out, world):
    from suzak.config import load_config

    # The same global batch (4 examples, one per micro-batch) on 2 processes x 2 micro-batches or 1 x 4.
    return load_config(None, [f"model.name_or_path={tiny}", "model.min_pixels=784", "model.max_pixels=3136",
                              "sft.batch_size=1", f"sft.grad_accum={4 // world}", "sft.max_steps=1",
                              "sft.optim.lr=1e-3", "sft.optim.warmup_ratio=0", "sft.optim.scheduler=constant",
                              "logging.progress=false", f"out_dir={out}"])


def test_two_processes_average_gradients_and_agree_with_one(tiny, tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, REPO=str(REPO), OUT=str(out), TINY=str(tiny), OMP_NUM_THREADS="1",
               CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((out / f"result{r}.json").read_text()) for r in range(2)]
    for r, res in enumerate(results):
        assert res["backend"] == "gloo" and res["world"] == 2 and res["rank"] == r and res["is_main"] == (r == 0)
        assert res["mean"] == 1.5 and res["mean_tensor"] == [1.0]
        # Local gradients are 2*(rank+1) per weight: 2 and 4, averaged to 3 on both ranks.
        assert res["grad"] == [[3.0, 3.0, 3.0]]
        assert res["max_rank_diff"] == 0.0
    ddp_loss = json.loads((out / "sft_metrics.jsonl").read_text().splitlines()[0])["loss"]

    # The one-process run over the same 4 examples (4 micro-batches of 1) reaches the same weights and loss.
    from trainer import sft

    single_out = tmp_path / "single"
    captured = []
    real_export = sft._export
    sft._export = lambda acc, policy, model, final: captured.append(acc.unwrap_model(model))
    try:
        sft.run_sft(sft_config(tiny, single_out, world=1), sft_examples(), get_task("clevr_count"), single_out)
    finally:
        sft._export = real_export
    single_loss = json.loads((single_out / "sft_metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert single_loss == pytest.approx(ddp_loss, abs=1e-5)
    from transformers import AutoModelForImageTextToText

    ddp = load_file(str(out / "ddp.safetensors"))
    base = dict(AutoModelForImageTextToText.from_pretrained(tiny, dtype=torch.float32).named_parameters())
    moved = 0
    for name, p in captured[0].named_parameters():
        torch.testing.assert_close(p.detach(), ddp[name], atol=2e-5, rtol=1e-4)
        moved += int(not torch.equal(base[name].detach(), ddp[name]))
    assert moved == len(base)  # the step changed every (trainable) weight

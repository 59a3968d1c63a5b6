"""CheckpointManager: atomic saves (a crash mid-save is never resumed from), pruning, exact RNG/optimizer restore.

    .venv/bin/python -m pytest tests/unit/test_checkpoint.py -q
"""

import json
import random

import numpy as np
import pytest
import torch

from suzak.config import OptimConfig
from suzak.errors import SuzakError
from trainer import checkpoint as ckpt_mod
from trainer.checkpoint import CheckpointManager
from trainer.optim import build_optimizer


class Net(torch.nn.Module):
    """Dropout makes the loss depend on the torch RNG, so a wrong RNG restore changes the numbers."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 16)
        self.b = torch.nn.Linear(16, 1)
        self.frozen = torch.nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.drop = torch.nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x + self.frozen(x)))))


def make(seed=0, lr=1e-2):
    torch.manual_seed(seed)
    net = Net()
    opt, sched = build_optimizer(net, OptimConfig(lr=lr, warmup_ratio=0.3, scheduler="cosine"), total_steps=10)
    return net, opt, sched


def train_step(net, opt, sched):
    # Data from the python and numpy RNGs, dropout from torch's: all three must be restored.
    x = torch.tensor(np.random.randn(4, 8), dtype=torch.float32) * random.random()
    loss = net(x).pow(2).mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()
    return loss.item()


def test_resume_continues_exactly(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    net, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for _ in range(3):
        train_step(net, opt, sched)
    path = mgr.save(3, net, opt, sched, {"examples_seen": 12, "policy_version": 3})
    expected = [train_step(net, opt, sched) for _ in range(4)]

    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    # Same base (frozen weights come from it, as on a real resume), trainable weights scrambled.
    net2, opt2, sched2 = make(seed=0)
    with torch.no_grad():
        for p in net2.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))
    extra = mgr.load(mgr.latest(), net2, opt2, sched2)
    assert mgr.latest() == path
    assert extra == {"examples_seen": 12, "policy_version": 3, "step": 3}
    assert sched2.last_epoch == 3
    got = [train_step(net2, opt2, sched2) for _ in range(4)]
    assert got == pytest.approx(expected, abs=1e-7)
    assert torch.equal(net.a.weight, net2.a.weight)


def test_crash_mid_save_is_ignored_and_cleaned(tmp_path, monkeypatch):
    net, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=3)
    good = mgr.save(1, net, opt, sched, {})
    real_save = torch.save

    def crash_on_optimizer(obj, f, *args, **kwargs):
        if str(f).endswith("optimizer.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt_mod.torch, "save", crash_on_optimizer)
    with pytest.raises(OSError, match="simulated"):
        mgr.save(2, net, opt, sched, {})
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert (mgr.root / ".tmp-step-000002").is_dir()  # the partial folder is there ...
    assert mgr.latest() == good  # ... but never chosen
    mgr.save(3, net, opt, sched, {})
    assert not (mgr.root / ".tmp-step-000002").exists()  # leftovers go once a save succeeds
    assert [p.name for p in mgr.complete()] == ["step-000001", "step-000003"]


def test_incomplete_folders_are_not_checkpoints(tmp_path):
    net, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=5)
    good = mgr.save(1, net, opt, sched, {})
    # A half-copied checkpoint: a file shorter than state.json records.
    copied = mgr.root / "step-000005"
    import shutil

    shutil.copytree(good, copied)
    with open(copied / "optimizer.pt", "r+b") as fh:
        fh.truncate(10)
    # A folder without state.json (e.g. a crash before the rename under another tool).
    (mgr.root / "step-000007").mkdir()
    assert mgr.latest() == good
    with pytest.raises(SuzakError, match="incomplete"):
        mgr.load(copied, net, opt, sched)


def test_prune_keeps_last_and_resave_replaces(tmp_path):
    net, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in range(1, 5):
        mgr.save(step, net, opt, sched, {"n": step})
    assert [p.name for p in mgr.complete()] == ["step-000003", "step-000004"]
    mgr.save(4, net, opt, sched, {"n": 40})
    state = json.loads((mgr.root / "step-000004" / "state.json").read_text())
    assert state["extra"] == {"n": 40}
    assert sorted(p.name for p in mgr.root.iterdir()) == ["step-000003", "step-000004"]


def test_only_trainable_weights_are_saved_and_checked(tmp_path):
    from safetensors.torch import load_file

    net, opt, sched = make()
    mgr = CheckpointManager(tmp_path, keep_last=1)
    path = mgr.save(1, net, opt, sched, {})
    assert set(load_file(str(path / "trainable.safetensors"))) == {"a.weight", "a.bias", "b.weight", "b.bias"}
    other = Net()
    other.frozen.requires_grad_(True)  # a different trainable set: resuming would silently mix states
    with pytest.raises(SuzakError, match="does not match the model"):
        mgr.load(path, other)


def test_extra_must_be_json(tmp_path):
    net, opt, sched = make()
    with pytest.raises(TypeError, match="JSON"):
        CheckpointManager(tmp_path).save(1, net, opt, sched, {"bad": object()})

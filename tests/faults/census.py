"""The census of issue 20: every bad input and fault its sections 1-8 name, tried against this checkout as a hostile
user would try them, each outcome classified; the counts and the table go to bench/FAULTS.md.

    PYTHONPATH=$PWD .venv/bin/python tests/faults/census.py                  # everything, about 12 min on 2 cores
    PYTHONPATH=$PWD .venv/bin/python tests/faults/census.py --no-vllm        # only the cases needing no engine

Not a pytest module (the fault suite, tests/faults/test_fault_*.py, asserts the same behaviour case by case); this
is the issue's table, rerun, each outcome judged as census_kit.py says. Servers are real `suzak serve` processes on
the tiny model (vLLM on CPU here), trains are real `suzak train` runs of the embedded default, cut short.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parent)]

import httpx  # noqa: E402

from census_kit import (CLEAR, CRASH, GOOD, HANDLED, HANG, LOST, MB, ROOT, SILENT, TOKEN, TRACEBACK,  # noqa: E402
                        Census, ImageHost, Server, absent, cli_error, env, gone, http_error, jsonl, kept, noise_png,
                        small_png, suzak, unchanged, write_report)
from fault_helpers import (TRAIN_SHORT, TRAIN_STEPS, alive, data_url, descendants, engine_core,  # noqa: E402
                           image_body, png_bytes, rss_mb, server_pid_of, steps_logged, text_body, wait_for_grpo_step)


# --------------------------------------------------------------------------- 4, 5, 7, 8: no engine needed


def local_cases(c: Census, home: Path) -> None:
    w = c.work / "local"
    w.mkdir()
    data = w / "bench"
    data.mkdir()
    small_png(data / "a.png")
    good = json.dumps({"image_path": "a.png", "question": "How many objects?", "ground_truth": 3}).encode()
    refused = "http://127.0.0.1:9"  # nothing listens: any case that reaches the server fails differently

    # 7: tracebacks in the issue, now clear errors.
    bad_utf8 = jsonl(data / "bad_utf8.jsonl", [], raw=good + b"\n" + good[:20] + b"\xff\xfe" + good[20:] + b"\n")
    c.case(7, "JSONL with non-UTF8 bytes, loading (`eval superclevr --data`)", lambda: cli_error(
        suzak(home, "eval", "superclevr", "--data", bad_utf8, "--server", refused, "--out", w / "o1"),
        "not UTF-8"))
    c.case(7, "JSONL with non-UTF8 bytes, loading (`train data.source=`)", lambda: cli_error(
        suzak(home, "train", "--out", w / "t1", f"data.source={bad_utf8}", "--stages", "data"), "not UTF-8"))
    line = json.dumps({"ground_truth": 3, "output": "<answer>3</answer>"}).encode()
    preds_bad = jsonl(w / "p_bad" / "predictions.jsonl", [], raw=line + b"\n" + line[:10] + b"\xc3\x28" + line[10:])
    c.case(7, "JSONL with non-UTF8 bytes, `eval --rescore`", lambda: cli_error(
        suzak(home, "eval", "superclevr", "--rescore", preds_bad, "--out", w / "o2"), "not UTF-8"))
    (data / "loop.png").symlink_to(data / "loop.png")
    loop = jsonl(data / "loop.jsonl", [{"image_path": "loop.png", "question": "q", "ground_truth": 3}])
    c.case(7, "symlink loop as an image path, loading", lambda: cli_error(
        suzak(home, "eval", "superclevr", "--data", loop, "--server", refused, "--out", w / "o3"), "loop.png"))
    intpath = jsonl(data / "int.jsonl", [{"image_path": 5, "question": "q", "ground_truth": 3}])
    c.case(7, "integer image_path, loading", lambda: cli_error(
        suzak(home, "eval", "superclevr", "--data", intpath, "--server", refused, "--out", w / "o4"), "image_path"))
    (w / "outfile").write_text("keep")
    c.case(7, "train --out is a file", lambda: kept(
        cli_error(suzak(home, "train", "--out", w / "outfile"), "is a file"), w / "outfile", "keep"))
    for name, make in (("sft", lambda d: (d / "sft").write_text("keep")),
                       ("eval", lambda d: (d / "eval").write_text("keep"))):
        d = w / f"run_{name}"
        d.mkdir()
        make(d)
        c.case(7, f"train --out/{name} is a file", lambda d=d, name=name: kept(
            cli_error(suzak(home, "train", "--out", d), "is a file"), d / name, "keep"))
    d = w / "run_cfgdir"
    (d / "config.yaml").mkdir(parents=True)
    c.case(7, "train --out/config.yaml is a folder", lambda: cli_error(suzak(home, "train", "--out", d), "is a folder"))
    c.case(7, "eval --out is a file", lambda: kept(cli_error(suzak(
        home, "eval", "superclevr", "--rescore", jsonl(w / "p_ok" / "predictions.jsonl", [
            {"ground_truth": 3, "output": "<answer>3</answer>"}]), "--out", w / "outfile"), "is a file"),
        w / "outfile", "keep"))
    c.case(7, "data synth --image-size abc", lambda: cli_error(
        suzak(home, "data", "synth", "clevr", "--n", "2", "--out", w / "s1", "--image-size", "abc"), "WIDTHxHEIGHT"))
    c.case(7, "data synth --image-size 10x10 (too small)", lambda: cli_error(
        suzak(home, "data", "synth", "clevr", "--n", "2", "--out", w / "s2", "--image-size", "10x10"), "at least"))
    c.case(7, "model tiny --out <an existing file>", lambda: kept(cli_error(
        suzak(home, "model", "tiny", "--out", w / "outfile"), "is a file"), w / "outfile", "keep"))

    # 8: checked at once, before any model loads.
    for label, overrides, fragment in (
            ("grpo.temperature=0 with G > 1", ["grpo.temperature=0"], "grpo.temperature=0"),
            ("unknown grpo.reward_weights key", ["grpo.reward_weights={acc: 1}"], "['acc']"),
            ("grpo.max_completion_tokens > server.max_model_len", ["grpo.max_completion_tokens=5000"],
             "server.max_model_len")):
        c.case(8, f"train {label}", lambda o=overrides, f=fragment, lab=label: absent(cli_error(
            suzak(home, "train", "--out", w / f"early_{len(lab)}", *o), f, late_s=30), w / f"early_{len(lab)}"))
    from vllm_server.client import free_port

    ok = jsonl(data / "ok.jsonl", [json.loads(good)])
    c.case(8, "eval --server against a refused port", lambda: cli_error(suzak(
        home, "eval", "superclevr", "--data", ok, "--server", f"http://127.0.0.1:{free_port()}", "--out", w / "o5"),
        "no rollout server answers", late_s=30))
    c.case(8, "eval with no --config: help and behaviour agree (built-in defaults)", lambda: no_config_eval(c, home, w))

    # 5: rescoring never overwrites its input.
    run = w / "evalrun"
    preds = jsonl(run / "predictions.jsonl", [{"id": "0", "image_path": "a.png", "question": "q", "ground_truth": 3,
                                                "output": "<answer>3</answer>", "extracted": "3", "correct": True}])
    (run / "summary.json").write_text('{"model": "m", "accuracy": 1.0}')
    (w / "link").symlink_to(run)
    inputs = {preds: preds.read_bytes(), run / "summary.json": (run / "summary.json").read_bytes()}
    for label, out, cwd in (("--out the folder it reads", run, None), ("--out <folder>/.", f"{run}/.", None),
                            ("--out through a symlink to it", w / "link", None),
                            ("--out as a relative path", "evalrun", w)):
        c.case(5, f"--rescore {label}", lambda out=out, cwd=cwd: unchanged(
            cli_error(suzak(home, "eval", "superclevr", "--rescore", preds, "--out", out, cwd=cwd), "would overwrite"),
            inputs))
    c.case(5, "--rescore into another folder", lambda: rescore_elsewhere(home, preds, run, w / "rescored"))
    trainrun = w / "trainrun"
    (trainrun / "grpo").mkdir(parents=True)
    (trainrun / "config.yaml").write_text("seed: 0\n")
    c.case(5, "--rescore --out a training run's folder", lambda: unchanged(cli_error(suzak(
        home, "eval", "superclevr", "--rescore", preds, "--out", trainrun), "training run"),
        {trainrun / "config.yaml": b"seed: 0\n"}))

    # 4: checkpoints (the learner's CheckpointManager and Monitor, in this process).
    checkpoint_cases(c, w)


def rescore_elsewhere(home: Path, preds: Path, run: Path, out: Path) -> tuple[str, str]:
    before = preds.read_bytes(), (run / "summary.json").read_bytes()
    r = suzak(home, "eval", "superclevr", "--rescore", preds, "--out", out)
    if r.rc != 0:
        return cli_error(r)
    if (preds.read_bytes(), (run / "summary.json").read_bytes()) != before:
        return LOST, "the input changed"
    return HANDLED, f"written to {out.name}/predictions.jsonl, input untouched"


def no_config_eval(c: Census, home: Path, w: Path) -> tuple[str, str]:
    import yaml

    from suzak.config import load_config

    help_text = suzak(home, "eval", "--help").out
    preds = jsonl(w / "p_nc" / "predictions.jsonl", [{"ground_truth": 3, "output": "<answer>3</answer>"}])
    r = suzak(home, "eval", "superclevr", "--rescore", preds, "--out", w / "nc")
    if r.rc != 0:
        return cli_error(r)
    saved = yaml.safe_load((w / "nc" / "config.yaml").read_text())
    default = load_config(None, []).model_dump(mode="json")
    says = "built-in defaults" in " ".join(help_text.split())
    same = saved["model"] == default["model"] and saved["server"] == default["server"]
    if says and same:
        return HANDLED, "help names the built-in defaults and the saved config.yaml holds them"
    return SILENT, f"help says built-in defaults: {says}; config is the defaults: {same}"


def checkpoint_cases(c: Census, w: Path) -> None:
    import contextlib
    import io

    import torch

    from suzak.config import LoggingConfig, OptimConfig
    from suzak.errors import SuzakError
    from trainer.checkpoint import CheckpointManager
    from trainer.monitor import Monitor
    from trainer.optim import build_optimizer

    def model():
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
        opt, sched = build_optimizer(net, OptimConfig(lr=1e-2), total_steps=10)
        return net, opt, sched

    def saved(name):
        net, opt, sched = model()
        mgr = CheckpointManager(w / name, keep_last=5)
        paths = {}
        for step in (1, 2, 3):
            with torch.no_grad():
                net[0].weight.fill_(float(step))
            paths[step] = mgr.save(step, net, opt, sched, {"policy_version": step})
        return mgr, paths

    def flip(path: Path):
        data = bytearray(path.read_bytes())
        data[-20] ^= 0xFF
        path.write_bytes(bytes(data))

    def fallback(name, damage):
        mgr, paths = saved(name)
        damage(paths[3])
        buf = io.StringIO()
        try:
            with contextlib.redirect_stdout(buf):
                latest = mgr.latest()
                net, opt, sched = model()
                step = mgr.load(latest, net, opt, sched)["step"]
        except SuzakError as e:
            return CLEAR, f"stops: {e}"
        except Exception as e:
            return TRACEBACK, f"{type(e).__name__}: {e}"
        warned = str(paths[3]) in buf.getvalue()
        if step == 2 and warned:
            return HANDLED, "falls back to step 2: " + buf.getvalue().strip().splitlines()[0]
        return SILENT, f"loaded step {step}; warning naming the bad one: {warned}"

    c.case(4, "newest checkpoint's weights corrupted in place", lambda: fallback(
        "ck1", lambda p: flip(p / "trainable.safetensors")))
    c.case(4, "newest checkpoint's optimizer state corrupted in place", lambda: fallback(
        "ck2", lambda p: flip(p / "optimizer.pt")))

    def truncate(p):
        with open(p / "optimizer.pt", "r+b") as fh:
            fh.truncate(100)

    c.case(4, "newest checkpoint truncated", lambda: fallback("ck3", truncate))

    def all_bad():
        mgr, paths = saved("ck4")
        for p in paths.values():
            flip(p / "trainable.safetensors")
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                latest = mgr.latest()
        except SuzakError as e:
            return CLEAR, str(e)
        return SILENT, f"latest() gave {latest}"

    c.case(4, "every checkpoint corrupt (the learner's resume)", all_bad)

    def metrics_past_checkpoint():
        folder = w / "mon"
        folder.mkdir()
        path = folder / "grpo_metrics.jsonl"
        old = "".join(json.dumps({"step": s, "loss": s}) + "\n" for s in range(1, 6)) + '{"step": 6, "lo'
        path.write_text(old)
        with contextlib.redirect_stdout(io.StringIO()):
            mon = Monitor(folder, LoggingConfig(progress=False), 10, "grpo")
            mon.log(4, {"loss": 0.5})  # resumed from the step-3 checkpoint
            mon.close()
        steps = [json.loads(line)["step"] for line in path.read_text().splitlines()]
        asides = list(folder.glob("grpo_metrics.replaced-*.jsonl"))
        if steps == [1, 2, 3, 4] and len(asides) == 1 and asides[0].read_text() == old:
            return HANDLED, "lines past the checkpoint replaced; the file as it was kept as " + asides[0].name
        return LOST, f"steps now {steps}, {len(asides)} aside"

    c.case(4, "a resume over metrics logged past its checkpoint", metrics_past_checkpoint)


# --------------------------------------------------------------------------- 1, 2, 6, 8: real servers


CPU_SERVER = ["server.enforce_eager=true", "server.gpu_memory_utilization=0.15"]
"""What a CPU host needs (no CUDA graphs; a KV cache the RAM holds); everything else stays at the built-in defaults."""


def memory_case(srv: Server, send, fragment: str | None, expect_ok: bool = False, slack_mb: float = 150):
    """A large request: refused (or served) with the server still up and its memory back near where it was."""
    base = rss_mb(srv.proc.pid)
    answer = send()
    time.sleep(1.0)
    grown = rss_mb(srv.proc.pid) - base if alive(srv.proc.pid) else float("nan")
    if expect_ok and not isinstance(answer, Exception) and answer.status_code == 200:
        outcome, note = HANDLED, "200"
    else:
        outcome, note = http_error(srv, answer, fragment)
    if outcome in GOOD and not grown < slack_mb:
        return CRASH, f"the server kept {grown:.0f} MB after answering ({note})"
    return outcome, f"server memory {grown:+.0f} MB after; {note}"


def loopback_server_cases(c: Census, home: Path) -> Server:
    """`suzak serve` with no --config on loopback: sections 1, 6 (loopback defaults), 2 (a bad push), 8."""
    w = c.work / "srv_a"
    w.mkdir()
    srv = Server(c, home, "server_loopback", *CPU_SERVER)
    start = time.monotonic()
    srv.wait_ready()
    info = httpx.get(srv.url + "/info", timeout=30).json()
    print(f"loopback server ready in {time.monotonic() - start:.0f} s: {info['model']}", flush=True)
    help_text = " ".join(suzak(home, "serve", "--help").out.split())
    c.case(8, "serve with no --config: help and behaviour agree (built-in defaults)", lambda: (
        (HANDLED, f"help names the built-in defaults; it serves {Path(info['model']).name}, max_model_len "
                  f"{info['max_model_len']}, max_pixels {info['max_pixels']} (the defaults)")
        if "built-in defaults" in help_text and info["max_model_len"] == 4096 and info["max_pixels"] == 401408
        else (SILENT, f"help: {help_text[:80]}; info {info}")))
    assert srv.post("/generate", body=text_body()).status_code == 200
    cap = 32 * info["max_model_len"]

    # 1: one request must not knock the server over.
    c.case(1, "50 MB JSON body: one prompt's text", lambda: memory_case(
        srv, lambda: srv.post("/generate", body=text_body("x" * (50 * MB))), "characters of text"))
    many = {"prompts": [{"messages": [{"role": "user", "content": "count " * ((cap - 100) // 6)}]}] * (50 * MB // cap),
            "sampling": {"max_tokens": 4}}
    c.case(1, "50 MB JSON body: 400 prompts each under the character cap", lambda: memory_case(
        srv, lambda: srv.post("/generate", body=many), "max_model_len"))
    c.case(1, "50 MB JSON body: junk field", lambda: memory_case(
        srv, lambda: srv.post("/generate", body={"pad": "x" * (50 * MB)}), None))
    c.case(1, "200 MB body, declared length (over server.max_request_mb)", lambda: memory_case(
        srv, lambda: srv.post("/generate", content=b"x" * (200 * MB)), "server.max_request_mb"))
    c.case(1, "200 MB body, chunked (no Content-Length)", lambda: memory_case(
        srv, lambda: srv.post("/generate", content=(b"y" * MB for _ in range(200))), "server.max_request_mb"))
    c.case(1, "20 MB body of text: memory after it is answered", lambda: memory_case(
        srv, lambda: srv.post("/generate", body=text_body("y" * (20 * MB))), "characters of text", slack_mb=100))
    images = [data_url(noise_png(600, seed)) for seed in range(14)]
    c.case(1, "20 MB body of valid images: served, memory after", lambda: memory_case(
        srv, lambda: srv.post("/generate", body={"prompts": [image_body(i)["prompts"][0] for i in images],
                                                  "sampling": {"max_tokens": 1}}), None, expect_ok=True, slack_mb=400))
    bomb = w / "bomb.png"
    bomb.write_bytes(png_bytes(20000, 20000))
    c.case(1, "20000x20000 PNG as a path", lambda: http_error(srv, srv.post("/generate", body=image_body(str(bomb))),
                                                              "max_pixels"))
    c.case(1, "20000x20000 PNG as a data URL", lambda: http_error(
        srv, srv.post("/generate", body=image_body(data_url(bomb.read_bytes()))), "max_pixels"))
    c.case(1, "seed=2**70", lambda: http_error(srv, srv.post("/generate", body=text_body(seed=2**70)), "sampling.seed"))
    c.case(1, "seed=-2**70", lambda: http_error(srv, srv.post("/generate", body=text_body(seed=-2**70)),
                                                "sampling.seed"))
    c.case(1, "seed=2**63-1 (the largest valid seed)", lambda: (
        (HANDLED, "200") if srv.post("/generate", body=text_body(seed=2**63 - 1)).status_code == 200
        else (CRASH, "refused")))
    c.case(1, "prompt text over the character cap", lambda: http_error(
        srv, srv.post("/generate", body=text_body("count the cubes " * (cap // 16 + 10))), "characters of text"))
    c.case(1, "a body that is not JSON", lambda: http_error(srv, srv.post("/generate", content=b"{not json"), "JSON"))

    # 7: a symlink loop and an integer image on the wire.
    (w / "loop.png").symlink_to(w / "loop.png")
    c.case(7, "symlink loop as an image path, on the server", lambda: http_error(
        srv, srv.post("/generate", body=image_body(str(w / "loop.png"))), "image file not found"))
    c.case(7, "integer image on the wire", lambda: http_error(
        srv, srv.post("/generate", body={"prompts": [{"messages": [{"role": "user", "content": [
            {"type": "image", "image": 5}]}]}]}), None))

    # 6: what the server opens on loopback (any local path, URLs without redirects).
    host = ImageHost(png_bytes(112, 84))
    small = small_png(w / "ok.png")
    c.case(6, "loopback: an image URL is fetched (default on loopback)", lambda: (
        (HANDLED, "200, fetched") if srv.post("/generate", body=image_body(host.url + "/img.png")).status_code == 200
        else (CRASH, "refused")))
    c.case(6, "loopback: a URL that redirects", lambda: no_redirect(srv, host))
    c.case(6, "loopback: missing / folder / non-image paths read the same", lambda: uniform(
        srv, [str(w / "nope.png"), str(w), "/etc/passwd"], small))

    # 2: a push naming tensors the model does not have.
    c.case(2, "files push naming an unknown tensor", lambda: bad_push(srv, w))
    return srv


def no_redirect(srv: Server, host: ImageHost) -> tuple[str, str]:
    host.handler.hits.clear()
    outcome, note = http_error(srv, srv.post("/generate", body=image_body(host.url + "/redirect")), "redirect")
    if "/img.png" in host.handler.hits:
        return SILENT, "the redirect was followed"
    return outcome, note


def uniform(srv: Server, refs: list[str], good: Path | None = None) -> tuple[str, str]:
    """Missing, folder, non-image: one message (the path aside), so a client cannot probe which files exist."""
    messages = []
    for ref in refs:
        answer = srv.post("/generate", body=image_body(ref))
        outcome, note = http_error(srv, answer, "image file not found")
        if outcome != CLEAR:
            return outcome, f"{ref}: {note}"
        messages.append(answer.json()["error"].replace(ref, "<path>"))
    if len(set(messages)) != 1:
        return SILENT, "the error text differs: " + " | ".join(m[:60] for m in messages)
    if good is not None and srv.post("/generate", body=image_body(str(good))).status_code != 200:
        return CRASH, "a good path is refused"
    return CLEAR, "400, one text for all: " + messages[0]


def bad_push(srv: Server, w: Path) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file

    folder = w / "push"
    folder.mkdir()
    save_file({"model.layers.0.mlp.not_a_tensor.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    answer = srv.post("/weights", body={"version": 5, "transport": "files", "path": str(folder)})
    outcome, note = http_error(srv, answer, None)
    if outcome == CLEAR:
        ready = httpx.get(srv.url + "/ready", timeout=30).json()
        if ready.get("policy_version") != 0 or srv.post("/generate", body=text_body()).status_code != 200:
            return CRASH, f"after the refusal: {ready}"
        note += "; engine alive, version unchanged"
    return outcome, note


def kill_engine_cases(c: Census, srv: Server) -> None:
    """2: the engine killed under a request in flight: the request, /health, /ready, /weights, the server's exit."""
    long = {"prompts": [{"messages": [{"role": "user", "content": f"count {i}"}]} for i in range(16)],
            "sampling": {"n": 32, "max_tokens": 1000, "ignore_eos": True, "logprobs": False}}
    box: dict = {}

    def in_flight():
        t = time.monotonic()
        box["answer"] = srv.post("/generate", body=long, timeout=600)
        box["seconds"] = time.monotonic() - t

    thread = threading.Thread(target=in_flight, daemon=True)
    thread.start()
    time.sleep(3)
    tree = srv.tree()
    killed = time.monotonic()
    os.kill(engine_core(srv.proc.pid), signal.SIGKILL)
    states = []  # (seconds since the kill, /health status, /ready code) until the server is gone
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and srv.proc.poll() is None:
        t = time.monotonic() - killed
        try:
            states.append((t, httpx.get(srv.url + "/health", timeout=5).json().get("status"),
                           httpx.get(srv.url + "/ready", timeout=5).status_code))
        except (httpx.HTTPError, ValueError):
            states.append((t, "refused", "refused"))
        time.sleep(0.2)
    thread.join(60)
    took = time.monotonic() - killed

    def request():
        answer = box.get("answer")
        if answer is None:
            return HANG, "no answer within a minute"
        if isinstance(answer, httpx.TimeoutException):
            return HANG, str(answer)
        if isinstance(answer, Exception):
            return CLEAR, f"connection closed ({type(answer).__name__})"
        if answer.status_code == 503 and "engine died" in answer.json().get("error", ""):
            return CLEAR, f"503 after {box['seconds']:.1f} s: {answer.json()['error']}"
        return (SILENT if answer.status_code == 200 else TRACEBACK), f"{answer.status_code}: {answer.text[:150]}"

    c.case(2, "engine killed (kill -9 VLLM::EngineCore) under a request in flight", request)
    late = [(health, ready) for t, health, ready in states if t > 2.0]  # the engine is checked once a second
    c.case(2, "/health and /ready after the engine died", lambda: (
        (HANDLED, f"from 2 s after the kill on, never ok/200: {sorted(set(map(str, late))) or 'server gone'}; "
                  f"first {len(states)} polls {sorted(set(map(str, [(h, r) for _, h, r in states])))}")
        if all(h != "ok" and r != 200 for h, r in late) else (SILENT, f"states seen: {states[:8]}")))

    def push_after():
        t = time.monotonic()
        answer = srv.post("/weights", body={"version": 9, "transport": "files", "path": "/nonexistent"}, timeout=60)
        seconds = time.monotonic() - t
        if isinstance(answer, httpx.TimeoutException) or seconds > 30:
            return HANG, f"{seconds:.0f} s"
        if isinstance(answer, Exception) or answer.status_code == 503:
            return CLEAR, f"after {seconds:.1f} s: " + (type(answer).__name__ if isinstance(answer, Exception)
                                                        else answer.json()["error"])
        return TRACEBACK, f"{answer.status_code}: {answer.text[:100]}"

    c.case(2, "a weight push after the engine died", push_after)
    try:
        code = srv.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    left = gone(tree, 30)
    c.case(2, "the server with a dead engine exits non-zero, its processes with it", lambda: (
        (HANDLED, f"exit {code} {took:.0f} s after the kill; no process left")
        if code not in (None, 0) and not left else (CRASH, f"exit {code}; left running: {left}")))


def off_loopback_cases(c: Census, home: Path) -> None:
    """6: bound off loopback (0.0.0.0): no local paths, no URLs, tokens; then kill -9 of the server (its engine)."""
    w = c.work / "srv_b"
    w.mkdir()
    c.case(6, "off loopback without SUZAK_SERVER_TOKEN", lambda: cli_error(
        suzak(home, "serve", "server.host=0.0.0.0", "server.port=1", timeout=120), "SUZAK_SERVER_TOKEN", late_s=30))
    srv = Server(c, home, "server_public", *CPU_SERVER, "server.host=0.0.0.0", "server.token_for_generate=true",
                 extra_env={"SUZAK_SERVER_TOKEN": TOKEN})
    try:
        srv.wait_ready()
        host = ImageHost(png_bytes(112, 84))
        small = small_png(w / "ok.png")
        c.case(6, "off loopback: an image URL", lambda: fetched(srv, host, http_error(
            srv, srv.post("/generate", body=image_body(host.url + "/img.png")), "allow_image_urls")))
        c.case(6, "off loopback: a local path anywhere on disk", lambda: http_error(
            srv, srv.post("/generate", body=image_body(str(small))), "image file not found"))
        c.case(6, "off loopback: missing / existing / non-image paths read the same", lambda: uniform(
            srv, [str(w / "nope.png"), str(small), "/etc/passwd"]))
        no_token = {"Authorization": ""}
        c.case(6, "off loopback: /generate without a token (server.token_for_generate=true)", lambda: http_error(
            srv, srv.post("/generate", body=text_body(), headers=no_token), "Bearer"))
        c.case(6, "off loopback: /weights without a token", lambda: http_error(
            srv, srv.post("/weights", body={"version": 1, "transport": "files", "path": str(w)}, headers=no_token),
            "Bearer"))
        c.case(6, "off loopback: with the token, a data URL image is served", lambda: (
            (HANDLED, "200") if srv.post("/generate", body=image_body(data_url(small.read_bytes()))).status_code == 200
            else (CRASH, "refused")))
        tree = srv.tree()
        os.kill(srv.proc.pid, signal.SIGKILL)  # as the OOM killer would
        c.case(1, "the server itself killed with -9 (as by the OOM killer): its engine goes too", lambda: (
            (HANDLED, "no process of its tree left after 60 s") if not gone(tree, 60)
            else (CRASH, f"left running: {gone(tree, 0)}")))
    finally:
        srv.kill()


def fetched(srv: Server, host: ImageHost, result: tuple[str, str]) -> tuple[str, str]:
    return (SILENT, "the URL was fetched") if "/img.png" in host.handler.hits else result


def sigterm_case(c: Census, srv: Server) -> None:
    """2: SIGTERM stops the server and its engine, with a request in flight."""
    long = {"prompts": [{"messages": [{"role": "user", "content": "count"}]}] * 8,
            "sampling": {"n": 32, "max_tokens": 1000, "ignore_eos": True}}
    box: dict = {}
    thread = threading.Thread(target=lambda: box.update(a=srv.post("/generate", body=long, timeout=300)), daemon=True)
    thread.start()
    time.sleep(3)
    tree = srv.tree()
    start = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    try:
        code = srv.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        code = None
    left = gone(tree, 30)
    thread.join(30)
    answer = box.get("a")
    status = answer.status_code if isinstance(answer, httpx.Response) else type(answer).__name__
    c.case(2, "SIGTERM with a request in flight stops the server and its engine", lambda: (
        (HANDLED, f"exit {code} after {time.monotonic() - start:.1f} s, request answered {status}, nothing left")
        if code is not None and not left else (HANG if code is None else CRASH, f"exit {code}; left: {left}")))


# --------------------------------------------------------------------------- 2, 3, 4: real `suzak train` runs


def train_cmd(out: Path, *extra: str) -> list[str]:
    return ["train", "--out", out, *TRAIN_SHORT, *extra]


def start_train(c: Census, home: Path, name: str):
    out, log = c.work / name / "run", c.work / f"{name}.log"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "suzak", *map(str, train_cmd(out))], stdout=fh,
                                stderr=subprocess.STDOUT, env=env(home))
    wait_for_grpo_step(proc, out, log, step=3)
    return proc, out, log


def train_cases(c: Census, home: Path) -> None:
    # 2: the engine killed mid-GRPO: the learner gets an error within seconds, restarts the server, loses nothing.
    proc, out, log = start_train(c, home, "t_engine")
    before = (out / "grpo_metrics.jsonl").read_text()
    server = server_pid_of(out)
    tree = [server, *descendants(server)]
    os.kill(engine_core(server), signal.SIGKILL)
    try:
        code = proc.wait(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = None
    text = log.read_text()

    def engine_mid_grpo():
        if code is None:
            return HANG, "the learner did not finish within 15 min"
        if "Traceback (most recent call last)" in text:
            return TRACEBACK, text.strip().splitlines()[-1]
        metrics = (out / "grpo_metrics.jsonl").read_text()
        steps = steps_logged(out / "grpo_metrics.jsonl")
        if not metrics.startswith(before) or steps != list(range(1, TRAIN_STEPS + 1)):
            return LOST, f"exit {code}, steps logged {steps}"
        if code == 0 and "restarting it (1/2)" in text:
            line = next(x for x in text.splitlines() if "restarting it" in x)
            return HANDLED, f"exit 0, steps 1-{TRAIN_STEPS} once; " + line[line.index("grpo:"):][:40] + \
                "... restarting it (1/2)" + line.split("restarting it (1/2)")[1]
        return (CLEAR if code == 2 else CRASH), f"exit {code}: {text.strip().splitlines()[-1]}"

    c.case(2, "engine killed mid-GRPO under `suzak train`", engine_mid_grpo)
    c.case(3, "the killed engine's server leaves nothing behind", lambda: (
        (HANDLED, "no process of its tree left") if not gone(tree, 30) else (CRASH, f"left: {gone(tree, 0)}")))
    after = (out / "grpo_metrics.jsonl").read_text()
    c.case(2, "rerun after the engine's death: nothing redone, nothing overwritten", lambda: rerun(
        home, out, after, resumed=False))

    # 3: the learner killed with -9 (as the OOM killer does): its server and engine go with it; a rerun resumes.
    proc, out, log = start_train(c, home, "t_learner")
    before = (out / "grpo_metrics.jsonl").read_text()
    server = server_pid_of(out)
    tree = [server, *descendants(server)]
    proc.kill()
    proc.wait()
    c.case(3, "learner killed with -9 mid-GRPO: its server and engine stop", lambda: (
        (HANDLED, f"all {len(tree)} server processes gone within 60 s") if not gone(tree, 60)
        else (CRASH, f"left running: {gone(tree, 0)}")))
    c.case(3, "rerun after the learner's kill -9: no old server, resumes, every step once", lambda: rerun(
        home, out, before, resumed=True))

    # 4: every checkpoint corrupt on a real rerun: a clear error, the metrics untouched.
    shutil.rmtree(out / "grpo" / "final")
    for ckpt in (out / "grpo" / "checkpoints").glob("step-*"):
        data = bytearray((ckpt / "trainable.safetensors").read_bytes())
        data[-20] ^= 0xFF
        (ckpt / "trainable.safetensors").write_bytes(bytes(data))
    metrics = (out / "grpo_metrics.jsonl").read_bytes()
    c.case(4, "every checkpoint corrupt, `suzak train` rerun", lambda: unchanged(cli_error(
        suzak(home, *train_cmd(out, "--stages", "grpo"), timeout=900), "--no-resume"),
        {out / "grpo_metrics.jsonl": metrics}))
    sft_metrics = (out / "sft_metrics.jsonl").read_bytes()

    def no_resume():
        r = suzak(home, *train_cmd(out, "--no-resume", "--stages", "sft", "sft.max_steps=1"), timeout=600)
        if r.rc != 0:
            return cli_error(r)
        asides = list(out.glob("previous-*"))
        if len(asides) != 1 or (asides[0] / "sft_metrics.jsonl").read_bytes() != sft_metrics:
            return LOST, f"asides {asides}"
        return HANDLED, f"earlier sft/, sft_metrics.jsonl, eval/ moved to {asides[0].name}/; grpo_metrics kept: " \
                        f"{(out / 'grpo_metrics.jsonl').read_bytes() == metrics}"

    c.case(4, "--no-resume over an earlier run", no_resume)


def rerun(home: Path, out: Path, before: str, resumed: bool) -> tuple[str, str]:
    r = suzak(home, *train_cmd(out), timeout=900)
    if r.rc != 0:
        return cli_error(r)
    if "Traceback (most recent call last)" in r.text:
        return TRACEBACK, r.text.strip().splitlines()[-1]
    if "from an earlier run is still running" in r.text:
        return CRASH, "an old server was still running"
    steps = steps_logged(out / "grpo_metrics.jsonl")
    metrics = (out / "grpo_metrics.jsonl").read_text()
    if steps != list(range(1, TRAIN_STEPS + 1)) or not metrics.startswith(before):
        return LOST, f"steps {steps}; earlier lines kept: {metrics.startswith(before)}"
    line = next((x.split("grpo: ", 1)[1] for x in r.out.splitlines() if "grpo: resumed from" in x), "")
    if resumed != bool(line):
        return SILENT, f"resumed: {bool(line)}"
    return HANDLED, f"exit 0, steps 1-{TRAIN_STEPS} once, earlier lines as written" + (
        f"; {line.replace(str(out), 'run')}" if line else "; GRPO not redone")


def main() -> int:
    import importlib.util

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "FAULTS.md"), help="the report (default bench/FAULTS.md)")
    ap.add_argument("--no-vllm", action="store_true", help="skip the cases that need real servers and trains")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs of every server and run)")
    args = ap.parse_args()
    from suzak.log import setup_logging

    setup_logging()  # suzak's log lines (warnings included) go to stdout as under the CLI, where cases look for them
    work = Path(tempfile.mkdtemp(prefix="suzak-census-"))
    print(f"census work folder: {work}", flush=True)
    c, home, start = Census(work), work / "home", time.time()
    servers: list[Server] = []

    def phase(section: int, name: str, fn) -> None:
        """A group of cases; if the census breaks inside it, that is recorded and the next group runs."""
        try:
            fn()
        except Exception as e:
            note = f"{type(e).__name__}: {e}"
            c.case(section, f"({name}: the census broke)", lambda: ("census error", note))

    def live_servers() -> None:
        srv = loopback_server_cases(c, home)
        servers.append(srv)
        kill_engine_cases(c, srv)
        spare = Server(c, home, "server_sigterm", *CPU_SERVER)  # starts while the off-loopback cases run
        servers.append(spare)
        phase(6, "off-loopback server", lambda: off_loopback_cases(c, home))
        spare.wait_ready()
        sigterm_case(c, spare)

    try:
        phase(7, "local cases", lambda: local_cases(c, home))
        if not args.no_vllm and importlib.util.find_spec("vllm") is not None:
            phase(1, "servers", live_servers)
            phase(2, "trains", lambda: train_cases(c, home))
    finally:
        for srv in servers:
            srv.kill()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    command = "PYTHONPATH=$PWD .venv/bin/python tests/faults/census.py" + (" --no-vllm" if args.no_vllm else "")
    write_report(c, Path(args.out), command, time.time() - start)
    bad = [k for k in c.cases if k.outcome not in GOOD]
    print(f"\n{len(c.cases)} cases, {len(bad)} not a clear error or handled correctly; report: {args.out}")
    for k in bad:
        print(f"  {k.section}. {k.name}: {k.outcome} -- {k.note}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

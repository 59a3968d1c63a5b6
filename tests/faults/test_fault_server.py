"""Fault suite, rollout server HTTP layer (fake engine, no vLLM): size limits, bombs, bad sampling values, image
sources, a dying engine, stopping, client timeouts.

    .venv/bin/python -m pytest tests/faults/test_fault_server.py -q

The same cases against the real vLLM engine are in test_fault_vllm.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fault_helpers import FakeEngine, data_url, image_body, png_bytes, text_body
from suzak import wire
from suzak.config import load_config
from suzak.errors import SuzakError
from suzak.images import ImagePolicy, encode_image_data_url, load_image
from vllm_server.app import ServerLimits, create_app, limits_for
from vllm_server.client import RolloutClient, free_port

MB = 1 << 20


def _app(engine=None, **limits):
    return create_app(engine or FakeEngine(), limits=ServerLimits(**limits) if limits else None)


@pytest.fixture
def http():
    engine = FakeEngine()
    with TestClient(_app(engine, max_request_bytes=2 * MB)) as client:
        client.engine = engine
        yield client


class LiveServer:
    """The app on a real port (uvicorn in a thread): for what TestClient cannot show (sockets, timeouts)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


# --------------------------------------------------------------------------- request size


def test_a_declared_oversized_body_is_413_json_before_it_is_read_and_the_server_stays_up(http):
    r = http.post("/generate", content=b"x" * (3 * MB), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "server.max_request_mb" in r.json()["error"] and "3.0 MB" in r.json()["error"]
    assert http.get("/health").json() == {"status": "ok"}
    assert http.post("/generate", json=text_body()).status_code == 200


def test_a_chunked_oversized_body_is_413_too():
    def chunks():
        for _ in range(12):
            yield b"y" * (256 << 10)

    with LiveServer(_app(max_request_bytes=2 * MB)) as url:
        r = httpx.post(url + "/generate", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
        assert r.status_code == 413 and "over 2." in r.json()["error"]
        assert httpx.get(url + "/health").status_code == 200
        assert httpx.post(url + "/generate", json=text_body(), timeout=30).status_code == 200


def test_the_client_still_sees_the_413_while_it_sends_a_big_body():
    # The server reads and drops the rest, so a client that sends everything first is not cut off mid-write.
    with LiveServer(_app(max_request_bytes=1 * MB)) as url:
        r = httpx.post(url + "/generate", content=b"z" * (40 * MB), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 413


def test_the_client_splits_a_request_over_the_servers_limit_and_keeps_each_prompts_seed():
    with TestClient(_app(max_request_bytes=300_000)) as http:
        client = RolloutClient("http://testserver", http=http, retries=0)
        assert client.info().max_request_bytes == 300_000
        noise = Image.frombytes("RGB", (200, 200), os.urandom(200 * 200 * 3))
        big = encode_image_data_url(noise)  # ~160 KB as a data URL: 8 of them are over the limit
        prompts = [wire.Prompt.model_validate(image_body(big)["prompts"][0]) for _ in range(8)]
        resp = client.generate(wire.GenerateRequest(prompts=prompts, sampling=wire.SamplingParams(seed=100)))
        # The engine samples prompt i with seed + i: split or not, prompt i of the request keeps seed 100 + i.
        assert [r.completions[0].token_ids[2] for r in resp.results] == list(range(100, 108))
        one = wire.GenerateRequest(prompts=[wire.Prompt.model_validate(image_body(
            data_url(os.urandom(400_000)))["prompts"][0])])
        with pytest.raises(SuzakError, match="over rollout server .* limit of 0.3 MB"):
            client.generate(one)


# --------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("sampling, field", [
    ({"seed": 2**70}, "sampling.seed"), ({"seed": -(2**70)}, "sampling.seed"), ({"top_k": 2**70}, "sampling.top_k"),
    ({"max_tokens": 2**40}, "sampling.max_tokens")])
def test_out_of_range_sampling_values_are_400_naming_the_field(http, sampling, field):
    r = http.post("/generate", json=text_body(**sampling))
    assert r.status_code == 400 and r.json()["field"] == field and r.json()["error"]
    assert http.engine.generated == 0


def test_infinite_temperature_and_nan_are_4xx(http):
    for raw in (b'{"prompts": [{"messages": [{"role": "user", "content": "hi"}]}], "sampling": {"temperature": '
                b'Infinity}}', b'{"prompts": [{"messages": [{"role": "user", "content": "hi"}]}], "sampling": '
                b'{"top_p": NaN}}'):
        r = http.post("/generate", content=raw, headers={"content-type": "application/json"})
        assert r.status_code in (400, 422) and r.json()["field"].startswith("sampling.")


def test_prompt_text_over_the_cap_is_400_before_tokenising(http):
    r = http.post("/generate", json=text_body("count the cubes " * 2000))  # 32000 chars > 32 x 512
    assert r.status_code == 400 and "characters of text" in r.json()["error"] and r.json()["field"] == "prompts.0"
    assert http.engine.generated == 0


def test_unknown_routes_and_methods_answer_json(http):
    r = http.get("/nope")
    assert r.status_code == 404 and "no route /nope" in r.json()["error"]
    r = http.get("/generate")
    assert r.status_code == 405 and r.json()["error"]


def test_a_body_that_is_not_json_is_a_4xx_json_error(http):
    r = http.post("/generate", content=b"\xff\xfe not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "UTF-8 JSON" in r.json()["error"]
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "not valid JSON" in r.json()["error"]


# --------------------------------------------------------------------------- images


@pytest.mark.parametrize("size", [(20000, 20000), (10000, 10000)])  # over PIL's bomb limit; under it, over ours
def test_huge_images_as_path_or_data_url_are_400_without_decoding(http, tmp_path, monkeypatch, size):
    raw = png_bytes(*size)
    path = tmp_path / "huge.png"
    path.write_bytes(raw)
    decoded = []
    real_load = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or real_load(self))
    for ref in (str(path), data_url(raw)):
        r = http.post("/generate", json=image_body(ref))
        assert r.status_code == 400 and "max_pixels" in r.json()["error"], r.text
        assert r.json()["field"] == "prompts.0.messages.0.content.0.image"
    assert decoded == [] and http.engine.generated == 0


def test_load_image_on_the_client_side_names_a_bomb(tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bytes(20000, 20000))
    with pytest.raises(SuzakError, match="too large to open safely"):
        load_image(str(path))


def test_paths_the_server_will_not_open_all_get_the_same_error(tmp_path):
    inside, outside = tmp_path / "allowed", tmp_path / "secret"
    inside.mkdir(), outside.mkdir()
    Image.new("RGB", (56, 56)).save(inside / "ok.png")
    Image.new("RGB", (56, 56)).save(outside / "other.png")
    (inside / "notes.png").write_text("not an image")
    (inside / "escape.png").symlink_to(outside / "other.png")
    (inside / "loop.png").symlink_to(inside / "loop.png")
    policy = ImagePolicy(roots=(str(inside),), max_pixels=10**6)
    assert load_image(str(inside / "ok.png"), policy=policy).size == (56, 56)
    messages = set()
    for ref in (inside / "missing.png", outside / "other.png", inside / "notes.png", inside / "escape.png",
                inside / "loop.png", inside, "/etc/passwd"):
        with pytest.raises(SuzakError) as err:
            load_image(str(ref), policy=policy)
        messages.add(str(err.value).replace(str(ref), "<ref>"))
    assert len(messages) == 1 and "image file not found: <ref>" in messages.pop()


def test_off_loopback_the_server_opens_no_paths_and_fetches_no_urls(tmp_path, monkeypatch):
    monkeypatch.setenv("SUZAK_SERVER_TOKEN", "t0ken")
    remote = limits_for(load_config(None, ["server.host=0.0.0.0"]), "t0ken")
    assert remote.images.roots == () and remote.images.allow_urls is False and remote.generate_token is None
    local = limits_for(load_config(None, []))
    assert local.images.roots is None and local.images.allow_urls is True
    chosen = limits_for(load_config(None, ["server.host=0.0.0.0", f"server.allowed_image_roots=[{tmp_path}]",
                                           "server.allow_image_urls=true", "server.token_for_generate=true",
                                           "server.max_request_mb=4"]), "t0ken")
    assert chosen.images.roots == (str(tmp_path),) and chosen.images.allow_urls
    assert chosen.generate_token == "t0ken" and chosen.max_request_bytes == 4 * MB

    Image.new("RGB", (56, 56)).save(tmp_path / "a.png")
    with TestClient(create_app(FakeEngine(), admin_token="t0ken", limits=remote)) as http:
        r = http.post("/generate", json=image_body(str(tmp_path / "a.png")))
        assert r.status_code == 400 and "opens no local paths" in r.json()["error"]
        r = http.post("/generate", json=image_body("http://169.254.169.254/latest/meta-data"))
        assert r.status_code == 400 and "server.allow_image_urls" in r.json()["error"]
        assert http.post("/generate", json=image_body(encode_image_data_url(Image.new("RGB", (56, 56))))
                         ).status_code == 200
    with TestClient(create_app(FakeEngine(), admin_token="t0ken", limits=chosen)) as http:
        assert http.post("/generate", json=text_body()).status_code == 401
        assert http.get("/info").status_code == 401
        auth = {"Authorization": "Bearer t0ken"}
        assert http.post("/generate", json=image_body(str(tmp_path / "a.png")), headers=auth).status_code == 200


def test_urls_are_not_followed_through_redirects():
    from fastapi import FastAPI
    from fastapi.responses import RedirectResponse

    site = FastAPI()
    site.get("/img.png")(lambda: RedirectResponse("http://127.0.0.1:9/elsewhere.png"))
    with LiveServer(site) as url:
        with pytest.raises(SuzakError, match="HTTP 307.*redirects are not followed"):
            load_image(url + "/img.png", policy=ImagePolicy())


# --------------------------------------------------------------------------- a dying engine, a stopping server


def test_a_dead_engine_fails_the_request_in_flight_at_once_then_ready_and_health_say_so():
    engine = FakeEngine()
    stopped = []
    app = create_app(engine, on_fatal=lambda: stopped.append(time.monotonic()),
                     limits=ServerLimits(engine_check_s=0.2))
    with TestClient(app) as http:
        http.portal.call(lambda: setattr(engine, "hold", asyncio.Event()))  # generate now waits forever
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/generate", json=text_body())
            time.sleep(0.5)
            assert not pending.done()
            engine.dead = "engine-core process 123 exited with code -9"
            start = time.monotonic()
            r = pending.result(timeout=10)
        assert r.status_code == 503 and "engine died" in r.json()["error"] and "-9" in r.json()["error"]
        assert time.monotonic() - start < 3
        while not stopped and time.monotonic() - start < 5:
            time.sleep(0.05)
        assert stopped  # serve() stops uvicorn then, and exits non-zero
        assert http.get("/ready").status_code == 503
        assert http.get("/health").json()["status"] == "engine_dead"
        assert http.post("/weights", json={"version": 1, "transport": "files", "path": "/x"}).status_code == 503
        with pytest.raises(SuzakError, match="engine died"):
            RolloutClient("http://testserver", http=http, retries=0).ready()


def test_a_stopping_server_answers_its_requests_in_flight_with_503():
    engine = FakeEngine()
    app = create_app(engine)
    with TestClient(app) as http:
        http.portal.call(lambda: setattr(engine, "hold", asyncio.Event()))
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(http.post, "/generate", json=text_body())
            time.sleep(0.3)
            app.state.liveness.request_stop()  # what serve() does on SIGTERM or when its parent is gone
            r = pending.result(timeout=10)
        assert r.status_code == 503 and "stopping" in r.json()["error"]


def test_each_client_call_has_its_own_timeout():
    engine = FakeEngine()
    with LiveServer(create_app(engine)) as url:
        client = RolloutClient(url, retries=0, timeout=600, weights_timeout=1.0)
        assert client.info().engine == "fake"
        engine.hold = asyncio.Event()  # pushes now hang (the event is never set)
        start = time.monotonic()
        with pytest.raises(SuzakError, match=r"did not answer POST /weights within 1 s.*weights_timeout_s"):
            client.update_weights(wire.WeightUpdateRequest(version=1, transport="files", path="/tmp"))
        assert time.monotonic() - start < 5
        assert client._timeout("/generate") == 600 and client._timeout("/ready") == 30
        cfg = load_config(None, ["server.weights_timeout_s=45", "server.request_timeout_s=900"])
        made = RolloutClient.for_config(url, cfg)
        assert (made.timeout, made.weights_timeout) == (900, 45)
        engine.hold.set()  # let uvicorn shut down


def test_a_server_that_vanishes_mid_request_is_a_clear_error_not_a_traceback():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]

    def accept_and_drop():
        conn, _ = sock.accept()
        conn.recv(65536)
        conn.close()

    threading.Thread(target=accept_and_drop, daemon=True).start()
    client = RolloutClient(f"http://127.0.0.1:{port}", retries=0)
    with pytest.raises(SuzakError, match="rollout server|no rollout server"):
        client.generate(wire.GenerateRequest.model_validate(text_body()))
    sock.close()


def test_32_concurrent_requests_mixing_good_and_bad_each_get_their_answer(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_bytes(20000, 20000))
    good = image_body(encode_image_data_url(Image.new("RGB", (112, 84), (9, 9, 9))))
    cases = []
    for i in range(32):
        kind = ("good", "missing", "bomb", "good", "seed", "good", "schema", "huge")[i % 8]
        cases.append((kind, {"good": good, "missing": image_body(str(tmp_path / "nope.png")),
                             "bomb": image_body(str(bomb)), "seed": text_body(seed=2**70),
                             "schema": {"prompts": []}, "huge": {"pad": "x" * (3 * MB)}}[kind]))
    expected = {"good": 200, "missing": 400, "bomb": 400, "seed": 400, "schema": 422, "huge": 413}
    with LiveServer(_app(max_request_bytes=2 * MB)) as url:
        def send(case):
            with httpx.Client(base_url=url, timeout=60) as c:
                r = c.post("/generate", json=case[1])
                return case[0], r.status_code, r.json()

        with ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(send, cases))
        assert httpx.get(url + "/health").json() == {"status": "ok"}
    for kind, status, body in answers:
        assert status == expected[kind], (kind, status, body)
        assert (status == 200) == ("results" in body) and (status == 200 or body["error"])


def test_a_failed_reload_in_vllm_stops_the_server_instead_of_serving_half_loaded_weights(tmp_path):
    # vLLM's layerwise reload leaves meta tensors behind when a push fails in the worker: the next generate crashed
    # the engine, and later pushes failed too. The push gets the reason; the liveness check then stops the server.
    import torch
    from safetensors.torch import save_file

    from vllm_server.engine import RequestError, VLLMEngine

    class LLM:
        errored = False

        async def pause_generation(self, **kw):
            pass

        async def resume_generation(self):
            pass

        async def collective_rpc(self, method, kwargs=None):
            raise Exception("Worker failed with error 'There is no module or parameter named 'foo''")

    save_file({"model.foo": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    engine = VLLMEngine(load_config(None, []))
    engine.llm = LLM()

    async def push():
        engine.init_state()
        await engine.update_weights(wire.WeightUpdateRequest(version=1, transport="files", path=str(tmp_path)))

    with pytest.raises(RequestError, match="no module or parameter named 'foo'.*the server stops") as err:
        asyncio.run(push())
    assert err.value.status == 500 and "half-loaded" in engine.check_alive()


def test_push_checks_know_checkpoint_spellings_and_tied_heads():
    from vllm_server.engine import RequestError, check_push_shapes

    served = {"model.layers.0.w": (4, 4), "visual.blocks.0.w": (2, 2)}  # transformers 4 names, no lm_head (tied)
    learner = {"model.language_model.layers.0.w": (4, 4), "model.visual.blocks.0.w": (2, 2), "lm_head.weight": (9, 4)}
    check_push_shapes(learner, served, None)
    check_push_shapes(learner, served, {"model.layers.0.w": (4, 4), "visual.blocks.0.w": (2, 2)})  # after an export
    with pytest.raises(RequestError, match=r"another shape.*\[4, 3\] \(served \[4, 4\]\)"):
        check_push_shapes({**learner, "model.language_model.layers.0.w": (4, 3)}, served, None)
    with pytest.raises(RequestError, match=r"does not have.*model\.foo"):
        check_push_shapes({**learner, "model.foo": (1,)}, served, dict(served))
    # The first push too: a name the served checkpoint lacks would fail inside vLLM and stop the server.
    with pytest.raises(RequestError, match=r"1 tensor\(s\) the model does not have.*not_a_tensor"):
        check_push_shapes({**learner, "model.layers.0.not_a_tensor": (2, 2)}, served, None)
    check_push_shapes({"model.layers.0.not_a_tensor": (2, 2)}, {}, None)  # nothing known yet: vLLM decides


_SERVE_FAKE = r"""
import asyncio, subprocess, sys
sys.path.insert(0, sys.argv[1])
from fault_helpers import FakeEngine
import vllm_server.engine as engine_mod
from vllm_server import app
from suzak.config import load_config

class Stuck(FakeEngine):
    async def start(self):
        # stands in for vLLM's engine-core process, which a clean shutdown would stop
        self.child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        print("child", self.child.pid, flush=True)
        self.hold = asyncio.Event()  # every generate stays in flight
        self.ready = True

    async def shutdown(self):
        if sys.argv[3] == "hang":
            await asyncio.sleep(3600)  # a shutdown that never ends: the watch thread must end the process

engine_mod.build_engine = lambda cfg: Stuck()
app.STOP_GRACE_S = 3.0
app.serve(load_config(None, [f"server.port={sys.argv[2]}"]))
"""


@pytest.mark.parametrize("shutdown", ["clean", "hang"])
def test_sigterm_stops_the_server_its_requests_and_whatever_it_started(tmp_path, shutdown):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from fault_helpers import alive, descendants

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _SERVE_FAKE, str(Path(__file__).parent), str(port), shutdown],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    try:
        line = ""
        while not line.startswith("child "):
            line = proc.stdout.readline()
            assert line, "the server exited before it started"
        child = int(line.split()[1])
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        tree = [proc.pid, *descendants(proc.pid)]
        assert child in tree
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, url + "/generate", json=text_body(), timeout=60)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            start = time.monotonic()
            r = pending.result(timeout=30)
        assert r.status_code == 503 and "stopping" in r.json()["error"] and time.monotonic() - start < 3
        proc.wait(timeout=30)
        assert time.monotonic() - start < (15 if shutdown == "clean" else 20)
        deadline = time.monotonic() + 10
        while any(alive(p) for p in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in tree if alive(p)], "a process outlived the server"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in descendants(proc.pid):
            os.kill(p, 9)

"""The rollout server's HTTP layer and its client, against a fake engine (no vLLM): errors, auth, retries, pushes.

    .venv/bin/python -m pytest tests/unit/test_client.py -q

The app (vllm_server/app.py) is the real one; only the engine behind it is a stand-in that echoes what it got.
"""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from suzak import wire
from suzak.config import ModelConfig
from suzak.errors import SuzakError
from suzak.prompts import fit_images
from vllm_server import client as client_mod
from vllm_server.app import admin_token_for, create_app
from vllm_server.client import RolloutClient, check_compatible, free_port
from vllm_server.engine import Engine, RequestError, safetensors_shards
from suzak.images import budget_size, encode_image_data_url, load_image, resize_to_budget

MIN_PIXELS, MAX_PIXELS = 3136, 100352


class FakeEngine(Engine):
    """Echoes each prompt: one completion per sample whose token ids are [image count, image pixels, sample]."""

    name = "fake"

    def __init__(self, gate: asyncio.Event | None = None):
        super().__init__()
        self.gate = gate
        self.pushes: list[wire.WeightUpdateRequest] = []
        self.generated = 0

    async def start(self) -> None:
        if self.gate is not None:
            await self.gate.wait()
        self.ready = True

    def info(self) -> wire.ModelInfo:
        return wire.ModelInfo(model="fake", engine="fake", engine_version="0", policy_version=self.policy_version,
                              max_model_len=512, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, dtype="float32",
                              transports=["files"], max_images_per_prompt=2)

    async def generate(self, prompts, sampling):
        self.generated += 1
        results = []
        for p in prompts:
            pixels = sum(im.width * im.height for im in p.images)
            completions = [wire.Completion(text=f"sample {k}", token_ids=[len(p.images), pixels, k],
                                           logprobs=[-0.5] * 3 if sampling.logprobs else None,
                                           finish_reason="length", policy_version=self.policy_version)
                           for k in range(sampling.n)]
            results.append(wire.PromptResult(prompt_token_ids=[1, 2, 3], completions=completions))
        return results

    async def init_transport(self, req):
        return {"transport": req.transport}

    async def update_weights(self, req):
        _, count = safetensors_shards(req.path) if req.transport == "files" else ([], 0)
        self.pushes.append(req)
        self.policy_version = req.version
        return wire.WeightUpdateResponse(policy_version=req.version, seconds=0.0, tensors=count)

    async def sleep(self, level):
        raise RequestError("sleep mode is off", status=409)

    async def wake(self, tags):
        raise RequestError("sleep mode is off", status=409)

    async def reset_caches(self):
        return {"prefix_cache_reset": True}


@pytest.fixture
def served():
    """(engine, client) for an in-process app; the TestClient runs the app's lifespan (engine start)."""
    engine = FakeEngine()
    with TestClient(create_app(engine)) as http:
        yield engine, RolloutClient("http://testserver", http=http, retries=0)


def _image_prompt(ref: str, text: str = "How many objects?") -> wire.Prompt:
    return wire.Prompt(messages=[wire.ChatMessage(role="user", content=[
        wire.ContentPart(type="image", image=ref), wire.ContentPart(type="text", text=text)])])


def _png(path, size=(224, 168), color=(200, 30, 90)):
    Image.new("RGB", size, color).save(path)
    return str(path)


# --------------------------------------------------------------------------- generation


def test_generate_roundtrip_with_image_path_and_data_url(served, tmp_path):
    engine, client = served
    assert client.health() and client.ready()
    info = client.info()
    assert (info.min_pixels, info.max_pixels, info.policy_version) == (MIN_PIXELS, MAX_PIXELS, 0)
    data_url = encode_image_data_url(Image.new("RGB", (56, 84), (1, 2, 3)))
    req = wire.GenerateRequest(prompts=[_image_prompt(_png(tmp_path / "a.png")), _image_prompt(data_url)],
                               sampling=wire.SamplingParams(n=3, max_tokens=4))
    resp = client.generate(req)
    assert [r.completions[0].token_ids[:2] for r in resp.results] == [[1, 224 * 168], [1, 56 * 84]]
    assert [c.token_ids[2] for c in resp.results[0].completions] == [0, 1, 2]
    assert resp.policy_version == 0 and resp.results[0].completions[0].logprobs == [-0.5] * 3


def test_schema_errors_are_422_naming_the_field_and_server_keeps_serving(served):
    engine, client = served
    http = client.http
    good = {"prompts": [{"messages": [{"role": "user", "content": "hi"}]}]}
    r = http.post("/generate", json={**good, "sampling": {"n": 0}})
    assert r.status_code == 422 and r.json()["field"] == "sampling.n"
    r = http.post("/generate", json={**good, "sampling": {"temprature": 0.5}})
    assert r.status_code == 422 and r.json()["field"] == "sampling.temprature"
    assert "extra" in r.json()["error"].lower() or "not permitted" in r.json()["error"].lower()
    with pytest.raises(SuzakError, match=r"422.*\(field: prompts\)"):
        client._call("POST", "/generate", {"prompts": []})
    assert http.post("/generate", json=good).status_code == 200 and engine.generated == 1


def test_missing_image_file_is_400_naming_field_and_path(served, tmp_path):
    engine, client = served
    missing = tmp_path / "nope.png"
    with pytest.raises(SuzakError) as err:
        client.generate(wire.GenerateRequest(prompts=[_image_prompt(_png(tmp_path / "ok.png")),
                                                      _image_prompt(str(missing))]))
    msg = str(err.value)
    assert "-> 400" in msg and str(missing) in msg and "prompts.1.messages.0.content.0.image" in msg
    assert engine.generated == 0  # refused before the engine
    assert client.generate(wire.GenerateRequest(prompts=[_image_prompt(_png(tmp_path / "ok.png"))])).results


def test_image_over_max_pixels_is_400_and_prepare_images_fixes_it(served, tmp_path):
    engine, client = served
    big = _png(tmp_path / "big.png", size=(640, 480))  # 307200 > MAX_PIXELS
    req = wire.GenerateRequest(prompts=[_image_prompt(big)])
    with pytest.raises(SuzakError, match=r"400: .*307200 pixels.*max_pixels 100352.*resize") as err:
        client.generate(req)
    assert "prompts.0.messages.0.content.0.image" in str(err.value)
    resp = client.generate(client.prepare_images(req))
    h, w = budget_size(480, 640, MIN_PIXELS, MAX_PIXELS)
    assert resp.results[0].completions[0].token_ids[1] == h * w <= MAX_PIXELS


def test_too_many_images_and_bad_data_url(served):
    _, client = served
    url = encode_image_data_url(Image.new("RGB", (56, 56)))
    three = wire.Prompt(messages=[wire.ChatMessage(role="user", content=[
        wire.ContentPart(type="image", image=url) for _ in range(3)])])
    with pytest.raises(SuzakError, match=r"400: prompt 0 has 3 images.*at most 2"):
        client.generate(wire.GenerateRequest(prompts=[three]))
    with pytest.raises(SuzakError, match=r"400: .*invalid base64.*content.0.image"):
        client.generate(wire.GenerateRequest(prompts=[_image_prompt("data:image/png;base64,@@@")]))


def test_ready_is_503_while_the_engine_loads():
    gate = asyncio.Event()
    engine = FakeEngine(gate=gate)
    with TestClient(create_app(engine)) as http:
        client = RolloutClient("http://testserver", http=http, retries=0)
        assert client.health() and not client.ready()
        r = http.get("/info")
        assert r.status_code == 503 and "loading" in r.json()["error"]
        http.portal.call(gate.set)
        deadline = time.monotonic() + 5
        while not client.ready() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.ready()


def test_a_failed_load_is_reported_and_stops_the_server():
    class Broken(FakeEngine):
        async def start(self):
            raise RuntimeError("no such model folder")

    stopped = []
    with TestClient(create_app(Broken(), on_fatal=lambda: stopped.append(True))) as http:
        client = RolloutClient("http://testserver", http=http, retries=0)
        assert client.health()
        with pytest.raises(SuzakError, match="503: the engine failed to load: RuntimeError: no such model folder"):
            client.ready()
    assert stopped == [True]


# --------------------------------------------------------------------------- connection and auth


def test_connection_refused_retries_with_backoff_then_clear_error(monkeypatch):
    delays = []
    monkeypatch.setattr(client_mod.time, "sleep", delays.append)
    url = f"http://127.0.0.1:{free_port()}"
    client = RolloutClient(url, retries=3, backoff=0.25)
    with pytest.raises(SuzakError, match=r"no rollout server at http://127\.0\.0\.1:\d+.*suzak serve --config"):
        client.info()
    assert delays == [0.25, 0.5, 1.0]
    assert client.health() is False and client.ready() is False


def test_retries_reach_a_server_that_comes_up_late():
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(FakeEngine()), host="127.0.0.1", port=port, log_level="error"))
    starter = threading.Timer(0.5, server.run)
    starter.start()
    try:
        client = RolloutClient(f"http://127.0.0.1:{port}", retries=8, backoff=0.1)
        assert client._call("GET", "/health") == {"status": "ok"}  # refused at first, then retried into service
        assert client.wait_ready(timeout_s=20, poll_s=0.05).engine == "fake"
    finally:
        server.should_exit = True
        starter.join(timeout=10)


def test_admin_routes_need_the_token_off_localhost(tmp_path):
    engine = FakeEngine()
    with TestClient(create_app(engine, admin_token="s3cret")) as http:
        anonymous = RolloutClient("http://testserver", http=http, retries=0, token="")
        with pytest.raises(SuzakError, match=r"401: .*Authorization: Bearer"):
            anonymous.reset_prefix_cache()
        wrong = RolloutClient("http://testserver", http=http, retries=0, token="guess")
        with pytest.raises(SuzakError, match="401"):
            wrong.update_weights(wire.WeightUpdateRequest(version=1, transport="files", path=str(tmp_path)))
        # Generation stays open; admin routes work with the right token.
        assert anonymous.generate(wire.GenerateRequest(prompts=[wire.Prompt(
            messages=[wire.ChatMessage(role="user", content="hi")])])).results
        assert RolloutClient("http://testserver", http=http, retries=0, token="s3cret").reset_prefix_cache()
    assert engine.pushes == []


def test_server_refuses_to_bind_off_localhost_without_token(monkeypatch):
    monkeypatch.delenv("SUZAK_SERVER_TOKEN", raising=False)
    assert admin_token_for("127.0.0.1") is None
    with pytest.raises(SuzakError, match="SUZAK_SERVER_TOKEN"):
        admin_token_for("0.0.0.0")
    monkeypatch.setenv("SUZAK_SERVER_TOKEN", "abc")
    assert admin_token_for("0.0.0.0") == "abc"


def test_sleep_unavailable_is_409(served):
    _, client = served
    with pytest.raises(SuzakError, match="409: sleep mode is off"):
        client.sleep()


# --------------------------------------------------------------------------- weights and images


def test_files_transport_writes_buckets_atomically_and_prunes(served, tmp_path):
    import torch
    from safetensors.torch import load_file

    from trainer.weight_push import FilesTransport

    engine, client = served
    embed = torch.randn(300, 256)  # 300 KiB: embed + head + norm fill most of a 1 MiB bucket, visual.w starts the next
    weights = {"model.embed_tokens.weight": embed, "lm_head.weight": embed,  # tied: shared storage
               "model.norm.weight": torch.ones(256), "visual.w": torch.randn(600, 256)}
    transport = FilesTransport(tmp_path / "push", bucket_mb=1)
    transport.init(client)
    stats = transport.push(weights.items(), 3)
    assert stats["tensors"] == 4 and stats["shards"] == 2 and engine.policy_version == 3
    pushed = engine.pushes[-1]
    assert pushed.transport == "files" and pushed.path.endswith("v000003")
    loaded = {}
    for shard in sorted((tmp_path / "push" / "v000003").glob("*.safetensors")):
        loaded.update(load_file(shard))
    assert set(loaded) == set(weights) and all(torch.equal(loaded[k], v) for k, v in weights.items())
    transport.push({"model.norm.weight": torch.zeros(256)}.items(), 4)
    assert sorted(p.name for p in (tmp_path / "push").iterdir()) == ["v000004"]
    assert client.info().policy_version == 4


def test_files_push_to_an_empty_folder_is_refused(served, tmp_path):
    _, client = served
    with pytest.raises(SuzakError, match=r"400: no \.safetensors files in .*\(field: path\)"):
        client.update_weights(wire.WeightUpdateRequest(version=1, transport="files", path=str(tmp_path)))


def test_fit_images_keeps_fitting_local_paths_and_resizes_the_rest(tmp_path):
    fits = _png(tmp_path / "fits.png", size=(224, 168))
    big = _png(tmp_path / "big.png", size=(1000, 700))
    req = wire.GenerateRequest(prompts=[_image_prompt(fits), _image_prompt(big)])
    out = fit_images(req, MIN_PIXELS, MAX_PIXELS)
    assert out.prompts[0].messages[0].content[0].image == fits
    resized = load_image(out.prompts[1].messages[0].content[0].image)
    assert (resized.height, resized.width) == budget_size(700, 1000, MIN_PIXELS, MAX_PIXELS)
    assert resized.tobytes() == resize_to_budget(Image.open(big), MIN_PIXELS, MAX_PIXELS).tobytes()
    remote = fit_images(req, MIN_PIXELS, MAX_PIXELS, inline_paths=True)
    assert remote.prompts[0].messages[0].content[0].image.startswith("data:image/png;base64,")
    assert req.prompts[1].messages[0].content[0].image == big  # the original is untouched


def test_load_image_errors_name_the_problem(tmp_path):
    with pytest.raises(SuzakError, match=r"image file not found: .*nope\.png \(field x\)"):
        load_image(str(tmp_path / "nope.png"), field="x")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    with pytest.raises(SuzakError, match="cannot decode image"):
        load_image(str(tmp_path / "junk.png"))
    with pytest.raises(SuzakError, match="data:image/png;base64"):
        load_image("data:image/png,rawbytes")
    rgba = Image.new("RGBA", (28, 28), (0, 0, 0, 0))
    assert load_image(encode_image_data_url(rgba)).getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_check_compatible_refuses_a_pixel_mismatch():
    info = FakeEngine().info()
    check_compatible(info, ModelConfig(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS))
    with pytest.raises(SuzakError, match=r"max_pixels: server 100352, config 401408"):
        check_compatible(info, ModelConfig(min_pixels=MIN_PIXELS, max_pixels=401408))


def test_client_imports_neither_torch_nor_vllm():
    import subprocess
    import sys

    code = ("import sys, vllm_server.client, trainer.weight_push, vllm_server.app; "
            "print(sorted(m for m in ('torch', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_http_errors_surface_the_server_json():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(500, json={"error": "server error: RuntimeError: boom", "detail": "see the server log"})

    http = httpx.Client(base_url="http://x", transport=httpx.MockTransport(handler))
    with pytest.raises(SuzakError, match=r"POST /generate -> 500: server error: RuntimeError: boom"):
        RolloutClient("http://x", http=http).generate(wire.GenerateRequest(
            prompts=[wire.Prompt(messages=[wire.ChatMessage(role="user", content="hi")])]))


# --------------------------------------------------------------------------- vLLM version adapter and IPC layout

# Dataclass fields of vLLM's weight-transfer infos, read from the 0.26.0 and 0.32.0 wheels.
VLLM_FIELDS = {
    ("0.26", "ipc"): (set(), {"names", "dtype_names", "shapes", "ipc_handles", "ipc_handles_pickled",
                              "tensor_sizes", "packed"}),
    ("0.32", "ipc"): ({"packed"}, {"names", "dtype_names", "shapes", "ipc_handles", "ipc_handles_pickled",
                                   "tensor_sizes"}),
    ("0.26", "nccl"): ({"master_address", "master_port", "rank_offset", "world_size"},
                       {"names", "dtype_names", "shapes", "packed", "packed_buffer_size_bytes", "packed_num_buffers"}),
    ("0.32", "nccl"): ({"master_address", "master_port", "rank_offset", "world_size", "nccl_unique_id_b64", "packed",
                        "packed_buffer_size_bytes", "packed_num_buffers"}, {"names", "dtype_names", "shapes"}),
}
META = {"names": ["w"], "dtype_names": ["bfloat16"], "shapes": [[2, 2]]}


@pytest.mark.parametrize("version", ["0.26", "0.32"])
def test_adapter_puts_packed_where_each_vllm_wants_it(version):
    from vllm_server.engine import TransferAdapter

    ipc = TransferAdapter("ipc", *VLLM_FIELDS[(version, "ipc")])
    init = ipc.init_info({"packed": True})
    update = ipc.update_info({**META, "ipc_handles_pickled": "x", "tensor_sizes": [8], "packed": True})
    if version == "0.26":
        assert init == {} and update["packed"] is True
    else:
        assert init == {"packed": True} and "packed" not in update
    assert set(update) <= VLLM_FIELDS[(version, "ipc")][1]

    nccl = TransferAdapter("nccl", *VLLM_FIELDS[(version, "nccl")])
    wire_params = {"packed": True, "packed_buffer_size_bytes": 1 << 20, "packed_num_buffers": 2}
    init = nccl.init_info({"master_address": "127.0.0.1", "master_port": 29555, "world_size": 2, **wire_params})
    update = nccl.update_info(dict(META))
    assert init["rank_offset"] == 1 and set(init) <= VLLM_FIELDS[(version, "nccl")][0]
    carried = {k: update.get(k) for k in wire_params}
    assert carried == (wire_params if version == "0.26" else dict.fromkeys(wire_params))
    with pytest.raises(RequestError, match="unknown nccl payload key 'nmaes'"):
        nccl.update_info({"nmaes": []})


def test_packed_chunk_layout_is_what_vllms_consumer_unpacks():
    import torch

    from trainer.weight_push import _PackedChunk

    tensors = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7).to(torch.bfloat16),
               "c": torch.randn(2, 2, 2).to(torch.bfloat16)}
    chunk = _PackedChunk(torch.zeros(4096, dtype=torch.uint8), handle=("h",))
    for name, t in tensors.items():
        chunk.add(name, t, t.contiguous().view(-1).view(torch.uint8))
    payload = chunk.payload("GPU-1")
    assert payload["packed"] is True and payload["tensor_sizes"] == [30, 14, 16]
    # vLLM's packed_ipc_consumer: slice to sum(sizes), split by sizes, view as dtype then shape (in place).
    parts = chunk.buffer[: sum(payload["tensor_sizes"])].split(payload["tensor_sizes"])
    for name, dtype, shape, part in zip(payload["names"], payload["dtype_names"], payload["shapes"], parts):
        assert torch.equal(part.contiguous().view(getattr(torch, dtype)).view(*shape), tensors[name])
    # A wider dtype at an odd offset could not be viewed in place by vLLM: refused up front.
    with pytest.raises(SuzakError, match="would start at byte 60, not a multiple of 8"):
        chunk.add("d", torch.zeros(2, dtype=torch.int64), torch.zeros(2, dtype=torch.int64).view(torch.uint8))


def test_smart_resize_copy_matches_qwen_vl_utils():
    from qwen_vl_utils.vision_process import smart_resize

    from suzak.images import smart_resize_copy

    sizes = [(h, w) for h in (28, 50, 167, 320, 480, 999, 2048) for w in (31, 224, 333, 640, 1500, 4000)]
    for lo, hi in ((3136, 100352), (3136, 401408), (784, 12845056)):
        for h, w in sizes:
            assert smart_resize_copy(h, w, 28, lo, hi) == tuple(smart_resize(h, w, 28, lo, hi)), (h, w, lo, hi)


# --------------------------------------------------------------------------- VLLMEngine's update protocol


class _Out:
    def __init__(self):
        comp = type("C", (), {"index": 0, "token_ids": [5, 6], "logprobs": None, "text": "ab",
                              "finish_reason": "length"})()
        self.outputs, self.prompt_token_ids = [comp], [1, 2, 3]


class FakeLLM:
    """Stands in for vLLM's AsyncLLM: records the calls, takes `delay` seconds per generation/reload."""

    def __init__(self, delay: float):
        self.delay, self.calls = delay, []

    async def generate(self, prompt, params, request_id):
        self.calls.append("generate")
        await asyncio.sleep(self.delay)
        yield _Out()

    async def pause_generation(self, *, mode, clear_cache):
        self.calls.append(f"pause:{mode}:{clear_cache}")

    async def resume_generation(self):
        self.calls.append("resume")

    async def collective_rpc(self, method, kwargs=None):
        self.calls.append(method)
        await asyncio.sleep(self.delay)


class FakeProcessor:
    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        return "prompt text"

    def tokenizer(self, text, add_special_tokens):
        return {"input_ids": [1, 2, 3]}


def test_weight_update_drains_and_gates_generation_so_versions_are_exact(tmp_path):
    import torch
    from safetensors.torch import save_file

    from suzak.config import load_config
    from vllm_server.engine import EnginePrompt, TransferAdapter, VLLMEngine

    save_file({"w": torch.zeros(2)}, str(tmp_path / "model-00000.safetensors"))
    engine = VLLMEngine(load_config(None, []))
    engine.llm, engine.processor = FakeLLM(delay=0.2), FakeProcessor()
    engine._sampling = lambda sampling, budget, index=0: sampling  # no vLLM import in a unit test
    sampling = wire.SamplingParams(max_tokens=2)
    prompt = EnginePrompt(messages=[{"role": "user", "content": "hi"}])
    push = wire.WeightUpdateRequest(version=5, transport="files", path=str(tmp_path))

    async def scenario():
        engine.init_state()
        before = asyncio.create_task(engine.generate([prompt], sampling))  # in flight when the push arrives
        await asyncio.sleep(0.05)
        update = asyncio.create_task(engine.update_weights(push))
        await asyncio.sleep(0.05)
        during = asyncio.create_task(engine.generate([prompt], sampling))  # arrives mid-update: must wait
        results = await asyncio.gather(before, update, during)
        # A later chunk (begin=false) with no push open is refused, and nothing is paused.
        engine.backend, engine.adapter = "ipc", TransferAdapter("ipc", *VLLM_FIELDS[("0.32", "ipc")])
        engine.adapter.params = {"packed": False}
        with pytest.raises(RequestError, match="no ipc weight update is open.*begin=true") as err:
            await engine.update_weights(wire.WeightUpdateRequest(version=6, transport="ipc", begin=False,
                                                                 payload={"names": [], "packed": False}))
        return results, err.value.status

    (before, update, during), status = asyncio.run(scenario())
    assert status == 409 and engine.policy_version == 5
    assert before[0].completions[0].policy_version == 0 and during[0].completions[0].policy_version == 5
    assert update.policy_version == 5 and update.tensors == 1 and update.timings["drain"] > 0.05
    assert engine.llm.calls == ["generate", "pause:wait:True", "reload_weights", "resume", "generate"]


@pytest.mark.vllm
def test_each_prompt_of_a_seeded_request_gets_its_own_seed():
    # One seed for every prompt gave all prompts of a GRPO step the same random stream (near-copy rollouts).
    from suzak.config import load_config
    from vllm_server.engine import VLLMEngine

    engine = VLLMEngine(load_config(None, []))
    seeds = [engine._sampling(wire.SamplingParams(seed=7, n=2), 8, i).seed for i in range(3)]
    assert seeds == [7, 8, 9]
    assert engine._sampling(wire.SamplingParams(seed=None), 8, 2).seed is None


def test_local_server_is_ready_inside_the_block_and_stopped_after_it(monkeypatch, tmp_path):
    from suzak.config import load_config

    events = []
    monkeypatch.setattr(client_mod, "spawn_local_server",
                        lambda cfg, log_path, env=None: (events.append(("spawn", cfg.model.name_or_path))
                                                         or (f"process-{len(events)}", "http://127.0.0.1:9")))
    monkeypatch.setattr(client_mod, "wait_local_server", lambda p, url, timeout_s, log: events.append(("wait", p)))
    monkeypatch.setattr(client_mod, "stop_local_server", lambda p: events.append(("stop", p)))
    cfg = load_config(None, ["model.name_or_path=a"])
    with client_mod.LocalServer(cfg, tmp_path / "server.log") as server:
        assert server.url == "http://127.0.0.1:9" and events == [("spawn", "a"), ("wait", "process-1")]
        server.wait()  # already ready: no second spawn or wait
        server.restart(load_config(None, ["model.name_or_path=b"]))  # after a crash, on other weights
    assert events[2:] == [("stop", "process-1"), ("spawn", "b"), ("wait", "process-4"), ("stop", "process-4")]
    assert server.process is None

    def fail(*a):
        raise SuzakError("not ready")  # wait_local_server stops the server itself before raising

    monkeypatch.setattr(client_mod, "wait_local_server", fail)
    events.clear()
    early = client_mod.LocalServer(cfg, tmp_path / "server.log").spawn()  # start-up overlapping other work
    with pytest.raises(SuzakError, match="not ready"), early:
        pass
    assert events == [("spawn", "a")] and early.process is None
